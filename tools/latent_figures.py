"""The figures and measurements of latent_diffusion.py. `python -m tools.latent_figures` takes its flags, trains
as `python latent_diffusion.py` does (or loads OUT/ckpt.pt and the VAE with --sample-only), and writes:

- vae_reconstructions.png: test images (top row) over their VAE reconstructions; the test MSE,
- ddim_vs_ddpm.png: DDIM and DDPM samples from the same latent noise z_T, decoded, their rows
  named (with --no-ddpm: ddim.png, DDIM alone); each sampler's time,
- loss.png: the training loss of the latent UNet,
- with --eval N: the FD-LeNet and class histogram of every sampler (eval.md, evaluate.py).
`plot_points` (measured points: markers, and a log axis only where the values span a decade or more)
serves the figures of flow_figures.py and dit_figures.py too.

Run:
    python -m tools.latent_figures --sample-only --eval 10000   # the run in runs/latent_diffusion, + FD-LeNet
    python -m tools.latent_figures --no-ddpm                    # train as latent_diffusion.py does; DDIM only
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch

import checkpoints
import common
import plots
import latent_diffusion as ld
from tools import report


@dataclass
class Config(ld.Config):
    ddpm: bool = field(default=True, metadata={"help": "also sample with DDPM's T steps: "
                       "ddim_vs_ddpm.png (--no-ddpm: ddim.png), --eval"})
    eval: int = field(default=0, metadata={"min": 0, "help": "score N samples of each sampler (evaluate.py, "
                      "OUT/eval.md; 0 = off); costs N x (ddim_steps + T) UNet calls, --no-ddpm: N x ddim_steps"})


def axis_scale(values) -> str:
    """'log' where the (positive) values span a decade or more, else 'linear'."""
    values = [float(v) for v in values]
    return "log" if min(values) > 0 and max(values) >= 10 * min(values) else "linear"


def plot_points(path: str, curves: dict, xlabel: str, ylabel: str, title: str, dense: tuple = ()) -> None:
    """Named curves of (x, y) points with a marker at each measured point (none on the `dense` ones,
    e.g. a loss at every step), each axis log only where its values span a decade."""
    fig, ax = plots.figure(figsize=(6, 4))
    for name, points in curves.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=name, lw=1.2, marker=None if name in dense else "o", ms=4)
    xs, ys = zip(*[p for points in curves.values() for p in points])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xscale=axis_scale(xs), yscale=axis_scale(ys))
    if not dense and len(set(xs)) <= 10:                  # a few measured x: a labelled tick at each
        ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))], minor=False)
        ax.minorticks_off()
    plots.save_figure(fig, path, legend=10 if len(curves) > 1 else 0)


def make_figures(cfg: Config, model, ddpm, vae, scale: float, x_test, device) -> dict:
    """VAE reconstructions, the loss curve, DDIM and DDPM (--no-ddpm: DDIM only) from the same noise
    with their sampling times, and (with --eval N) the FD of each sampler. -> {recon_mse, scale, eval}"""
    recon_mse = ld.vae_figure(vae, x_test, os.path.join(cfg.out, "vae_reconstructions.png"))
    curve = plots.smooth(checkpoints.load(os.path.join(cfg.out, "ckpt.pt"), "cpu")["losses"])
    plots.plot_curves(os.path.join(cfg.out, "loss.png"), {"latent DDPM": curve}, ylabel="eps-MSE, mean of 50 steps",
                      logy=axis_scale(v for _, v in curve) == "log", title="latent UNet: training loss")
    c = model.config
    shape = (cfg.n_samples, c["channels"], c["image_size"], c["image_size"])   # (N, c_z, h, w)
    z_T = torch.randn(shape, device=device, generator=common.generator(device, cfg.seed))
    samplers = {  # (name, steps): fn(z_T, generator) -> latents z0
        ("DDIM", cfg.ddim_steps): lambda z, g: ddpm.ddim_sample(model, z.shape, cfg.ddim_steps, x_T=z),
        ("DDPM", ddpm.T): lambda z, g: ddpm.ddpm_sample(model, z.shape, x_T=z, generator=g),
    }
    if not cfg.ddpm:
        del samplers["DDPM", ddpm.T]
    images, names, nrow = [], [], min(8, cfg.n_samples)
    for (name, steps), sample in samplers.items():
        g = common.generator(device, cfg.seed, stream=1)           # the DDPM steps' z, independent of z_T
        z0, seconds = report.timed(device, lambda: sample(z_T, g))
        x, decode_seconds = report.timed(device, lambda: ld.decode(vae, z0, scale))
        images.append(x[:len(x) // nrow * nrow])                   # whole rows of nrow, each named
        names += [f"{name}-{steps}"] * (len(x) // nrow)
        print(f"{name} {steps} steps: {seconds:.2f}s for {len(x)} latents, + {decode_seconds:.2f}s to decode them")
    plots.save_labelled_grid(torch.cat(images), os.path.join(cfg.out, "ddim_vs_ddpm.png" if cfg.ddpm else "ddim.png"),
                             nrow, names, "decoded latent samples: " + " vs ".join(dict.fromkeys(names)),
                             xlabel="from the same latent noise z_T, image for image" if cfg.ddpm else "")
    scored = []
    if cfg.eval:  # opt-in: FD in a cached classifier's features (see evaluate.py)
        from tools import evaluate
        ev = evaluate.Evaluator(cfg.dataset, cfg.data_dir, cfg.download, device)

        def decoding(sampler, z, g):                       # the latents a sampler makes, decoded to images
            return ld.decode(vae, sampler(z, g), scale)
        decoded = {k: functools.partial(decoding, f) for k, f in samplers.items()}
        scored = evaluate.score_sweep(ev, decoded, cfg.eval, shape[1:], device, os.path.join(cfg.out, "eval.md"),
                                      cfg.seed)
    return dict(recon_mse=recon_mse, scale=scale, eval=scored)


def main(argv=None) -> dict:
    """Train as latent_diffusion.py does (or load, --sample-only), then the figures above. -> make_figures' results"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    ld.check_config(cfg)
    common.check(cfg.eval != 1, "--eval must be 0 (off) or >= 2 samples, got 1")
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    model, ddpm, vae, scale, x_test = ld.train_or_load(cfg, device)
    results = make_figures(cfg, model, ddpm, vae, scale, x_test, device)
    print(f"figures in {cfg.out}/")
    return results


if __name__ == "__main__":
    main()
