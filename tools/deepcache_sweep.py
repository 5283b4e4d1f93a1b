"""DeepCache's speed and quality over step counts S x cache intervals N (the measurements of deepcache.py).

For every S in --sweep-steps and every N <= S in --sweep-intervals (an N > S has the single full step
of N = S: nothing new is cached), from the same noise: the measured speedup over the plain sampler
and the one FLOPs predict, S / (K + (S - K) f), and MSE, PSNR and SSIM against the uncached samples
(PSNR also for the non-uniform schedule of full steps); with --eval, the FD of evaluate.py. The
measured speedup can differ from the FLOPs' either way: launch overheads on a GPU make small partial
steps cost more than their FLOPs, while on a CPU the skipped deep layers (attention) cost more.

Run:
    python -m tools.deepcache_sweep                    # ddim base; step counts 10 50 100
    python -m tools.deepcache_sweep --base rf          # the reflowed flow; step counts 1 10 100
    python -m tools.deepcache_sweep --sweep-steps 100 --sweep-intervals 1 2 5 10 20
    python -m tools.deepcache_sweep --eval 2000        # + FD of evaluate.py per setting (2000 samples each)
Writes to runs/deepcache/BASE: speedup.png, quality.png (MSE, PSNR, SSIM), tradeoff.png (speedup vs
SSIM, or FD with --eval), grid_steps{S}.png (a row of samples per interval, for each S) and the table
speed_quality.md.
"""
from __future__ import annotations

import functools
import os
import statistics
from dataclasses import dataclass, field

import torch

import common
import plots
import deepcache as dc
from tools import report

SWEEP_STEPS = {"ddim": (10, 50, 100), "rf": (1, 10, 100)}


@dataclass
class Config:
    base: str = field(default="ddim", metadata={"choices": ["ddim", "rf"], "help": "the model and sampler: "
                      "ddpm_mnist.py's UNet with DDIM, or rectified_flow.py's flow with Euler steps"})
    base_ckpt: str = field(default="", metadata={"help": f"its checkpoint; default {dc.DEFAULT_BASE['ddim']} (ddim, "
                           f"trained first when missing) or {dc.DEFAULT_BASE['rf']} (rf: a pixel-space flow)"})
    data_dir: str = field(default="data", metadata={"help": "datasets root (for the default base, and --eval)"})
    download: bool = True
    branch: int = field(default=1, metadata={"help": "skip branch m of the cached steps (1 = shallowest)", "min": 1})
    power: float = field(default=2.0, metadata={"help": "non-uniform: full steps at S (k/K)^power", "min": 1.0})
    sweep_steps: tuple[int, ...] = field(default=(), metadata={"min": 1, "help": "step counts S of the sweep; "
                                         f"default {SWEEP_STEPS['ddim']} (ddim), {SWEEP_STEPS['rf']} (rf)"})
    sweep_intervals: tuple[int, ...] = field(default=(1, 2, 3, 5, 10, 20, 50, 100), metadata={
        "min": 1, "help": "intervals N of the sweep; those > the step count are left out (nothing new to cache)"})
    batch_size: int = field(default=256, metadata={"help": "images per timed sampling run", "min": 1})
    warmup: int = field(default=2, metadata={"help": "untimed rounds before timing", "min": 0})
    repeats: int = field(default=7, metadata={"help": "timed rounds (the median is reported); a round runs "
                         "batch-size images through the plain sampler and every interval", "min": 1})
    eval: int = field(default=0, metadata={"help": "FD of evaluate.py over N samples per (steps, interval); "
                      "0 = off; costs N x sum(sweep steps) x len(sweep intervals) cached UNet calls", "min": 0})
    out: str = field(default="", metadata={"help": "default runs/deepcache/BASE"})
    seed: int = 0
    device: str = "auto"


def sweep(cfg: Config, unet, sample, device, shape, title: str, evaluator=None) -> list[dict]:
    """Speed and quality for every (steps S, interval N <= S), and OUT/grid_steps{S}.png: 8 samples
    per interval, one row each. Timings: each round runs every interval once, in alternating order
    (so slow drifts of the machine, and the position in a round, hit all alike), GPU synchronised
    around each run, `warmup` rounds discarded, the median of `repeats` rounds kept. With an
    evaluate.py `evaluator`, also the FD of cfg.eval cached samples."""
    cache = dc.DeepCache(unet, cfg.branch)
    f = dc.flops_fraction(cache, (cfg.batch_size, *shape), device)
    print(f"a cached step (branch {cfg.branch}) costs f = {f:.3f} of a full step's FLOPs")
    x_T = torch.randn((cfg.batch_size, *shape), device=device, generator=common.generator(device, cfg.seed))
    rows = []
    for S in cfg.sweep_steps:
        intervals = [N for N in cfg.sweep_intervals if N <= S]
        if len(intervals) < len(cfg.sweep_intervals):          # N > S: one full step, as N = S
            print(f"{S} steps: intervals {', '.join(str(N) for N in cfg.sweep_intervals if N > S)} left out "
                  f"(longer than the run: one full step, like interval {S}; nothing new is cached)")
        runs = {0: functools.partial(sample, unet, x_T, S)}     # 0 = the plain sampler
        runs.update({N: functools.partial(dc.cached_sample, sample, cache, x_T, S, N) for N in intervals})
        times, out = {k: [] for k in runs}, {}
        for r in common.progress(range(cfg.warmup + cfg.repeats), f"{S} steps, timing {len(runs)} samplers"):
            for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                out[k], seconds = report.timed(device, runs[k])
                if r >= cfg.warmup:
                    times[k].append(seconds)
        t_plain = statistics.median(times[0])
        grid_figure([out[N][:8] for N in intervals], [f"N = {N}" + (" (plain)" if N == 1 else "") for N in intervals],
                    f"DeepCache on the {title}, {S} steps: a row per cache interval N, a column per noise x_T",
                    os.path.join(cfg.out, f"grid_steps{S}.png"))
        for N in intervals:
            K = len(dc.full_steps(S, N))
            x_nonuniform = dc.cached_sample(sample, cache, x_T, S, N, "nonuniform", cfg.power)
            row = dict(steps=S, interval=N, K=K, ms=1e3 * statistics.median(times[N]),
                       speedup=t_plain / statistics.median(times[N]), theory=S / (K + (S - K) * f),
                       **dc.quality(out[N], out[0]), psnr_nonuniform=dc.quality(x_nonuniform, out[0])["psnr"])
            if evaluator is not None:
                x = torch.cat([dc.cached_sample(sample, cache, z, S, N) for z in common.progress(
                    eval_noise(cfg, shape, device), f"{S} steps, interval {N}: {cfg.eval} samples for FD")])
                row["fd"] = evaluator.fd(x)
            rows.append(row)
            print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return rows


def eval_noise(cfg: Config, shape, device):
    """The same cfg.eval noise images for every setting, in batches of cfg.batch_size."""
    g = common.generator(device, cfg.seed + 1)
    return [torch.randn((min(cfg.batch_size, cfg.eval - i), *shape), device=device, generator=g)
            for i in range(0, cfg.eval, cfg.batch_size)]


# ----------------------------------------------------------------------------- figures


def grid_figure(rows: list[torch.Tensor], labels: list[str], title: str, path: str) -> None:
    """Rows of images in [-1, 1], each labelled on the left, their columns numbered on top."""
    from torchvision.utils import make_grid

    n, (H, W) = len(rows[0]), rows[0].shape[-2:]
    img = make_grid(((torch.cat(rows).float().cpu() + 1) / 2).clamp(0, 1), nrow=n, padding=2, pad_value=1)
    fig, ax = plots.figure(figsize=(1.5 + 0.7 * n, 0.8 + 0.7 * len(rows)))
    ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_xticks([2 + (W + 2) * j + W / 2 for j in range(n)], [f"x_T {j + 1}" for j in range(n)], fontsize=7)
    ax.set_yticks([2 + (H + 2) * i + H / 2 for i in range(len(rows))], labels, fontsize=8)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=9)
    plots.save_figure(fig, path, grid=False, legend=0)


def write_table(rows: list[dict], path: str) -> None:
    """The sweep as a markdown table (ready for the README)."""
    header = ["steps", "interval", "full steps", "ms / run", "speedup", "theory", "MSE", "PSNR dB", "SSIM",
              "PSNR non-uniform"] + (["FD (evaluate.py)"] if "fd" in rows[0] else [])
    report.write_table(path, header, [
        [r["steps"], r["interval"], r["K"], f"{r['ms']:.1f}", f"{r['speedup']:.2f}x", f"{r['theory']:.2f}x",
         f"{r['mse']:.2e}", f"{r['psnr']:.1f}", f"{r['ssim']:.4f}", f"{r['psnr_nonuniform']:.1f}"]
        + ([f"{r['fd']:.2f}"] if "fd" in r else []) for r in rows])


def plot_sweep(rows: list[dict], out: str, title: str) -> None:
    """speedup.png (measured, solid; theory, dashed), quality.png (MSE, PSNR, SSIM) and tradeoff.png,
    each titled with the base and its sampler; a colour per step count, a marker at every measured point."""
    steps = sorted({r["steps"] for r in rows})
    by = {S: [r for r in rows if r["steps"] == S] for S in steps}
    intervals = sorted({r["interval"] for r in rows})
    fig, ax = plots.figure(figsize=(6, 4))
    for j, S in enumerate(steps):
        ax.plot([r["interval"] for r in by[S]], [r["speedup"] for r in by[S]], "o-", color=f"C{j}", label=f"{S} steps")
        ax.plot([r["interval"] for r in by[S]], [r["theory"] for r in by[S]], "x--", color=f"C{j}", alpha=0.6)
    ax.set(ylabel="speedup over the plain sampler", title=f"DeepCache on the {title}: speedup\n"
           "(solid: measured; dashed: if time went with FLOPs)")
    figure_done(fig, ax, os.path.join(out, "speedup.png"), intervals=intervals)

    fig, axes = plots.figure(1, 3, figsize=(15, 4))
    for j, S in enumerate(steps):
        axes[2].plot([r["interval"] for r in by[S]], [r["ssim"] for r in by[S]], "o-", color=f"C{j}", label=f"{S} steps")
        inexact = [r for r in by[S] if r["mse"] > 0]                     # interval 1 is exact: MSE 0, PSNR inf
        if inexact:                                                      # (1 step has only interval 1)
            N = [r["interval"] for r in inexact]
            axes[0].plot(N, [r["mse"] for r in inexact], "o-", color=f"C{j}", label=f"{S} steps")
            axes[1].plot(N, [r["psnr"] for r in inexact], "o-", color=f"C{j}", label=f"{S} steps")
            axes[1].plot(N, [r["psnr_nonuniform"] for r in inexact], "x--", color=f"C{j}", alpha=0.6)
    axes[0].set(ylabel="MSE vs uncached (interval 1: 0, not drawn)", yscale="log")
    axes[1].set(ylabel="PSNR vs uncached, dB (dashed: non-uniform)")
    axes[2].set(ylabel="SSIM vs uncached")
    fig.suptitle(f"DeepCache on the {title}: quality against the uncached samples from the same noise")
    figure_done(fig, axes, os.path.join(out, "quality.png"), intervals=intervals)

    fig, ax = plots.figure(figsize=(6, 4))
    key, label = ("fd", "FD (lower is better)") if "fd" in rows[0] else ("ssim", "SSIM vs uncached")
    for j, S in enumerate(steps):
        ax.plot([r["speedup"] for r in by[S]], [r[key] for r in by[S]], "o", color=f"C{j}", label=f"{S} steps")
        for r in by[S]:
            ax.annotate(f"N={r['interval']}", (r["speedup"], r[key]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set(xlabel="measured speedup", ylabel=label, title=f"DeepCache on the {title}: speed vs quality")
    figure_done(fig, ax, os.path.join(out, "tradeoff.png"))


def figure_done(fig, axes, path, intervals=None) -> None:
    """A log x axis labelled with the intervals on every panel (if given), then plots.save_figure."""
    for a in getattr(axes, "flat", [axes]) if intervals else []:
        a.set_xscale("log")
        a.set_xticks(intervals, [str(i) for i in intervals])
        a.minorticks_off()
        a.set_xlabel("cache interval N")
    plots.save_figure(fig, path)


def main(argv=None) -> dict:
    """-> {sweep: the rows of speed_quality.md}"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    common.check(cfg.eval != 1, "--eval must be 0 (off) or >= 2 samples: a Frechet distance needs two")
    cfg.base_ckpt = cfg.base_ckpt or dc.DEFAULT_BASE[cfg.base]
    cfg.sweep_steps = cfg.sweep_steps or SWEEP_STEPS[cfg.base]
    cfg.out = cfg.out or os.path.join("runs/deepcache", cfg.base)
    common.prepare_out(cfg.out)
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    common.seed_everything(cfg.seed)
    unet, sample, state, T = dc.load_base(cfg.base, cfg.base_ckpt, device, cfg.data_dir, cfg.download)
    dc.DeepCache(unet, cfg.branch)                             # checks --branch against this UNet
    common.check(max(cfg.sweep_steps) <= T, f"--sweep-steps must be <= T = {T} of the base model "
                 f"'{cfg.base_ckpt}', got {max(cfg.sweep_steps)}")
    c = unet.config
    shape = (c["channels"], c["image_size"], c["image_size"])
    evaluator = None
    if cfg.eval:
        from tools import evaluate                                        # the FD's classifier: trained once, then cached
        evaluator = evaluate.Evaluator(state["config"].get("dataset", "mnist"), data_dir=cfg.data_dir,
                                       download=cfg.download, device=device, image_size=shape[-1], channels=shape[0])
    rows = sweep(cfg, unet, sample, device, shape, dc.BASE_NAME[cfg.base], evaluator)
    write_table(rows, os.path.join(cfg.out, "speed_quality.md"))
    plot_sweep(rows, cfg.out, dc.BASE_NAME[cfg.base])
    print(f"figures in {cfg.out}/")
    return dict(sweep=rows)


if __name__ == "__main__":
    main()
