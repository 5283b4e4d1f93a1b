"""The figures and measurements of a ddpm_mnist.py run (its main calls `make_figures`): the DDIM and
DDPM sample grids, and the answers to the course exercises' questions, each one figure:

- the test eps-MSE per timestep (loss_per_timestep.png; OUT/per_timestep.json holds it with the
  schedule's alpha_bar_t and log-SNR, for compare_runs.py),
- linear against spherical interpolation of noise (interpolation.png, `slerp`),
- stochastic against deterministic sampling from the same x_T (stochastic_vs_deterministic.png),
- DDIM's step count against quality and wall time, with a DDPM row (ddim_sweep.png/.md/_time.png),
- with --eval N, the FD-LeNet and class histogram of every sampler (eval.md, evaluate.py).
Conventions of ddpm_mnist.py: integer steps t = 0..T-1, images in [-1, 1], EMA weights sample.

Course exercises (each run writes OUT/per_timestep.json; compare_runs.py overlays several runs):
    python ddpm_mnist.py --base 32 --mults 1 2 4 --out runs/unet3          # 3 levels [32, 64, 128]
    python ddpm_mnist.py --base 64 --mults 1 2 4 8 --pad-to 32 --out runs/unet4  # 4 levels need 32x32
    python ddpm_mnist.py --schedule cosine --cosine-clip 0.95 --out runs/cos95
    python ddpm_mnist.py --predict x0 --out runs/x0  # or v; --time-embed concat for the other embedding
    python compare_runs.py --runs runs/ddpm_mnist runs/cos95 runs/x0 --out runs/compare
"""
from __future__ import annotations

import functools
import json
import math
import os

import torch

import common
from ddpm_mnist import DDPM, Config, load_data, pad


def crop(x, size: int):
    """The centre size x size of (N, C, H, W) images: undoes `pad`."""
    p = (x.shape[-1] - size) // 2
    return x[..., p:p + size, p:p + size]


@torch.no_grad()
def test_loss_per_timestep(model, ddpm: DDPM, x_test, bins: int = 20, max_images: int = 2000, seed: int = 0):
    """Test eps-MSE of the noise predictor `model` with one random t per image, averaged overall and
    within `bins` bins of t: -> (mean, [(bin centre t, mean), ...])."""
    g = common.generator(x_test.device, seed)
    x0 = x_test[:max_images]
    t = torch.randint(0, ddpm.T, (len(x0),), device=x0.device, generator=g)
    eps = torch.randn(x0.shape, device=x0.device, generator=g)
    per_image = torch.cat([((model(ddpm.q_sample(a, b, c), b).float() - c) ** 2).flatten(1).mean(1)
                           for a, b, c in zip(x0.split(256), t.split(256), eps.split(256))])
    idx = (t * bins // ddpm.T)
    curve = [((i + 0.5) * ddpm.T / bins, per_image[idx == i].mean().item()) for i in range(bins) if (idx == i).any()]
    return per_image.mean().item(), curve


def slerp(z0, z1, alpha):
    """Spherical interpolation: keeps interpolated Gaussian noise at the norm the model expects.
    Noise of d pixels lies on the shell ||z|| ~ sqrt(d); the linear midpoint of two independent
    draws has norm ~ sqrt(d / 2), a noise level the model never saw: the linear path leaves the shell."""
    omega = torch.acos((z0.flatten() @ z1.flatten() / (z0.norm() * z1.norm())).clamp(-1, 1))
    return (torch.sin((1 - alpha) * omega) * z0 + torch.sin(alpha * omega) * z1) / torch.sin(omega)


def make_figures(cfg: Config, model, ddpm: DDPM, device, shape) -> dict:
    """Cheap: test loss per timestep (+ OUT/per_timestep.json for compare_runs.py), DDIM grids, noise
    interpolation. Expensive, each timed and optional: the DDPM grids and stochastic_vs_deterministic.png
    (--no-ddpm-grid), the DDIM step sweep (--sweep-steps), --eval N. -> {test_loss, eval: score_sweep rows}"""
    out, n, T = cfg.out, cfg.n_samples, ddpm.T
    eps_model = ddpm.eps_from(model, cfg.clip)                   # every sampler below takes eps_theta
    gen = functools.partial(common.generator, device, cfg.seed, 1)   # the samplers' z: the same everywhere
    x_T = torch.randn((n, *shape), device=device, generator=common.generator(device, cfg.seed))
    x_raw, _ = load_data(cfg, device, train=False, padded=False)
    test_loss, per_t = test_loss_per_timestep(eps_model, ddpm, pad(x_raw, cfg.pad_to), seed=cfg.seed)
    print(f"test loss {test_loss:.4f} (eps-MSE, {min(len(x_raw), 2000)} test images)")
    common.plot_curves(os.path.join(out, "loss_per_timestep.png"), {"test loss": per_t}, xlabel="t",
                       title=f"test eps-MSE per t (mean {test_loss:.4f}); t = 0: clean data")
    ab = ddpm.alpha_bar.cpu().double()
    logsnr = [math.log(ab[int(t)] / (1 - ab[int(t)])) for t, _ in per_t]  # log(alpha_bar / (1 - alpha_bar)), bin centre
    record = dict(config={k: getattr(cfg, k) for k in ("schedule", "cosine_clip", "predict", "T", "time_embed")},
                  net=model.config, alpha_bar=ab.tolist(), t=[t for t, _ in per_t], logsnr=logsnr,
                  loss=[v for _, v in per_t], test_loss=test_loss, fd={})
    save_record(out, record)

    x, sec = common.timed(device, lambda: ddpm.ddim_sample(eps_model, x_T.shape, cfg.ddim_steps, cfg.eta, x_T=x_T,
                                                          generator=gen()))
    print(f"DDIM grid: {cfg.ddim_steps} steps x {n} images in {sec:.1f}s")
    common.save_grid(x[:16], os.path.join(out, f"ddim{cfg.ddim_steps}_4x4.png"), nrow=4)
    common.save_grid(x, os.path.join(out, f"ddim{cfg.ddim_steps}_8x8.png"), nrow=8)
    # row 1 spherical, row 2 linear: the linear midpoints leave the noise shell (see slerp)
    a = torch.linspace(0, 1, 10, device=device)
    z = torch.stack([slerp(x_T[0], x_T[1], w) for w in a] + [(1 - w) * x_T[0] + w * x_T[1] for w in a])
    print(f"interpolation: ||z|| = {x_T[0].norm():.1f} and {x_T[1].norm():.1f} at the ends, midpoint "
          f"{z[4:6].flatten(1).norm(dim=1).mean():.1f} spherical, {z[14:16].flatten(1).norm(dim=1).mean():.1f} linear")
    x = ddpm.ddim_sample(eps_model, z.shape, cfg.ddim_steps, x_T=z)
    common.save_grid(x, os.path.join(out, "interpolation.png"), nrow=10)
    if cfg.ddpm_grid:
        print(f"DDPM grid: {T} steps x {n} images (--no-ddpm-grid skips it) ...", flush=True)
        x, sec = common.timed(device, lambda: ddpm.ddpm_sample(eps_model, x_T.shape, cfg.sigma, x_T=x_T,
                                                              generator=gen()))
        print(f"DDPM grid: {T} steps x {n} images in {sec:.1f}s")
        common.save_grid(x[:16], os.path.join(out, "ddpm_4x4.png"), nrow=4)
        common.save_grid(x, os.path.join(out, "ddpm_8x8.png"), nrow=8)
        # 3 runs from the same 4 x_T: DDPM draws fresh noise z at every step (the 3 copies in one batch
        # draw different z, as 3 seeds would), DDIM with eta = 0 has none: the same digit each run.
        k = min(4, n)                                    # images per run
        print(f"stochastic vs deterministic: DDPM {T} steps x {3 * k} images ...", flush=True)
        stoch = ddpm.ddpm_sample(eps_model, (3 * k, *shape), cfg.sigma, x_T=x_T[:k].repeat(3, 1, 1, 1), generator=gen())
        det = [ddpm.ddim_sample(eps_model, (k, *shape), cfg.ddim_steps, 0.0, x_T=x_T[:k], generator=gen())
               for r in range(3)]
        print(f"  DDPM runs differ by {(stoch[:k] - stoch[k:2 * k]).abs().mean():.3f} per pixel, "
              f"DDIM runs by {(det[0] - det[1]).abs().mean():.3f}")
        common.save_grid(torch.cat([torch.cat([stoch[k * r:k * (r + 1)], det[r]]) for r in range(3)]),
                         os.path.join(out, "stochastic_vs_deterministic.png"), nrow=2 * k)

    sweep = sorted({s for s in cfg.sweep_steps if 1 <= s <= T})
    if sweep:  # the same 8 noise images through each step count: one row each, and its wall time
        print(f"DDIM sweep: {' + '.join(map(str, sweep))} steps x 8 images (--sweep-steps sets them) ...", flush=True)
        rows, times = [], []
        for steps in sweep:
            x, sec = common.timed(device, lambda: ddpm.ddim_sample(eps_model, x_T[:8].shape, steps, x_T=x_T[:8]))
            rows.append(x)
            times.append((steps, sec))
            print(f"DDIM {steps:4d} steps: {sec:.2f}s per batch of 8")
        table = [["DDIM", s, sec] for s, sec in times]
        curves = {"DDIM": times}
        if cfg.ddpm_grid:  # the last row: DDPM through all T steps from the same 8 x_T
            x, sec = common.timed(device, lambda: ddpm.ddpm_sample(eps_model, x_T[:8].shape, cfg.sigma, x_T=x_T[:8],
                                                                  generator=gen()))
            rows.append(x)
            table.append(["DDPM", T, sec])
            curves["DDPM"] = [(T, sec)]
            print(f"DDPM {T:4d} steps: {sec:.2f}s per batch of 8")
        common.save_grid(torch.cat(rows), os.path.join(out, "ddim_sweep.png"), nrow=8)
        common.write_table(os.path.join(out, "ddim_sweep.md"), ["sampler", "steps", "seconds per batch of 8"], table)
        common.plot_curves(os.path.join(out, "ddim_sweep_time.png"), curves, xlabel="steps",
                           ylabel="seconds per batch", title="sampling steps vs wall time (8 images)")
    rows = []
    if cfg.eval:  # opt-in: the same sweep, measured (FD in a cached classifier's features, see evaluate.py)
        import evaluate
        ev = evaluate.Evaluator(cfg.dataset, cfg.data_dir, cfg.download, device,
                                image_size=cfg.image_size or None, channels=cfg.channels)
        size = x_raw.shape[-1]  # scored without the --pad-to border

        def ddpm_all(z, g):
            return crop(ddpm.ddpm_sample(eps_model, z.shape, cfg.sigma, x_T=z, generator=g), size)

        def ddim(steps, z, g):
            return crop(ddpm.ddim_sample(eps_model, z.shape, steps, cfg.eta, x_T=z, generator=g), size)
        samplers = {("DDPM", T): ddpm_all} if cfg.ddpm_grid else {}
        samplers |= {("DDIM", s): functools.partial(ddim, s) for s in sweep}
        rows = evaluate.score_sweep(ev, samplers, cfg.eval, shape, device, os.path.join(out, "eval.md"), cfg.seed)
        save_record(out, record | {"fd": {f"{r['sampler']} {r['steps']}": r["fd"] for r in rows}})
    return dict(test_loss=test_loss, eval=rows)


def save_record(out: str, record: dict) -> None:
    """OUT/per_timestep.json: what compare_runs.py overlays (alpha_bar, per-timestep loss, FD)."""
    with open(os.path.join(out, "per_timestep.json"), "w") as f:
        json.dump(record, f)
