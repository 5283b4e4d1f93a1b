"""The figures and measurements of dit_cifar.py. `python -m tools.dit_figures` takes its flags, trains as
`python dit_cifar.py` does (under torchrun too; or loads OUT/ckpt.pt with --sample-only), and writes,
on rank 0:

- vae_reconstructions.png: test images over their VAE reconstructions; the test MSE,
- loss.png: the training loss, and the EMA DiT's test loss after every epoch; the final test loss,
- cfg_wW.png: one guidance grid per w of --scales (a row per class, the same noise for every w),
  with its sampling time,
- with --eval N: evaluate.py's FD and class accuracy against w (eval.md, eval.png).

Run:
    python -m tools.dit_figures --sample-only --eval 10000   # the run in runs/dit_cifar, + FD and accuracy against w
    torchrun --nproc_per_node=4 -m tools.dit_figures   # train on 4 GPUs as dit_cifar.py does, then the figures
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

import common
import plots
import dit_cifar
from latent_diffusion import vae_figure
from tools import report
from tools.latent_figures import plot_points


CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]   # label order


@dataclass
class Config(dit_cifar.Config):
    scales: tuple[float, ...] = field(default=(1.0, 3.0, 5.0, 7.5), metadata={"min": 0, "help": "w of the figures"})
    n_per_class: int = field(default=8, metadata={"min": 1, "help": "samples per class row in the grids"})
    eval: int = field(default=0, metadata={"min": 0, "help": "score N samples per w with evaluate.py (0 = off; "
                      "costs len(scales) x N x ddim-steps DiT calls, and a classifier trained once)"})


def make_figures(cfg: Config, model, ddpm, vae, scale: float, state: dict, x_test, z_test, y_test, device) -> dict:
    """The figures above, for the EMA DiT `model` of the checkpoint `state` and its VAE (scale s).
    -> {recon_mse, scale, test_loss, metric, eval: [w, FD, class accuracy] rows (with --eval), classes}"""
    recon_mse = vae_figure(vae, x_test, os.path.join(cfg.out, "vae_reconstructions.png"))
    print(f"latent scale factor s = 1 / std(z_train) = {scale:.4f}")
    final = dit_cifar.test_loss(model, ddpm, z_test, y_test, cfg.seed)
    print(f"final test loss (EMA DiT, {min(len(z_test), 2000)} test latents): {final:.4f}")
    plot_points(os.path.join(cfg.out, "loss.png"), {"train (mean of 50 steps)": plots.smooth(state["losses"]),
                                                    "test (EMA), after each epoch": state["test_losses"]},
                "step", "eps-MSE", f"{state['config']['model']}: training vs test loss (final test {final:.4f})",
                dense=("train (mean of 50 steps)",))
    y = torch.arange(model.null, device=device).repeat_interleave(cfg.n_per_class)   # one row per class
    names = CIFAR10 if "cifar" in cfg.dataset.lower() and model.null == 10 else [f"class {k}" for k in range(model.null)]
    for w in cfg.scales:
        x, seconds = report.timed(device, lambda: dit_cifar.sample(model, ddpm, vae, scale, y, w, cfg.ddim_steps,
                                                                   cfg.seed))
        plots.save_labelled_grid(x, os.path.join(cfg.out, f"cfg_w{w:g}.png"), cfg.n_per_class, names,
                                 f"{state['config']['model']}, classifier-free guidance w = {w:g}",
                                 "each column: the same noise z_T for every w")
        print(f"w = {w:g}: {len(y)} images ({cfg.ddim_steps} DDIM steps, then the decoder) in {seconds:.2f}s")
    rows, metric = [], ""
    if cfg.eval > 0:
        from tools import evaluate  # imported here: its classifier is trained (and cached) on first use
        ev = evaluate.Evaluator(cfg.dataset, cfg.data_dir, cfg.download, device)
        y = torch.arange(cfg.eval, device=device) % model.null                      # balanced classes
        metric = ev.name
        for w in cfg.scales:
            x = torch.cat([dit_cifar.sample(model, ddpm, vae, scale, b, w, cfg.ddim_steps, cfg.seed + i)
                           for i, b in enumerate(common.progress(y.split(1000), f"w = {w:g}"))])
            rows.append([w, ev.fd(x), ev.accuracy(x, y)])
        print(report.write_table(os.path.join(cfg.out, "eval.md"), ["w", ev.name, "class accuracy"], rows))
        eval_figure(os.path.join(cfg.out, "eval.png"), rows, ev.name, cfg.eval, state["config"]["model"],
                    model.null)
    print(f"figures in {cfg.out}/")
    return dict(recon_mse=recon_mse, scale=scale, test_loss=final, metric=metric, eval=rows, classes=model.null)


def eval_figure(path: str, rows: list[list], name: str, n: int, model: str, classes: int = 10) -> None:
    """Two panels against the guidance weight w: the FD (fidelity and diversity) and the class accuracy."""
    fig, (a, b) = plots.figure(1, 2, figsize=(9, 3.6))
    w = [r[0] for r in rows]
    a.plot(w, [r[1] for r in rows], "o-")
    a.set(xlabel="guidance weight w", ylabel=name, title=f"{name} against w (lower is better)", xticks=w)
    b.plot(w, [r[2] for r in rows], "o-", color="C1", label="samples, by the metric's classifier")
    b.axhline(1 / classes, color="gray", ls="--", label=f"chance ({classes} classes)")
    b.set(xlabel="guidance weight w", ylabel="class accuracy", title="class accuracy against w", xticks=w, ylim=(0, 1))
    fig.suptitle(f"{model}: {n} samples per w")
    plots.save_figure(fig, path)


def main(argv=None) -> dict | None:
    """Train as dit_cifar.py does (or load, --sample-only), then the figures above on rank 0 (-> their numbers;
    None on the other ranks)."""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    trained = dit_cifar.run(cfg)
    if trained:                                              # rank 0, after the process group is gone
        model, ddpm, vae, scale, state, (x_test, z_test, y_test) = trained
        return make_figures(cfg, model, ddpm, vae, scale, state, x_test, z_test, y_test, x_test.device)
    return None


if __name__ == "__main__":
    main()
