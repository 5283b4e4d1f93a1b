"""DeepCache (Ma et al., 2023): faster sampling by reusing a UNet's deep features across steps.

Between neighbouring sampling steps the deep features of a diffusion UNet barely change; only the
shallow layers near the input and the output have much new to say. Number the UNet's blocks as the
paper does: down blocks D_1..D_n (shallowest first; each block of a level counts), up blocks
U_n..U_1 in the order they run, U_i taking D_i's output as its skip. For the skip branch m (--branch,
1 = the shallowest, fastest):
    full inference:     the whole UNet, keeping F_cache = the features entering U_m (all that the deep
                        part D_{m+1}..D_n, the middle blocks and U_n..U_{m+1} computed),
    partial inference:  only the skip branch: D_1..D_m, then U_m..U_1 from F_cache and those skips.
With N = --interval, a full step is followed by N - 1 partial ones: of S steps, K = ceil(S / N) are
full, at i = 0, N, 2N, ... (uniform) or at i_k = S (k / K)^p, p > 1 (non-uniform: denser near the
start, where x_t changes most). If a partial step costs a fraction f of a full one's FLOPs and time
went with FLOPs, the speedup would be S / (K + (S - K) f). The cache is reset at the start of every
run, so no features of a previous run's noise leak into the next ("stale cache").

Two deterministic bases (--base), so cached and plain samples from the same noise compare pixel for
pixel (PSNR, SSIM):
    ddim: ddpm_mnist.py's UNet with DDIM (eta = 0); it embeds the integer step t;
    rf:   rectified_flow.py's VelocityUNet with Euler steps, t in [0, 1] from noise (t = 0) to data
          (t = 1); it embeds 1000 t, so the cached forward does too.

Run:
    python deepcache.py                    # ddim base: runs/ddpm_mnist/ckpt.pt (trained first if missing)
    python deepcache.py --base rf          # rf base: runs/rectified_flow/pixel/flow2.pt (python rectified_flow.py)
    python deepcache.py --interval 3 --branch 2 --cache-schedule nonuniform
    python -m tools.deepcache_sweep              # speed and quality over step counts x intervals: figures, table
Writes runs/deepcache/BASE/samples.png (cached) beside samples_plain.png (the same noise, uncached).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import checkpoints
import common
import plots
import ddpm_mnist
import rectified_flow as rf

DEFAULT_BASE = {"ddim": ddpm_mnist.DEFAULT_CKPT, "rf": "runs/rectified_flow/pixel/flow2.pt"}
BASE_NAME = {"ddim": "DDPM UNet with DDIM", "rf": "rectified flow with Euler steps"}   # in titles


@dataclass
class Config:
    base: str = field(default="ddim", metadata={"choices": ["ddim", "rf"], "help": "the model and sampler to "
                      "accelerate: ddpm_mnist.py's UNet with DDIM, or rectified_flow.py's flow with Euler steps"})
    base_ckpt: str = field(default="", metadata={"help": f"its checkpoint; default {DEFAULT_BASE['ddim']} (ddim, "
                           f"trained first when missing) or {DEFAULT_BASE['rf']} (rf: a pixel-space flow)"})
    data_dir: str = field(default="data", metadata={"help": "datasets root (to train the default base)"})
    download: bool = True
    interval: int = field(default=3, metadata={"help": "N: one full UNet step, then N - 1 cached steps", "min": 1})
    branch: int = field(default=1, metadata={
        "help": "skip branch m where the cached steps rejoin the UNet (1 = shallowest, fastest)", "min": 1})
    cache_schedule: str = field(default="uniform", metadata={"choices": ["uniform", "nonuniform"]})
    power: float = field(default=2.0, metadata={"help": "non-uniform: full steps at S (k/K)^power", "min": 1.0})
    steps: int = field(default=50, metadata={"help": "sampling steps S", "min": 1})
    n_samples: int = field(default=64, metadata={"help": "images in samples.png", "min": 1})
    out: str = field(default="", metadata={"help": "default runs/deepcache/BASE"})
    seed: int = 0
    device: str = "auto"


# ----------------------------------------------------------------------------- the cached UNet


def numbered(levels) -> list:
    """[(block, the level's resampling if the block ends its level, else None)] of UNet levels, in the
    order the blocks run: D_1..D_n for the down levels, U_n..U_1 for the up levels."""
    return [(block, level.resample if block is level.blocks[-1] else None)
            for level in levels for block in level.blocks]


class DeepCache(nn.Module):
    """model(x, t) for a sampler: full inference at the full steps, partial inference in between.

    `reset(full_steps)` starts a run: step counter 0, empty cache, and the indices of the steps that
    run the whole UNet. Each call is one sampling step. Works on ddpm_mnist.UNet and its subclasses."""

    def __init__(self, unet: ddpm_mnist.UNet, branch: int):
        super().__init__()
        # the time the UNet embeds: DDPM's integer step t as it is; rectified_flow.py's VelocityUNet
        # takes t in [0, 1] and embeds 1000 t (in its forward, which this one replaces)
        self.time_scale = 1000 if isinstance(unet, rf.VelocityUNet) else 1
        self.D, self.U = numbered(unet.downs), numbered(unet.ups)
        common.check(1 <= branch <= len(self.D), f"--branch {branch} is not in this UNet: it has {len(self.D)} "
                     f"skip connections, so choose 1 (shallowest) to {len(self.D)} (deepest)")
        self.unet, self.branch = unet, branch
        self.reset([0])

    def reset(self, full_steps) -> None:
        self.step, self.cache, self.full_steps = 0, None, set(full_steps)

    def forward(self, x, t):                                 # x (N, C, H, W), t (N,) -> eps or v
        u, m, n = self.unet, self.branch, len(self.D)
        full = self.cache is None or self.step in self.full_steps    # full inference, else partial
        self.step += 1
        emb = u.embed_time(t * self.time_scale)
        depth = n if full else m                             # full: D_1..D_n; partial: the skip branch D_1..D_m
        h, skips = u.inc(x), []
        for D, down in self.D[:depth]:
            h = D(h, emb)
            skips.append(h)                                  # D_i's output: U_i's skip
            if down is not None and len(skips) < depth:      # downsample, unless no block runs after it
                h = down(h)
        if full:                                             # the deep part: middle blocks, then U_n..U_{m+1}
            for block in u.mid:
                h = block(h, emb)
            self.cache = self.up(self.U[:n - m], h, skips, emb)   # F_cache: the features entering U_m
        return u.out(self.up(self.U[n - m:], self.cache, skips, emb))   # U_m..U_1, on F_cache and skips m..1

    @staticmethod
    def up(blocks, h, skips, emb):
        """Up blocks from features h, each fed the last unused skip, then its level's upsampling."""
        for U, upsample in blocks:
            h = U(torch.cat([h, skips.pop()], dim=1), emb)
            h = h if upsample is None else upsample(h)
        return h


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
    """f = FLOPs of a partial step / FLOPs of a full step (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, flops = torch.randn(shape, device=device), torch.zeros(shape[0], dtype=torch.long, device=device), []
    cache.reset([0])                                          # call 1 is full, call 2 partial
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
    state = checkpoints.load(path, device, rf.KIND, keys=("net", "ema", "config"), hint="train one with `python "
                             "rectified_flow.py` (it writes runs/rectified_flow/pixel/flow1.pt and flow2.pt)")
    common.check(state["config"].get("space") == "pixel", f"'{path}' is a latent-space flow: its samples are "
                 "VAE latents, not images; pass a pixel-space one (`python rectified_flow.py` trains it)")
    flow = rf.VelocityUNet(**state["net"]).to(device)
    checkpoints.load_weights(flow, state["ema"], path)
    return flow.eval(), rf.euler_sample, state, math.inf


def quality(x, ref) -> dict:
    """MSE in [-1, 1], and torchmetrics' PSNR and SSIM on [0, 1] images, against the uncached samples."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = (x.clamp(-1, 1) + 1) / 2, (ref.clamp(-1, 1) + 1) / 2
    return dict(mse=((x - ref) ** 2).mean().item(),
                psnr=peak_signal_noise_ratio(a, b, data_range=1.0).item(),
                ssim=structural_similarity_index_measure(a, b, data_range=1.0).item())


def main(argv=None) -> dict:
    """-> {psnr, ssim}: samples.png against samples_plain.png"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    cfg.base_ckpt = cfg.base_ckpt or DEFAULT_BASE[cfg.base]
    cfg.out = cfg.out or os.path.join("runs/deepcache", cfg.base)
    common.prepare_out(cfg.out)
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    common.seed_everything(cfg.seed)
    unet, sample, _, T = load_base(cfg.base, cfg.base_ckpt, device, cfg.data_dir, cfg.download)
    cache = DeepCache(unet, cfg.branch)                        # checks --branch against this UNet
    common.check(cfg.steps <= T, f"--steps must be <= T = {T} of the base model '{cfg.base_ckpt}', got {cfg.steps}")
    c = unet.config
    x_T = torch.randn((cfg.n_samples, c["channels"], c["image_size"], c["image_size"]), device=device,
                      generator=common.generator(device, cfg.seed))
    plain = sample(unet, x_T, cfg.steps)
    x = cached_sample(sample, cache, x_T, cfg.steps, cfg.interval, cfg.cache_schedule, cfg.power)
    where = f"{BASE_NAME[cfg.base]}, {cfg.steps} steps"
    plots.save_labelled_grid(plain, os.path.join(cfg.out, "samples_plain.png"), 8, [], f"uncached: {where}")
    plots.save_labelled_grid(x, os.path.join(cfg.out, "samples.png"), 8, [], f"DeepCache, interval {cfg.interval}, "
                             f"branch {cfg.branch}: {where}, the same noise")
    q = quality(x, plain)
    print(f"DeepCache on the {BASE_NAME[cfg.base]} ({cfg.steps} steps), interval {cfg.interval}, branch {cfg.branch}, "
          f"{cfg.cache_schedule}: PSNR {q['psnr']:.1f} dB, SSIM {q['ssim']:.4f} against the uncached samples; "
          f"a partial step costs f = {flops_fraction(cache, x_T[:1].shape, device):.3f} of a full step's FLOPs")
    print(f"figures in {cfg.out}/")
    return dict(psnr=q["psnr"], ssim=q["ssim"])


if __name__ == "__main__":
    main()
