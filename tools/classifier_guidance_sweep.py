"""What classifier guidance does, measured on a trained noisy classifier (nothing is trained here).

First the classifier itself: its test accuracy at 10 noise levels t (printed, accuracy_per_t.png).
Then for each sampler in --samplers and scale s in --scales: --n-per-class samples of every target
class in --classes, all from the same noise (x_T and the sampler's z are the same for every s);
guided_{sampler}_s{s}.png shows the first 10 per class, a row per class (s = 0: the unguided base).
accuracy_vs_scale.md / .png: their within-class diversity relative to real test images (= 1), the
class accuracy by p_phi itself at t = 0 (optimistic: the samples were pushed towards what p_phi
likes) and, with --eval N, evaluate.py's LeNet accuracy (independent of the guide) and FD of N samples
per sampler and s: N x steps x (UNet + classifier forward and backward) each, and evaluate.py's
classifier trained once (~1 min on a GPU, cached in checkpoints/). The flags are
classifier_guidance.py's (its Config); the classifier is OUT/ckpt.pt or --ckpt, the base --base-ckpt.

    python -m tools.classifier_guidance_sweep                          # runs/classifier_guidance/ckpt.pt
    python -m tools.classifier_guidance_sweep --scales 0 2 5 --samplers ddim
    python -m tools.classifier_guidance_sweep --eval 1000              # + LeNet accuracy and FD of 1000 samples per s
"""
from __future__ import annotations

import functools
import math
import os
import textwrap

import torch

import checkpoints
import common
import plots
from classifier_guidance import KIND, Config, NoisyClassifier, check_config, check_fits_base, load_base, sample
from ddpm_mnist import DDPM
from tools import report


def load_classifier(path: str, base: dict, device) -> NoisyClassifier:
    """The EMA classifier of a checkpoint written by classifier_guidance.train; it must fit the base."""
    state = checkpoints.load(path, device, KIND, keys=("net", "ema", "base"),
                             hint="train with `python classifier_guidance.py` first, or pass --ckpt")
    check_fits_base(state, base, path)
    classifier = NoisyClassifier(**state["net"]).to(device)
    checkpoints.load_weights(classifier, state["ema"], path)
    return classifier.eval()


@torch.no_grad()
def accuracy_per_t(classifier, ddpm: DDPM, x: torch.Tensor, y: torch.Tensor, levels: int = 10, seed: int = 0):
    """Test accuracy of p_phi(y | x_t, t) at `levels` noise levels t from 0 to T-1: [(t, accuracy)]."""
    g = common.generator(x.device, seed)
    rows = []
    for t in torch.linspace(0, ddpm.T - 1, levels).round().long().unique().tolist():
        correct = 0
        for xb, yb in zip(x.split(500), y.split(500)):
            tb = torch.full((len(xb),), t, device=x.device)
            x_t = ddpm.q_sample(xb, tb, torch.randn(xb.shape, device=x.device, generator=g))
            correct += (classifier(x_t, tb).argmax(1) == yb).sum().item()
        rows.append((t, correct / len(x)))
    return rows


def plot_scales(path: str, rows: list[list], samplers: tuple[str, ...], title: str, fd_name: str | None) -> None:
    """accuracy_vs_scale.png: diversity and accuracies against s, a colour per curve, a line style per
    sampler; with an FD, the FD in a second panel."""
    fig, axes = plots.figure(1, 2 if fd_name else 1, figsize=(11 if fd_name else 6, 4.2), squeeze=False)
    series = [("diversity (real = 1)", 2), ("accuracy by p_phi itself", 3), ("accuracy by LeNet", 4)][:3 if fd_name else 2]
    for k, smp in enumerate(samplers):
        ss, style = [r[1] for r in rows if r[0] == smp], ("-", "--")[k % 2]
        for j, (name, i) in enumerate(series):
            axes[0][0].plot(ss, [r[i] for r in rows if r[0] == smp], "osd"[j] + style, color=f"C{j + 3 * k}",
                            label=f"{name}, {smp}")
        if fd_name:
            axes[0][1].plot(ss, [r[5] for r in rows if r[0] == smp], "o" + style, color=f"C{6 + k}", label=smp)
    axes[0][0].set(xlabel="guidance scale s", ylabel="relative distance / accuracy",
                   title="diversity and class accuracy against s")
    if fd_name:
        axes[0][1].set(xlabel="guidance scale s", ylabel=fd_name, title=f"{fd_name} (lower: closer to the data)")
    fig.suptitle(textwrap.fill(title, 120 if fd_name else 65), fontsize=11)
    plots.save_figure(fig, path)


@torch.no_grad()
def sweep(cfg: Config, model, classifier, ddpm: DDPM, device, evaluator=None) -> dict:
    """Accuracy per noise level, then for each sampler and scale: n_per_class samples of every class
    in --classes from the same noise, a labelled grid of the first 10 per class, the within-class
    diversity relative to real test images and p_phi's own accuracy; with an evaluator, also
    evaluate.py's accuracy and FD of cfg.eval samples balanced over the classes.
    -> {accuracy_per_t: [(t, accuracy)], rows: the rows of accuracy_vs_scale.md}"""
    from tools import evaluate  # for the diversity metric (evaluate.py imports torchmetrics: slow, so only here)

    c, n = model.config, cfg.n_per_class
    x_test, y_test = common.load_images(cfg.dataset, cfg.data_dir, False, cfg.download, c["image_size"],
                                        c["channels"], device)
    per_t = accuracy_per_t(classifier, ddpm, x_test[:2000], y_test[:2000], seed=cfg.seed)
    print("noisy classifier, test accuracy per noise level:\n" + "\n".join(f"  t = {t:4d}: {a:.3f}" for t, a in per_t))
    fig, ax = plots.figure(figsize=(6, 4))
    ax.plot(*zip(*per_t), "o-")
    ax.set(xlabel="noise level t", ylabel="test accuracy", ylim=(0, 1.02),
           title=f"noisy classifier p_phi(y | x_t, t), {min(len(x_test), 2000)} test images (T = {ddpm.T})")
    plots.save_figure(fig, os.path.join(cfg.out, "accuracy_per_t.png"))
    y = torch.tensor(cfg.classes, device=device).repeat_interleave(n)       # (N,) one row per class
    gen = functools.partial(common.generator, device, cfg.seed, 1)   # the samplers' z: the same for every scale
    x_T = torch.randn((len(y), c["channels"], c["image_size"], c["image_size"]), device=device,
                      generator=common.generator(device, cfg.seed))
    cols = min(n, 10)
    in_grid = torch.arange(len(y), device=device) % n < cols
    real = torch.cat([(y_test == k).nonzero()[:n, 0] for k in cfg.classes])
    div_real = evaluate.within_class_diversity(x_test[real], y_test[real])
    y_eval = torch.tensor(cfg.classes, device=device).repeat(math.ceil(cfg.eval / len(cfg.classes)))[:cfg.eval]
    rows = []
    for sampler, s in common.progress([(a, b) for a in cfg.samplers for b in cfg.scales], "guidance scales"):
        x = sample(model, classifier, ddpm, y, s, sampler, cfg.ddim_steps, cfg.eta, cfg.sigma, cfg.clip, x_T, gen())
        how = f"DDIM-{cfg.ddim_steps}" if sampler == "ddim" else f"DDPM-{ddpm.T}, Sigma_t {cfg.sigma}"
        plots.save_labelled_grid(x[in_grid], os.path.join(cfg.out, f"guided_{sampler}_s{s:g}.png"), cols,
                                 [f"class {k}" for k in cfg.classes], f"classifier guidance, s = {s:g} ({how})",
                                 "samples: the same noise in every s's grid")
        own = (classifier(x, torch.zeros_like(y)).argmax(1) == y).float().mean().item()  # p_phi at t = 0
        row = [sampler, s, evaluate.within_class_diversity(x, y) / div_real, own]
        if evaluator is not None:                        # cfg.eval more samples, in batches of 500
            g = common.generator(device, cfg.seed)   # one stream: x_T, then its z, batch after batch
            x = torch.cat([sample(model, classifier, ddpm, yb, s, sampler, cfg.ddim_steps, cfg.eta, cfg.sigma,
                                  cfg.clip, generator=g)
                           for yb in common.progress(y_eval.split(500), f"{sampler} s = {s:g}: {cfg.eval} samples")])
            row += [evaluator.accuracy(x, y_eval), evaluator.fd(x)]
        rows.append(row)
    header = ["sampler", "scale s", "diversity (real = 1)", "accuracy by p_phi itself"]
    header += ["class accuracy (LeNet)", evaluator.name] if evaluator else []
    print(report.write_table(os.path.join(cfg.out, "accuracy_vs_scale.md"), header, rows))
    plot_scales(os.path.join(cfg.out, "accuracy_vs_scale.png"), rows, cfg.samplers, f"classifier guidance: what "
                f"the scale s trades, {n} samples per class", evaluator.name if evaluator else None)
    return dict(accuracy_per_t=per_t, rows=rows)


def main(argv=None) -> dict:
    """Load the base and the classifier (OUT/ckpt.pt or --ckpt) and sweep. -> sweep's results"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    common.seed_everything(cfg.seed)
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    common.prepare_out(cfg.out)
    ckpt = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    # stop now, not after training a base model, when there is nothing to sample with
    checkpoints.load(ckpt, device, KIND, keys=("net", "ema", "base"),
                     hint="train with `python classifier_guidance.py` first, or pass --ckpt")
    common.check(os.path.isfile(cfg.base_ckpt), f"--base-ckpt '{cfg.base_ckpt}' not found; the sweep needs the base "
                 "model the classifier was trained for")
    model, ddpm, base = load_base(cfg, device)
    classifier = load_classifier(ckpt, base, device)
    K = classifier.config["num_classes"]
    common.check(max(cfg.classes) < K, f"--classes must be in 0..{K - 1}, got {cfg.classes}")
    evaluator = None
    if cfg.eval:
        from tools import evaluate
        evaluator = evaluate.Evaluator(cfg.dataset, cfg.data_dir, cfg.download, device,
                                       image_size=base["image_size"], channels=base["channels"])
    results = sweep(cfg, model, classifier, ddpm, device, evaluator)
    print(f"figures in {cfg.out}/")
    return results


if __name__ == "__main__":
    main()
