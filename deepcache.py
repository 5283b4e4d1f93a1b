"""DeepCache (Ma et al., 2023): faster sampling by reusing a UNet's deep features across steps.

Between two neighbouring sampling steps the *deep* features of a diffusion UNet barely change;
only the shallow layers near the input and the output have much new to say. DeepCache therefore
splits the UNet at a skip connection, the branch b (1 = the shallowest skip, up to the number of
ResBlocks in the encoder):
    full step:    run the whole UNet, and cache F = the features entering the up-block that
                  consumes skip b (everything computed below that skip, upsampled),
    cached step:  run only the shallow branch: the input conv and the first b encoder blocks
                  (giving skips 1..b), then the decoder from that up-block on, with F from the cache.
With N = --interval, a full step is followed by N - 1 cached steps. With S sampling steps there are
K = ceil(S / N) full steps, at i = 0, N, 2N, ... (uniform), or at i_k = S (k / K)^p with p > 1
(non-uniform: denser near the start, where x_t is noisiest and changes most). If a cached step
costs a fraction f of a full one (counted with torch's FlopCounterMode), and time went with FLOPs,
    speedup_theory = S / (K + (S - K) f);
the measured speedup can differ either way: launch overheads on a GPU make small cached steps cost
more than their FLOPs, while on a CPU the skipped deep layers (attention) cost more than theirs.
The cache lives in the `DeepCache` wrapper, which the sampler calls as its network `model(x, t)`;
`cached_sample` resets it at the start of every run, so no features leak from one run (a previous
batch of noise) into the next: the "stale cache" bug.

Two bases (--base), both deterministic, so cached and uncached samples from the same noise can be
compared pixel for pixel (MSE, PSNR, SSIM):
    ddim: the UNet of ddpm_mnist.py with its DDIM sampler (eta = 0); it embeds the integer step t;
    rf:   the VelocityUNet of rectified_flow.py with its Euler sampler x_{t+dt} = x_t + dt v(x_t, t),
          t in [0, 1] from noise (t = 0) to data (t = 1); it embeds 1000 t, so the wrapper does too.
`DeepCache` only needs the UNet's blocks, not the sampler: any sampler that calls its network once
per step can use it (reset it with `full_steps`, then pass it as the network).
With S steps, an interval N > S has the single full step of N = S: it caches nothing new, so the
sweep leaves it out. With S = 1 there is nothing to reuse at all: caching needs steps to share.

Run:
    python deepcache.py                          # ddim base: runs/ddpm_mnist/ckpt.pt (trained first if missing)
    python deepcache.py --base rf                # rf base: runs/rectified_flow/pixel/flow2.pt (the reflowed
                                                 #   flow; train it with `python rectified_flow.py`)
    python deepcache.py --interval 3 --branch 2 --cache-schedule nonuniform
    python deepcache.py --eval 2000              # + FD of evaluate.py per setting (2000 samples each)
    python deepcache.py --no-analysis            # only the sample grids, no timed sweep
Figures in runs/deepcache/BASE: samples.png (cached) beside samples_plain.png, speedup.png,
quality.png (MSE, PSNR, SSIM), tradeoff.png (speedup vs SSIM), grid_steps{S}.png (one row of 8
samples per interval, for each sweep step count S) and the table speed_quality.md.
"""
from __future__ import annotations

import functools
import math
import os
import statistics
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import common
import ddpm_mnist
import rectified_flow as rf

DEFAULT_BASE = {"ddim": ddpm_mnist.DEFAULT_CKPT, "rf": "runs/rectified_flow/pixel/flow2.pt"}
SWEEP_STEPS = {"ddim": (10, 50, 100), "rf": (1, 10, 100)}


@dataclass
class Config:
    base: str = field(default="ddim", metadata={"choices": ["ddim", "rf"], "help": "the model and sampler to "
                      "accelerate: ddpm_mnist.py's UNet with DDIM, or rectified_flow.py's flow with Euler steps"})
    base_ckpt: str = field(default="", metadata={"help": f"its checkpoint; default {DEFAULT_BASE['ddim']} (ddim, "
                           f"trained first when missing) or {DEFAULT_BASE['rf']} (rf: a pixel-space flow)"})
    data_dir: str = field(default="data", metadata={"help": "datasets root (for the default base, and --eval)"})
    download: bool = True
    interval: int = field(default=3, metadata={"help": "N: one full UNet step, then N - 1 cached steps", "min": 1})
    branch: int = field(default=1, metadata={
        "help": "skip connection where the shallow branch rejoins (1 = shallowest, fastest)", "min": 1})
    cache_schedule: str = field(default="uniform", metadata={"choices": ["uniform", "nonuniform"]})
    power: float = field(default=2.0, metadata={"help": "non-uniform: full steps at S (k/K)^power", "min": 1.0})
    steps: int = field(default=50, metadata={"help": "sampling steps for samples.png", "min": 1})
    n_samples: int = field(default=64, metadata={"help": "images in samples.png", "min": 1})
    analysis: bool = field(default=True, metadata={"help": "the timed sweep over steps x intervals: (warmup + "
                           "repeats) x (1 + len(sweep intervals)) runs of batch-size images per sweep step count"})
    sweep_steps: tuple[int, ...] = field(default=(), metadata={"min": 1, "help": "step counts of the sweep; "
                                         f"default {SWEEP_STEPS['ddim']} (ddim), {SWEEP_STEPS['rf']} (rf)"})
    sweep_intervals: tuple[int, ...] = field(default=(1, 2, 3, 5, 10, 20, 50, 100), metadata={
        "min": 1, "help": "intervals N of the sweep; those > the step count are left out (nothing new to cache)"})
    batch_size: int = field(default=256, metadata={"help": "images per timed sampling run", "min": 1})
    warmup: int = field(default=2, metadata={"help": "untimed rounds before timing", "min": 0})
    repeats: int = field(default=7, metadata={"help": "timed rounds (the median is reported)", "min": 1})
    eval: int = field(default=0, metadata={"help": "FD of evaluate.py over N samples per (steps, interval); "
                      "0 = off; costs N x sum(sweep steps) x len(sweep intervals) cached UNet calls", "min": 0})
    out: str = field(default="", metadata={"help": "default runs/deepcache/BASE"})
    seed: int = 0
    device: str = "auto"


def check_config(cfg: Config) -> None:
    """The checks that "min" cannot make (--branch and the step counts are checked against the base
    model once it is loaded: by DeepCache and in main)."""
    common.check(cfg.eval != 1, "--eval must be 0 (off) or >= 2 samples: a Frechet distance needs two")
    common.check(cfg.analysis or not cfg.eval, "--eval scores the settings of the sweep; drop --no-analysis")


# ----------------------------------------------------------------------------- the cached network


class DeepCache(nn.Module):
    """model(x, t) for a sampler: the UNet whole at the full steps, its shallow branch in between.

    `reset(full_steps)` starts a run: step counter 0, empty cache, and the indices of the steps
    that run the whole UNet. Each call is one sampling step."""

    def __init__(self, unet: ddpm_mnist.UNet, branch: int):
        super().__init__()
        # the time the UNet embeds: DDPM's integer step t as it is; rectified_flow.py's VelocityUNet
        # takes t in [0, 1] and embeds 1000 t (its forward does it, and this wrapper skips that forward)
        self.time_scale = 1000 if isinstance(unet, rf.VelocityUNet) else 1
        n_skips = sum(len(level.blocks) for level in unet.downs)
        common.check(1 <= branch <= n_skips, f"--branch {branch} is not in this UNet: it has {n_skips} "
                     f"skip connections, so choose 1 (shallowest) to {n_skips} (deepest)")
        self.unet, self.branch = unet, branch
        self.dec_start = n_skips - branch                    # the up-block that consumes skip b
        self.reset([0])

    def reset(self, full_steps) -> None:
        self.step, self.cache, self.full_steps = 0, None, set(full_steps)

    def forward(self, x, t):                                 # x (N, C, H, W), t (N,) -> eps or v
        u = self.unet
        full = self.cache is None or self.step in self.full_steps
        self.step += 1
        emb = u.embed_time(t * self.time_scale)
        h, hs = u.encode(u.inc(x), emb, depth=None if full else self.branch)   # skips, shallowest first
        if full:                                             # F: (N, C_F, H_F, W_F), the deep features
            self.cache = u.decode(h, hs, emb, stop=self.dec_start)
        return u.decode(self.cache, hs[:self.branch], emb, start=self.dec_start)   # consumes skips b..1


def full_steps(S: int, interval: int, schedule: str = "uniform", power: float = 2.0) -> list[int]:
    """Indices 0..S-1 of the sampling steps that run the whole UNet: K = ceil(S / interval) of them."""
    common.check(interval >= 1, f"--interval must be >= 1 (1 = no caching), got {interval}")
    if schedule == "uniform":
        return list(range(0, S, interval))
    K, idx = math.ceil(S / interval), []
    for k in range(K):                                        # i_k = S (k/K)^p, kept strictly increasing
        idx.append(max(int(S * (k / K) ** power), idx[-1] + 1) if idx else 0)
    return idx


@torch.no_grad()
def cached_sample(sample, cache: DeepCache, x_T, steps: int, interval: int, schedule: str = "uniform",
                  power: float = 2.0):
    """The base's sampler `sample(model, x_T, steps)` run on the DeepCache network, reset first, every run."""
    cache.reset(full_steps(steps, interval, schedule, power))
    return sample(cache, x_T, steps)


@torch.no_grad()
def flops_fraction(cache: DeepCache, shape, device) -> float:
    """f = FLOPs of a cached step / FLOPs of a full step (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, flops = torch.randn(shape, device=device), torch.zeros(shape[0], dtype=torch.long, device=device), []
    cache.reset([0])                                          # call 1 is full, call 2 cached
    for _ in range(2):
        with FlopCounterMode(display=False) as counter:
            cache(x, t)
        flops.append(counter.get_total_flops())
    return flops[1] / flops[0]


# ----------------------------------------------------------------------------- the two bases


def load_base(base: str, path: str, device, data_dir: str, download: bool):
    """-> (the UNet, its deterministic sampler sample(model, x_T, steps), the checkpoint, the most steps).
    ddim: ddpm_mnist.py's EMA UNet (the default path is trained first when missing) with DDIM, eta = 0;
    rf: rectified_flow.py's EMA VelocityUNet with Euler steps, pixel space only (latents are no images)."""
    if base == "ddim":
        path = ddpm_mnist.ensure_trained(path, device, data_dir=data_dir, download=download)
        unet, ddpm, state = ddpm_mnist.load_trained(path, device)   # one line if it is another script's file

        def sample(model, x_T, S):                                   # DDIM, eta = 0, S steps, from x_T
            return ddpm.ddim_sample(ddpm.eps_from(model, clip=True), x_T.shape, S, x_T=x_T)
        return unet, sample, state, ddpm.T                           # (clipped x0_hat: ddpm_mnist's default)
    state = common.load_checkpoint(path, device, rf.KIND, keys=("net", "ema", "config"), hint="train one with "
                                   "`python rectified_flow.py` (it writes runs/rectified_flow/pixel/flow1.pt and flow2.pt)")
    common.check(state["config"].get("space") == "pixel", f"'{path}' is a latent-space flow: its samples are "
                 "VAE latents, not images; pass a pixel-space one (`python rectified_flow.py` trains it)")
    flow = rf.VelocityUNet(**state["net"]).to(device)
    common.load_weights(flow, state["ema"], path)
    return flow.eval(), rf.euler_sample, state, math.inf


# ----------------------------------------------------------------------------- analysis


def quality(x, ref) -> dict:
    """MSE in [-1, 1], and torchmetrics' PSNR and SSIM on [0, 1] images, against the uncached samples."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = (x.clamp(-1, 1) + 1) / 2, (ref.clamp(-1, 1) + 1) / 2
    return dict(mse=((x - ref) ** 2).mean().item(),
                psnr=peak_signal_noise_ratio(a, b, data_range=1.0).item(),
                ssim=structural_similarity_index_measure(a, b, data_range=1.0).item())


def sweep(cfg: Config, unet, sample, device, shape, evaluator=None) -> list[dict]:
    """Speed and quality for every (steps S, interval N <= S), and OUT/grid_steps{S}.png: 8 samples
    per interval, one row each. Timings: each round runs every interval once, in alternating order
    (so slow drifts of the machine, and the position in a round, hit all alike), GPU synchronised
    around each run, `warmup` rounds discarded, the median of `repeats` rounds kept. With an
    evaluate.py `evaluator`, also the FD of cfg.eval cached samples."""
    cache = DeepCache(unet, cfg.branch)
    f = flops_fraction(cache, (cfg.batch_size, *shape), device)
    print(f"a cached step (branch {cfg.branch}) costs f = {f:.3f} of a full step's FLOPs")
    x_T = torch.randn((cfg.batch_size, *shape), device=device, generator=common.generator(device, cfg.seed))
    rows = []
    for S in cfg.sweep_steps:
        intervals = [N for N in cfg.sweep_intervals if N <= S]
        if len(intervals) < len(cfg.sweep_intervals):          # N > S: one full step, as N = S
            print(f"{S} steps: intervals {', '.join(str(N) for N in cfg.sweep_intervals if N > S)} left out "
                  f"(longer than the run: one full step, like interval {S}; nothing new is cached)")
        runs = {0: functools.partial(sample, unet, x_T, S)}     # 0 = the plain sampler
        runs.update({N: functools.partial(cached_sample, sample, cache, x_T, S, N) for N in intervals})
        times, out = {k: [] for k in runs}, {}
        for r in common.progress(range(cfg.warmup + cfg.repeats), f"{S} steps, timing {len(runs)} samplers"):
            for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                out[k], seconds = common.timed(device, runs[k])
                if r >= cfg.warmup:
                    times[k].append(seconds)
        t_plain = statistics.median(times[0])
        common.save_grid(torch.cat([out[N][:8] for N in intervals]), os.path.join(cfg.out, f"grid_steps{S}.png"),
                         nrow=min(8, len(x_T)))
        for N in intervals:
            K = len(full_steps(S, N))
            x_nonuniform = cached_sample(sample, cache, x_T, S, N, "nonuniform", cfg.power)
            row = dict(steps=S, interval=N, K=K, ms=1e3 * statistics.median(times[N]),
                       speedup=t_plain / statistics.median(times[N]), theory=S / (K + (S - K) * f),
                       **quality(out[N], out[0]), psnr_nonuniform=quality(x_nonuniform, out[0])["psnr"])
            if evaluator is not None:
                x = torch.cat([cached_sample(sample, cache, z, S, N) for z in common.progress(
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


def write_table(rows: list[dict], path: str) -> None:
    """The sweep as a markdown table (ready for the README)."""
    header = ["steps", "interval", "full steps", "ms / run", "speedup", "theory", "MSE", "PSNR dB", "SSIM",
              "PSNR non-uniform"] + (["FD (evaluate.py)"] if "fd" in rows[0] else [])
    common.write_table(path, header, [
        [r["steps"], r["interval"], r["K"], f"{r['ms']:.1f}", f"{r['speedup']:.2f}x", f"{r['theory']:.2f}x",
         f"{r['mse']:.2e}", f"{r['psnr']:.1f}", f"{r['ssim']:.4f}", f"{r['psnr_nonuniform']:.1f}"]
        + ([f"{r['fd']:.2f}"] if "fd" in r else []) for r in rows])


def plot_sweep(rows: list[dict], out: str) -> None:
    """speedup.png (measured, solid; theory, dashed), quality.png (MSE, PSNR, SSIM) and tradeoff.png."""
    steps = sorted({r["steps"] for r in rows})
    by = {S: [r for r in rows if r["steps"] == S] for S in steps}
    intervals = sorted({r["interval"] for r in rows})
    fig, ax = common.figure(figsize=(6, 4))
    for j, S in enumerate(steps):
        ax.plot([r["interval"] for r in by[S]], [r["speedup"] for r in by[S]], "o-", color=f"C{j}", label=f"{S} steps")
        ax.plot([r["interval"] for r in by[S]], [r["theory"] for r in by[S]], "--", color=f"C{j}", alpha=0.6)
    ax.set(ylabel="speedup over the plain sampler", title="DeepCache speedup (dashed: if time went with FLOPs)")
    figure_done(fig, ax, os.path.join(out, "speedup.png"), intervals=intervals)

    fig, axes = common.figure(1, 3, figsize=(15, 4))
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
    figure_done(fig, axes, os.path.join(out, "quality.png"), intervals=intervals)

    fig, ax = common.figure(figsize=(6, 4))
    key, label = ("fd", "FD (lower is better)") if "fd" in rows[0] else ("ssim", "SSIM vs uncached")
    for j, S in enumerate(steps):
        ax.scatter([r["speedup"] for r in by[S]], [r[key] for r in by[S]], color=f"C{j}", label=f"{S} steps")
        for r in by[S]:
            ax.annotate(f"N={r['interval']}", (r["speedup"], r[key]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set(xlabel="measured speedup", ylabel=label, title="DeepCache: speed vs quality")
    figure_done(fig, ax, os.path.join(out, "tradeoff.png"))


def figure_done(fig, axes, path, intervals=None) -> None:
    """A log x axis labelled with the intervals on every panel (if given), then common.save_figure."""
    for a in getattr(axes, "flat", [axes]) if intervals else []:
        a.set_xscale("log")
        a.set_xticks(intervals, [str(i) for i in intervals])
        a.minorticks_off()
        a.set_xlabel("cache interval N")
    common.save_figure(fig, path)


def main(argv=None) -> dict:
    """-> {psnr, ssim: samples.png against samples_plain.png, sweep: the rows of speed_quality.md}"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    cfg.base_ckpt = cfg.base_ckpt or DEFAULT_BASE[cfg.base]
    cfg.sweep_steps = cfg.sweep_steps or SWEEP_STEPS[cfg.base]
    cfg.out = cfg.out or os.path.join("runs/deepcache", cfg.base)
    common.prepare_out(cfg.out)
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    common.seed_everything(cfg.seed)
    unet, sample, state, T = load_base(cfg.base, cfg.base_ckpt, device, cfg.data_dir, cfg.download)
    cache = DeepCache(unet, cfg.branch)                        # checks --branch against this UNet
    S_max = max((cfg.steps, *(cfg.sweep_steps if cfg.analysis else ())))
    common.check(S_max <= T, f"--steps and --sweep-steps must be <= T = {T} of the base model "
                 f"'{cfg.base_ckpt}', got {S_max}")
    c = unet.config
    shape = (c["channels"], c["image_size"], c["image_size"])

    gen = common.generator(device, cfg.seed)
    x_T = torch.randn((cfg.n_samples, *shape), device=device, generator=gen)
    plain = sample(unet, x_T, cfg.steps)
    x = cached_sample(sample, cache, x_T, cfg.steps, cfg.interval, cfg.cache_schedule, cfg.power)
    common.save_grid(plain, os.path.join(cfg.out, "samples_plain.png"))
    common.save_grid(x, os.path.join(cfg.out, "samples.png"))
    q = quality(x, plain)
    print(f"DeepCache interval {cfg.interval}, branch {cfg.branch}, {cfg.cache_schedule}, {cfg.steps} "
          f"{'DDIM' if cfg.base == 'ddim' else 'Euler'} steps: PSNR {q['psnr']:.1f} dB, SSIM {q['ssim']:.4f} "
          "against the uncached samples")

    table = []
    if cfg.analysis:
        evaluator = None
        if cfg.eval:
            import evaluate                                    # the FD's classifier: trained once, then cached
            evaluator = evaluate.Evaluator(state["config"].get("dataset", "mnist"), data_dir=cfg.data_dir,
                                           download=cfg.download, device=device, image_size=shape[-1],
                                           channels=shape[0])
        table = sweep(cfg, unet, sample, device, shape, evaluator)
        write_table(table, os.path.join(cfg.out, "speed_quality.md"))
        plot_sweep(table, cfg.out)
    print(f"figures in {cfg.out}/")
    return dict(psnr=q["psnr"], ssim=q["ssim"], sweep=table)


if __name__ == "__main__":
    main()
