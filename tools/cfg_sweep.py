"""What the guidance weight w of cfg.py trades, measured on a trained run (nothing is trained here).

For each w in --scales: --n-per-class samples of every class in --classes, all from the same noise
(x_T and the sampler's z are the same for every w); cfg_w{w}.png shows the first 10 per class, a
row per class; their within-class diversity (mean pairwise distance) is relative to real test
images of the same classes (= 1). With --eval N, also evaluate.py's class accuracy and FD of N
samples per w, balanced over --classes: N x 2 x steps UNet passes per w, and evaluate.py's
classifier trained once (~1 min on a GPU, cached in checkpoints/). The numbers go to tradeoff.md
and tradeoff.png. The flags are cfg.py's (its Config); the checkpoint is OUT/ckpt.pt or --ckpt.

    python -m tools.cfg_sweep                                   # runs/cfg/ckpt.pt, w = 0 1 3 5 7.5
    python -m tools.cfg_sweep --scales 0 1 2 4 --classes 3 8    # grids of 3s and 8s only
    python -m tools.cfg_sweep --out runs/cfg_cpu --eval 500     # + class accuracy and FD of 500 samples per w
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import textwrap

import torch

import checkpoints
import common
import plots
from cfg import KIND, Config, CondUNet, check_config, sample
from ddpm_mnist import DDPM
from tools import report


def load_trained(path: str, device) -> tuple[CondUNet, DDPM, dict]:
    """The EMA network and diffusion process of a checkpoint written by cfg.train."""
    state = checkpoints.load(path, device, KIND, keys=("net", "ema", "config"),
                             hint="train with `python cfg.py` first, or pass --ckpt")
    model = CondUNet(**state["net"]).to(device)
    checkpoints.load_weights(model, state["ema"], path)
    return model.eval(), DDPM(state["config"]["T"], state["config"]["schedule"]).to(device), state


def plot_tradeoff(path: str, rows: list[list], title: str, fd_name: str | None, n_eval: int) -> None:
    """tradeoff.png: diversity (and class accuracy) against w; with an FD, the FD in a second panel."""
    fig, axes = plots.figure(1, 2 if fd_name else 1, figsize=(11 if fd_name else 6, 4.2), squeeze=False)
    ws, ax = [r[0] for r in rows], axes[0][0]
    ax.plot(ws, [r[1] for r in rows], "o-", color="C0", label="within-class diversity (real = 1)")
    if fd_name:
        ax.plot(ws, [r[2] for r in rows], "s-", color="C1", label="class accuracy (evaluate.py)")
        axes[0][1].plot(ws, [r[3] for r in rows], "o-", color="C2")
        axes[0][1].set(xlabel="guidance weight w", ylabel=fd_name, title=f"{fd_name} of {n_eval} samples per w "
                       "(lower: closer to the data)")
    ax.set(xlabel="guidance weight w", ylabel="relative distance" + (" / accuracy" if fd_name else ""),
           title="diversity" + (" and class accuracy" if fd_name else "") + " against w")
    fig.suptitle(textwrap.fill(title, 120 if fd_name else 65), fontsize=11)
    plots.save_figure(fig, path)


@torch.no_grad()
def sweep(cfg: Config, model: CondUNet, ddpm: DDPM, device, evaluator=None) -> list[list]:
    """For each w: n_per_class samples of every class in --classes from the same noise, a labelled grid
    of the first 10 per class and their within-class diversity relative to real test images; with an
    evaluator, also the class accuracy and FD of cfg.eval samples balanced over the classes.
    -> the rows of tradeoff.md: [w, diversity] (+ [accuracy, FD])"""
    from tools import evaluate  # for the diversity metric (evaluate.py imports torchmetrics: slow, so only here)

    c, n = model.config, cfg.n_per_class
    y = torch.tensor(cfg.classes, device=device).repeat_interleave(n)       # (N,) one row per class
    gen = functools.partial(common.generator, device, cfg.seed, 1)   # the samplers' z: the same for every w
    x_T = torch.randn((len(y), c["channels"], c["image_size"], c["image_size"]), device=device,
                      generator=common.generator(device, cfg.seed))
    cols = min(n, 10)
    in_grid = torch.arange(len(y), device=device) % n < cols
    x_real, y_real = common.load_images(cfg.dataset, cfg.data_dir, False, cfg.download, cfg.image_size or None,
                                        cfg.channels, device)
    real = torch.cat([(y_real == k).nonzero()[:n, 0] for k in cfg.classes])
    div_real = evaluate.within_class_diversity(x_real[real], y_real[real])
    y_eval = torch.tensor(cfg.classes, device=device).repeat(math.ceil(cfg.eval / len(cfg.classes)))[:cfg.eval]
    how = f"{c['cond']} conditioning, " + (f"DDIM-{cfg.ddim_steps}" if cfg.sampler == "ddim" else f"DDPM-{ddpm.T}")
    rows = []
    for w in common.progress(cfg.scales, "guidance weights"):
        x = sample(model, ddpm, y, w, cfg.sampler, cfg.ddim_steps, cfg.eta, cfg.clip, x_T, gen())
        plots.save_labelled_grid(x[in_grid], os.path.join(cfg.out, f"cfg_w{w:g}.png"), cols,
                                 [f"class {k}" for k in cfg.classes], f"CFG at w = {w:g} ({how})",
                                 "samples: the same noise in every w's grid")
        row = [w, evaluate.within_class_diversity(x, y) / div_real]
        if evaluator is not None:                        # cfg.eval more samples, in batches of 500
            g = common.generator(device, cfg.seed)   # one stream: x_T, then its z, batch after batch
            x = torch.cat([sample(model, ddpm, yb, w, cfg.sampler, cfg.ddim_steps, cfg.eta, cfg.clip, generator=g)
                           for yb in common.progress(y_eval.split(500), f"w = {w:g}: {cfg.eval} samples")])
            row += [evaluator.accuracy(x, y_eval), evaluator.fd(x)]
        rows.append(row)
    header = ["w", "diversity (real = 1)"] + (["class accuracy", evaluator.name] if evaluator else [])
    print(report.write_table(os.path.join(cfg.out, "tradeoff.md"), header, rows))
    plot_tradeoff(os.path.join(cfg.out, "tradeoff.png"), rows, f"CFG ({how}): what the guidance weight w trades, "
                  f"{n} samples per class", evaluator.name if evaluator else None, cfg.eval)
    return rows


def main(argv=None) -> list[list]:
    """Load OUT/ckpt.pt (or --ckpt) and sweep --scales. -> the rows of tradeoff.md"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    cfg = dataclasses.replace(cfg, sample_only=True)     # cfg.py's checks, for a run that trains nothing
    check_config(cfg)
    common.seed_everything(cfg.seed)
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    common.prepare_out(cfg.out)
    model, ddpm, _ = load_trained(cfg.ckpt or os.path.join(cfg.out, "ckpt.pt"), device)
    c = model.config                                     # real images of the model's shape, for the diversity
    cfg = dataclasses.replace(cfg, image_size=c["image_size"], channels=c["channels"])
    common.check(cfg.ddim_steps <= ddpm.T, f"--ddim-steps must be at most the model's T ({ddpm.T}), "
                 f"got {cfg.ddim_steps}")
    common.check(max(cfg.classes) < model.null, f"--classes must be in 0..{model.null - 1}, got {cfg.classes}")
    evaluator = None
    if cfg.eval:
        from tools import evaluate
        evaluator = evaluate.Evaluator(cfg.dataset, cfg.data_dir, cfg.download, device,
                                       image_size=cfg.image_size or None, channels=cfg.channels)
    rows = sweep(cfg, model, ddpm, device, evaluator)
    print(f"figures in {cfg.out}/")
    return rows


if __name__ == "__main__":
    main()
