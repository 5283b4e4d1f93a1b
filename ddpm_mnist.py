"""DDPM on MNIST: train a noise-prediction UNet, then sample with DDPM and DDIM.

Papers: Ho et al., 2020 (DDPM); Song et al., 2021 (DDIM).

Forward process, closed form (t = 0..T-1 is an integer step; index t holds beta_t):
    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),  alpha_bar_t = prod_{s<=t} (1 - beta_s)
Training (Algorithm 1): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, and
    L = || eps - eps_theta(x_t, t) ||^2,  t ~ U{0..T-1}, eps ~ N(0, I)
DDPM sampling (Algorithm 2), from x_T ~ N(0, I), for t = T-1..0:
    x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) + sigma_t z
    with sigma_t^2 = beta_t or the posterior variance (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t.
DDIM sampling on a strided subsequence tau_1 > ... > tau_S of real timesteps:
    x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
    x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z
    sigma = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev)
    and the last step lands on clean data: alpha_bar_prev = 1 after tau_S (no off-by-one).
x0 clipping (--clip, the default; --no-clip runs the equations above as they stand): both samplers
    step towards x0_hat, and at t = T-1 the factor 1 / sqrt(alpha_bar_t) = 157 turns a 1% error of
    eps into pixels far outside the data. Clipping x0_hat to [-1, 1] at every step (eps recomputed
    from the clipped x0_hat) keeps a real network's samples in range. Measured on the CPU recipe
    (gallery.py, MNIST-8k, 2,000 DDIM-50 samples): FD-LeNet 32.0 clipped, 34.5 not; after half the
    training (an earlier run, scored by an earlier classifier), 51 against 182.
What the network predicts (--predict): eps, x0, or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0.
    Each is a fixed linear function of the other given x_t, so all three learn the same estimator
    E[eps | x_t]; only the loss weight over noise levels differs: x0-MSE = eps-MSE (1 - ab)/ab and
    v-MSE = eps-MSE / ab (ab = alpha_bar_t). x0 stresses noisy steps, eps clean ones. The samplers
    always take an eps-predictor: DDPM.eps_from converts the network's output in one place.
Images live in [-1, 1] inside the model. The file reads as the paper does: the process (DDPM:
schedule, loss, samplers), the network that predicts eps (UNet), the training loop (train); the
figures, and the course exercises' commands, are in ddpm_figures.py.

Run:
    python ddpm_mnist.py                      # train 40 epochs into runs/ddpm_mnist/, then all figures
    python ddpm_mnist.py --resume --epochs 60 # continue a run (takes a new --lr; T, schedule, preset must match)
    python ddpm_mnist.py --sample-only --eval 10000   # figures (+ FD-LeNet, evaluate.py) from OUT/ckpt.pt
    python ddpm_mnist.py --preset tiny --epochs 1 --no-ddpm-grid --sweep-steps 10 50   # a CPU: minutes
    python ddpm_mnist.py --dataset PATH       # your own images, PATH/<class>/<image>.png (or cifar10)
The graded course interface (DiffusionModel, DiffusionProcess) lives in diffusion.py.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

KIND = "ddpm_mnist.py UNet"               # what this script's checkpoints hold (checked by every loader)
DEFAULT_CKPT = "runs/ddpm_mnist/ckpt.pt"  # the base model of the scripts that build on this one


@dataclass
class Config(common.RunConfig):
    dataset: str = field(default="mnist", metadata={"help": "mnist, cifar10, or an image folder ROOT/<class>/<image>"})
    image_size: int = field(default=0, metadata={"help": "resize to this (0: 32 for folders, else native)", "min": 0})
    pad_to: int = field(default=0, metadata={"min": 0, "help": "pad with -1 (black) to this size, e.g. 32 so that "
                        "4 UNet levels fit 28x28 MNIST; 0 = no padding"})
    channels: int = field(default=3, metadata={"help": "image folders only: 1 (gray) or 3 (RGB)", "choices": [1, 3]})
    preset: str = field(default="auto", metadata={"help": "UNet size (auto: cifar for 32x32 RGB, else mnist)",
                                                  "choices": ["auto", "tiny", "mnist", "cifar"]})
    base: int = field(default=0, metadata={"help": "UNet base channels (0 = the preset's)", "min": 0})
    mults: tuple[int, ...] = field(default=(), metadata={"min": 1, "help": "channel multiplier per level, e.g. "
                                   "1 2 4 8 (empty = the preset's); 2^(levels-1) must divide the size"})
    num_res: int = field(default=0, metadata={"help": "residual blocks per level (0 = the preset's)", "min": 0})
    time_embed: str = field(default="add", metadata={"choices": ["add", "concat"], "help": "add: scale and shift "
                            "of the normalised features; concat: maps joined to conv1's input (see ResBlock)"})
    predict: str = field(default="eps", metadata={"help": "the network's target (see the docstring)",
                                                  "choices": ["eps", "x0", "v"]})
    schedule: str = field(default="linear", metadata={"help": "beta_t", "choices": ["linear", "cosine", "sigmoid"]})
    cosine_clip: float = field(default=0.999, metadata={"help": "--schedule cosine: the largest beta_t (0.999 as "
                               "in Nichol & Dhariwal; 0.99, 0.95 keep the last steps less noisy)"})
    T: int = field(default=1000, metadata={"help": "number of diffusion steps", "min": 1})
    epochs: int = field(default=40, metadata={"help": "epochs in all (with --resume: up to this many)", "min": 1})
    batch_size: int = field(default=128, metadata={"help": "images per step", "min": 1})
    lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate after warm-up"})
    warmup_steps: int = field(default=500, metadata={"help": "lr warm-up (at most a fifth of the run)", "min": 0})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA of the weights that sample"})
    sigma: str = field(default="posterior", metadata={"help": "DDPM sigma_t^2", "choices": ["beta", "posterior"]})
    ddim_steps: int = field(default=50, metadata={"help": "DDIM steps of the grids and progress samples", "min": 1})
    eta: float = field(default=0.0, metadata={"help": "DDIM noise: 0 deterministic, 1 DDPM-like", "min": 0})
    clip: bool = field(default=True, metadata={"help": "clip x0_hat to [-1, 1] at every DDPM and DDIM step"})
    n_samples: int = field(default=64, metadata={"help": "images per sample grid", "min": 2})
    sample_every: int = field(default=5, metadata={"help": "epochs between progress grids", "min": 1})
    ddpm_grid: bool = field(default=True, metadata={"help": "the T-step DDPM grids, sweep row and --eval row (2-core "
                            "CPU, 64 images: ~3 min tiny preset, ~35 min mnist UNet)"})
    sweep_steps: tuple[int, ...] = field(default=(10, 20, 50, 100, 1000), metadata={"min": 0, "help": "DDIM step "
                                         "counts of ddim_sweep.png (8 images each; > --T left out; 0 = none)"})
    eval: int = field(default=0, metadata={"min": 0, "help": "score N samples of DDPM and of each sweep step count "
                      "with evaluate.py into OUT/eval.md (0 = off; N x (T + sweep steps) UNet passes)"})
    out: str = field(default="runs/ddpm_mnist", metadata={"help": "folder of the checkpoint and figures"})
    ckpt: str = field(default="", metadata={"help": "checkpoint path (empty: OUT/ckpt.pt)"})


def check_config(cfg: Config) -> None:
    """What the flags' choices and minimums cannot say; each check stops in one line, before any work."""
    common.check(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    common.check(0 <= cfg.ema_decay < 1, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    common.check(cfg.ddim_steps <= cfg.T, f"--ddim-steps must be in 1..--T ({cfg.T}), got {cfg.ddim_steps}")
    common.check(cfg.eval != 1, "--eval must be 0 (off) or >= 2 samples, got 1")
    common.check(0 < cfg.cosine_clip <= 0.999, f"--cosine-clip must be in (0, 0.999], got {cfg.cosine_clip}")
    common.check(cfg.cosine_clip == 0.999 or cfg.schedule == "cosine", "--cosine-clip applies to --schedule "
                 f"cosine only, not {cfg.schedule}; add --schedule cosine or leave --cosine-clip out")


# ----------------------------------------------------------------------------- the method


class DDPM(nn.Module):
    """The diffusion process: schedule buffers named after the paper's symbols, the training loss,
    and the two samplers. Samplers take the noise predictor `model(x_t, t)` as an argument; a network
    that predicts x0 or v (`predict`) is turned into one by `eps_from`."""

    def __init__(self, T: int = 1000, schedule: str = "linear", cosine_clip: float = 0.999, predict: str = "eps"):
        super().__init__()
        self.T, self.predict = T, predict
        beta = common.make_beta_schedule(schedule, T)                    # beta_t, float64
        if schedule == "cosine":                                         # cosine comes clipped at 0.999: a
            beta = beta.clamp(max=cosine_clip)                           # lower clip is one more clamp
        alpha = 1 - beta                                                 # alpha_t = 1 - beta_t
        alpha_bar = torch.cumprod(alpha, 0)                              # alpha_bar_t = prod_{s<=t} alpha_s
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=beta.dtype), alpha_bar[:-1]])
        posterior_var = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)    # beta~_t, q(x_{t-1} | x_t, x_0)
        for name, v in dict(beta=beta, alpha=alpha, alpha_bar=alpha_bar, alpha_bar_prev=alpha_bar_prev,
                            posterior_var=posterior_var).items():
            self.register_buffer(name, v.float())

    @staticmethod
    def _bc(v, t):  # gather v[t] and broadcast over (C, H, W)
        return v[t][:, None, None, None]

    def q_sample(self, x0, t, eps):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps"""
        ab = self._bc(self.alpha_bar, t)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def loss(self, model, x0):
        """Simple DDPM loss: MSE between the true and the predicted target (eps, x0 or v) at a random step."""
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        ab = self._bc(self.alpha_bar, t)
        target = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[self.predict]
        return F.mse_loss(model(self.q_sample(x0, t, eps), t).float(), target)

    def eps_from(self, model, clip: bool = False):
        """The noise predictor that the network's output implies, for the samplers (given x_t):
        eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)  from x0;   eps = sqrt(ab) v + sqrt(1 - ab) x_t  from v.
        clip: the x0_hat it implies is clipped to the data range [-1, 1] at every step (clip_x0)."""
        if self.predict == "eps":
            return clip_x0(model, self.alpha_bar) if clip else model

        def eps(x, t):
            ab, out = self._bc(self.alpha_bar, t), model(x, t).float()
            if self.predict == "x0":
                return (x - ab.sqrt() * out) / (1 - ab).sqrt()
            return ab.sqrt() * out + (1 - ab).sqrt() * x                # from v
        return clip_x0(eps, self.alpha_bar) if clip else eps

    def _noise(self, shape, generator, device):
        return torch.randn(shape, generator=generator, device=device)

    @torch.no_grad()
    def ddpm_sample(self, model, shape, sigma="posterior", x_T=None, generator=None):
        """Ancestral sampling through all T steps (Algorithm 2)."""
        device = self.beta.device
        x = x_T if x_T is not None else self._noise(shape, generator, device)
        var = self.beta if sigma == "beta" else self.posterior_var
        for i in common.progress(reversed(range(self.T)), f"DDPM {self.T} steps", self.T):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            eps = model(x, t).float()
            mean = (x - self.beta[i] / (1 - self.alpha_bar[i]).sqrt() * eps) / self.alpha[i].sqrt()
            x = mean + var[i].sqrt() * self._noise(shape, generator, device) if i > 0 else mean
        return x

    def ddim_timesteps(self, steps: int) -> list[int]:
        """S real, strided, descending timesteps from T-1 down to (about) 0."""
        common.check(1 <= steps <= self.T, f"DDIM steps must be in 1..{self.T}, got {steps}")
        return torch.linspace(self.T - 1, 0, steps).round().long().tolist()

    @torch.no_grad()
    def ddim_sample(self, model, shape, steps=50, eta=0.0, x_T=None, generator=None):
        """DDIM: deterministic for eta = 0; the last step goes to alpha_bar_prev = 1 (clean data)."""
        common.check(eta >= 0, f"--eta must be >= 0, got {eta}")
        device = self.beta.device
        x = x_T if x_T is not None else self._noise(shape, generator, device)
        taus = self.ddim_timesteps(steps)
        for i, tau in enumerate(common.progress(taus, f"DDIM {steps} steps")):
            ab = self.alpha_bar[tau]
            ab_prev = self.alpha_bar[taus[i + 1]] if i + 1 < len(taus) else torch.ones_like(ab)
            eps = model(x, torch.full((shape[0],), tau, device=device, dtype=torch.long)).float()
            x0_hat = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
            x = ab_prev.sqrt() * x0_hat + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
            if eta > 0 and i + 1 < len(taus):
                x = x + sigma * self._noise(shape, generator, device)
        return x


def clip_x0(eps_fn, alpha_bar: torch.Tensor):
    """Wrap a noise predictor eps_fn(x_t, t) so that the clean image it implies,
        x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t),
    is clipped to the data range [-1, 1] and eps recomputed from it. DDPM and DDIM steps are
    functions of x0_hat, so they stop aiming outside the data (guided and undertrained models
    overshoot: "clip_denoised" in Dhariwal & Nichol's code). alpha_bar: (T,), t: (N,) integer steps."""
    def eps(x_t, t):
        ab = alpha_bar[t].view(-1, *([1] * (x_t.dim() - 1)))
        x0_hat = ((x_t - (1 - ab).sqrt() * eps_fn(x_t, t).float()) / ab.sqrt()).clamp(-1, 1)
        return (x_t - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
    return eps


# ----------------------------------------------------------------------------- network


PRESETS = {  # base channels, channel multiplier per resolution level, residual blocks per level, dropout
    "tiny": dict(base=16, mults=(1, 2, 2), num_res=1, dropout=0.0),  # 28 -> 14 -> 7: attention over 49 positions,
                                                                     # fast on a CPU; too small to overfit
    "mnist": dict(base=64, mults=(1, 2, 2), num_res=2, dropout=0.1),    # 28 -> 14 -> 7
    "cifar": dict(base=128, mults=(1, 2, 2, 2), num_res=2, dropout=0.1),  # 32 -> 16 -> 8 -> 4
}


def preset_for(preset: str, image_size: int, channels: int) -> dict:
    """PRESETS[preset]; "auto" picks cifar for 32x32 RGB images, mnist for anything else."""
    return PRESETS[preset if preset != "auto" else "cifar" if (image_size, channels) == (32, 3) else "mnist"]


def norm(c: int) -> nn.GroupNorm:
    """GroupNorm with at most 32 groups of at least 4 channels each (16 channels: 4 groups of 4).
    Never one channel per group: that normalises each channel over H x W alone, and so subtracts
    any per-channel constant added before it (see ResBlock)."""
    return nn.GroupNorm(max([g for g in range(1, 33) if c % g == 0 and c // g >= 4] or [1]), c)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual."""

    def __init__(self, c: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm, self.qkv, self.proj = norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        N, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(N, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)        # each (N, heads, HW, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)      # (N, heads, HW, C/heads)
        return x + self.proj(h.transpose(-1, -2).reshape(N, C, H, W))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding in between; optional self-attention after.

    How t gets in, and why there. The projected embedding is one number per channel, the same at
    every pixel; GroupNorm subtracts each group's mean over its channels and pixels, so a constant
    added *before* it is subtracted again (all of it when a group is one channel: how this UNet once
    lost t). So t enters *after* the norm, as a scale and a shift (Dhariwal & Nichol's scale-shift
    norm, like DiT's adaLN):
        h = conv1(silu(norm1(x)));   h = norm2(h) * (1 + gamma(emb)) + beta(emb);   h = conv2(silu(h))
    time_embed="concat" (the course exercise): t_dim constant maps joined to conv1's input instead;
    t survives norm2 only as differences between the channels of a group, which `norm`'s groups of
    several channels keep (the zero padding is not what lets it through)."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, dropout: float, attn: bool = False, time_embed: str = "add"):
        super().__init__()
        self.concat = time_embed == "concat"
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in + t_dim * self.concat, c_out, 3, padding=1)
        self.t_proj = nn.Identity() if self.concat else nn.Linear(t_dim, 2 * c_out)   # -> (gamma, beta)
        self.norm2, self.drop, self.conv2 = norm(c_out), nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = SelfAttention(c_out) if attn else nn.Identity()

    def forward(self, x, emb, cond=None):                # x (N, c_in, H, W), emb (N, t_dim); cond: unused here
        h = F.silu(self.norm1(x))
        if self.concat:                                  # (N, c_in + t_dim, H, W)
            h = torch.cat([h, emb[:, :, None, None].expand(-1, -1, *h.shape[-2:]).to(h.dtype)], dim=1)
            h = self.norm2(self.conv1(h))
        else:
            gamma, beta = self.t_proj(emb)[:, :, None, None].chunk(2, dim=1)   # each (N, c_out, 1, 1)
            h = self.norm2(self.conv1(h)) * (1 + gamma) + beta               # t enters after the norm
        h = self.conv2(self.drop(F.silu(h)))
        return self.attn(self.skip(x) + h)               # (N, c_out, H, W)


class Level(nn.Module):
    """One resolution of the UNet: residual blocks, then a resampling layer (or none)."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module):
        super().__init__()
        self.blocks, self.resample = nn.ModuleList(blocks), resample


class UNet(nn.Module):
    """eps_theta(x_t, t): encoder, bottleneck and decoder with skip connections; self-attention at
    the lowest resolution. The lessons that build on it use its parts: `encode` and `decode` hand
    `cond` to every block (cfg.py's cross-attention blocks read class tokens from it; ResBlocks ignore
    it) and can stop part-way (DeepCache's shallow branch); decoder=False builds the encoder half
    alone (the noisy classifier of classifier_guidance.py, ControlNet's trainable copy)."""

    def __init__(self, image_size=28, channels=1, base=64, mults=(1, 2, 2), num_res=2, dropout=0.1, time_embed="add",
                 decoder: bool = True):
        super().__init__()
        k = 2 ** (len(mults) - 1)                        # the lowest level is image_size / k wide
        common.check(image_size % k == 0, f"image size {image_size} is not divisible by 2^{len(mults) - 1}; "
                     f"use fewer levels, or --pad-to {-(-image_size // k) * k}")
        self.config = dict(image_size=image_size, channels=channels, base=base, mults=tuple(mults),
                           num_res=num_res, dropout=dropout)
        if time_embed != "add":  # recorded only when not the default: subclasses' checkpoints keep their keys
            self.config["time_embed"] = time_embed
        t_dim, last = 4 * base, len(mults) - 1
        self.base = base
        self.time_mlp = nn.Sequential(nn.Linear(base, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.inc = nn.Conv2d(channels, base, 3, padding=1)
        self.downs, skip_c, c = nn.ModuleList(), [], base
        for i, m in enumerate(mults):
            blocks = []
            for _ in range(num_res):
                blocks.append(ResBlock(c, base * m, t_dim, dropout, i == last, time_embed))
                c = base * m
                skip_c.append(c)
            down = nn.Conv2d(c, c, 3, stride=2, padding=1) if i < last else nn.Identity()
            self.downs.append(Level(blocks, down))
        self.mid = nn.ModuleList([ResBlock(c, c, t_dim, dropout, True, time_embed),
                                  ResBlock(c, c, t_dim, dropout, False, time_embed)])
        if not decoder:
            return
        self.ups = nn.ModuleList()
        for i, m in reversed(list(enumerate(mults))):
            blocks = []
            for _ in range(num_res):
                blocks.append(ResBlock(c + skip_c.pop(), base * m, t_dim, dropout, i == last, time_embed))
                c = base * m
            up = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1)) if i > 0 else nn.Identity()
            self.ups.append(Level(blocks, up))
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # start by predicting eps = 0
        nn.init.zeros_(self.out[-1].bias)

    def embed_time(self, t):                             # t (N,) integer steps -> (N, t_dim)
        return self.time_mlp(common.timestep_embedding(t, self.base))

    def encode(self, h, emb, cond=None, depth=None):
        """The down levels and the bottleneck, from the input features h = inc(x_t): -> (bottleneck
        features, skip activations, shallowest first). depth: stop after that many blocks (skips)."""
        hs = []
        for level in self.downs:
            for block in level.blocks:
                h = block(h, emb, cond)
                hs.append(h)
                if len(hs) == depth:
                    return h, hs
            h = level.resample(h)
        for block in self.mid:
            h = block(h, emb, cond)
        return h, hs

    def decode(self, h, hs, emb, cond=None, start=0, stop=None):
        """The up levels, each block fed the last unused skip: -> eps. Part of them: from the features
        entering up-block `start` (0 = the bottleneck's), or up to those entering block `stop`
        (returned as they are)."""
        hs, k = list(hs), 0
        for level in self.ups:
            for block in level.blocks:
                if k == stop:
                    return h
                if k >= start:
                    h = block(torch.cat([h, hs.pop()], dim=1), emb, cond)
                k += 1
            if k > start:                                # this level ran: on to the next resolution
                h = level.resample(h)
        return self.out(h)

    def forward(self, x, t):                             # x (N, C, H, W), t (N,) -> eps (N, C, H, W)
        emb = self.embed_time(t)
        return self.decode(*self.encode(self.inc(x), emb), emb)


# ----------------------------------------------------------------------------- training


def load_data(cfg: Config, device, train: bool = True, padded: bool = True):
    """The whole split as one tensor on `device`: x (N, C, H, W) in [-1, 1], y (N,), padded to --pad-to."""
    x, y = common.load_images(cfg.dataset, cfg.data_dir, train=train, download=cfg.download,
                              image_size=cfg.image_size or None, channels=cfg.channels, device=device)
    common.check(x.shape[-1] <= cfg.pad_to or not cfg.pad_to, f"--pad-to {cfg.pad_to} is smaller than the "
                 f"images ({x.shape[-1]}x{x.shape[-1]}); pass a larger size or leave --pad-to out")
    return (pad(x, cfg.pad_to) if padded else x), y


def pad(x, size: int):
    """A border of -1 (black, MNIST's background) around (N, C, H, W) images up to size x size (0: none)."""
    p = size - x.shape[-1] if size else 0
    return F.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2), value=-1.0) if p else x


def unet_kwargs(cfg: Config, x) -> dict:
    """The UNet's constructor arguments: the preset, overridden by --base/--mults/--num-res."""
    net = dict(preset_for(cfg.preset, x.shape[-1], x.shape[1]), time_embed=cfg.time_embed)
    net |= {k: v for k, v in dict(base=cfg.base, mults=tuple(cfg.mults), num_res=cfg.num_res).items() if v}
    return dict(image_size=x.shape[-1], channels=x.shape[1], **net)


def train(cfg: Config, x_train, device) -> tuple[UNet, DDPM]:
    """Algorithm 1 as a loop: AdamW with warm-up, EMA weights that sample, one atomic checkpoint per
    epoch (--resume continues it exactly), a DDIM grid every --sample-every epochs. -> (EMA UNet, DDPM)"""
    ckpt = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    model = UNet(**unet_kwargs(cfg, x_train)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    run = common.Run(model, ckpt, KIND, device, cfg.lr, cfg.ema_decay)   # + the EMA, AdamW, step and losses
    ddpm = DDPM(cfg.T, cfg.schedule, cfg.cosine_clip, cfg.predict).to(device)
    net = torch.compile(model) if cfg.compile else model
    if cfg.resume:  # weights, EMA, optimizer and RNG state; a changed process or network is refused
        run.resume(cfg, same=("T", "schedule", "cosine_clip", "predict", "preset", "base", "mults", "num_res",
                              "time_embed", "pad_to"))
    print(f"UNet: {run.millions():.2f}M parameters, {len(x_train)} training images on {device}")
    batch = min(cfg.batch_size, len(x_train))
    steps_per_epoch = len(x_train) // batch
    for epoch in range(run.epoch, cfg.epochs):
        model.train()
        run.new_epoch(f"epoch {epoch + 1:3d}/{cfg.epochs}")
        for x0, _ in common.progress(common.batches(x_train, batch_size=batch, seed=cfg.seed + epoch),
                                     f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch):
            common.set_lr(run.opt, cfg.lr, run.step, cfg.warmup_steps, cfg.epochs * steps_per_epoch)
            with common.autocast(device, cfg.amp):
                loss = ddpm.loss(net, x0)                # || eps - eps_theta(x_t, t) ||^2 at a random t (or x0, v)
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            run.opt.step()
            run.ema.update_parameters(model)             # theta_ema <- d theta_ema + (1 - d) theta
            run.add(loss, len(x0))
        run.end_epoch(net=model.config, config=asdict(cfg))   # NaN guard, loss/time/img/s line, checkpoint
        if (epoch + 1) % cfg.sample_every == 0 or epoch + 1 == cfg.epochs:  # own generator: the run's RNG is untouched
            x = ddpm.ddim_sample(ddpm.eps_from(run.ema.module.eval(), cfg.clip), (cfg.n_samples, *x_train.shape[1:]),
                                 cfg.ddim_steps, generator=common.generator(device, cfg.seed))
            common.save_grid(x, os.path.join(cfg.out, f"samples_epoch{epoch + 1:03d}.png"))
    common.plot_curves(os.path.join(cfg.out, "loss.png"), {"train loss": common.smooth(run.losses)})
    return run.ema.module.eval(), ddpm


def ensure_trained(path: str, device, *, dataset: str = "mnist", data_dir: str = "data", download: bool = True,
                   image_size: int = 0, channels: int = 3, seed: int = 0, amp: bool = True) -> str:
    """The path of a trained ddpm_mnist.py checkpoint, for the scripts that build on one: the default
    path is trained first (with this script's defaults) when it is missing; any other path must exist."""
    if path == DEFAULT_CKPT and not os.path.isfile(path):
        print(f"no base model at '{path}': training it first with ddpm_mnist.py's defaults")
        cfg = Config(dataset=dataset, data_dir=data_dir, download=download, image_size=image_size,
                     channels=channels, seed=seed, amp=amp, out=os.path.dirname(path), ckpt=path)
        common.new_or_resume(path, resume=False, overwrite=False)
        common.seed_everything(seed)
        train(cfg, load_data(cfg, device)[0], device)
    common.check(os.path.isfile(path), f"--base-ckpt '{path}' not found; train one with `python ddpm_mnist.py "
                 f"--out DIR` and pass DIR/ckpt.pt, or leave --base-ckpt out to use (and train) {DEFAULT_CKPT}")
    return path


def load_trained(path: str, device, eps_only: bool = True) -> tuple[UNet, DDPM, dict]:
    """The EMA network (eval mode), the diffusion process and the whole state of a checkpoint
    written by `train`; state["net"] holds the UNet's constructor arguments. eps_only (for the
    scripts that build on this one and call the UNet as eps_theta on unpadded images): refuse a
    network trained with --predict x0/v or --pad-to."""
    state = common.load_checkpoint(path, device, KIND, keys=("net", "ema", "config"),
                                   hint="train one with `python ddpm_mnist.py` first")
    c = state["config"]
    if eps_only:
        common.check(c.get("predict", "eps") == "eps" and not c.get("pad_to"), f"'{path}' was trained with "
                     f"--predict {c.get('predict')} --pad-to {c.get('pad_to')}; this script needs a base trained "
                     "with --predict eps and no --pad-to")
    model = UNet(**state["net"]).to(device)
    common.load_weights(model, state["ema"], path)
    ddpm = DDPM(c["T"], c["schedule"], c.get("cosine_clip", 0.999), c.get("predict", "eps"))
    return model.eval(), ddpm.to(device), state


def main(argv=None) -> dict:
    """Train (or load, --sample-only) and make the figures. -> make_figures' results"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    device = common.get_device(cfg.device)
    ckpt = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    common.prepare_out(cfg.out)
    if cfg.sample_only:
        model, ddpm, state = load_trained(ckpt, device, eps_only=False)  # a missing or foreign file stops here
        trained = {k: v for k, v in state["config"].items() if k in ("T", "schedule", "cosine_clip", "predict",
                                                                     "time_embed", "pad_to")}
        cfg = replace(cfg, **trained)                          # the figures describe the run as trained
        common.check(cfg.ddim_steps <= ddpm.T, f"--ddim-steps must be in 1..{ddpm.T} (the T of '{ckpt}'), "
                     f"got {cfg.ddim_steps}")
    else:
        common.new_or_resume(ckpt, cfg.resume, cfg.overwrite)  # never replace a trained model by mistake
    common.seed_everything(cfg.seed)
    common.setup_speed(device)
    if not cfg.sample_only:
        model, ddpm = train(cfg, load_data(cfg, device)[0], device)
    c = model.config
    import ddpm_figures                                   # the figures and measurements of a run, in their own file
    results = ddpm_figures.make_figures(cfg, model, ddpm, device, (c["channels"], c["image_size"], c["image_size"]))
    print(f"figures in {cfg.out}/")
    return results


if __name__ == "__main__":
    main()
