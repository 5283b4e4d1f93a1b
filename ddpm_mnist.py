"""DDPM on MNIST: train a noise-prediction UNet, then sample with DDPM and DDIM.

Papers: Ho et al., 2020 (DDPM); Song et al., 2021 (DDIM). t = 0..T-1 is an integer step; index t holds beta_t.
    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),  alpha_bar_t = prod_{s<=t} (1 - beta_s)
Training (Algorithm 1): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, and
    L = || eps - eps_theta(x_t, t) ||^2,  t ~ U{0..T-1}, eps ~ N(0, I)
DDPM sampling (Algorithm 2), from x_T ~ N(0, I), for t = T-1..0:
    x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) + sigma_t z
    with sigma_t^2 = beta_t or the posterior variance (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t.
DDIM on strided real timesteps tau_1 > ... > tau_S; its last step lands on clean data (alpha_bar_prev = 1):
    x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
    x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z
    sigma = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev)
--clip (the default) clips x0_hat to [-1, 1] at every step: near t = T-1, 1 / sqrt(alpha_bar_t) = 157 turns a 1%
    error of eps into pixels far outside the data (CPU recipe, 2,000 DDIM-50 samples: FD-LeNet 32.0, 34.5 unclipped).
Images live in [-1, 1] inside the model. ddpm_figures.py holds the exercises (--predict x0/v, --time-embed
concat, --pad-to), the DDPM grids and the measurements (test loss per t, FD-LeNet); diffusion.py the graded API.

    python ddpm_mnist.py                      # 40 epochs into runs/ddpm_mnist/: ckpt.pt, DDIM grids, loss.png
    python ddpm_mnist.py --resume --epochs 60 # continue a run (takes a new --lr; T, schedule, preset must match)
    python ddpm_mnist.py --sample-only        # OUT/samples.png from OUT/ckpt.pt
    python ddpm_mnist.py --preset tiny --epochs 1   # a CPU: minutes (--dataset PATH: your own images)
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import common
import plots

KIND = "ddpm_mnist.py UNet"               # what this script's checkpoints hold (checked by every loader)
DEFAULT_CKPT = "runs/ddpm_mnist/ckpt.pt"  # the base model of the scripts that build on this one
SAME = ("T", "schedule", "cosine_clip", "preset", "base", "mults", "num_res")  # what --resume may not change


@dataclass
class Config(common.RunConfig):
    dataset: str = field(default="mnist", metadata={"help": "mnist, cifar10, or an image folder ROOT/<class>/<image>"})
    image_size: int = field(default=0, metadata={"help": "resize to this (0: 32 for folders, else native)", "min": 0})
    channels: int = field(default=3, metadata={"help": "image folders only: 1 (gray) or 3 (RGB)", "choices": [1, 3]})
    preset: str = field(default="auto", metadata={"help": "UNet size (auto: cifar for 32x32 RGB, else mnist)",
                                                  "choices": ["auto", "tiny", "mnist", "cifar"]})
    base: int = field(default=0, metadata={"help": "UNet base channels (0: the preset's)", "min": 0})
    mults: tuple[int, ...] = field(default=(), metadata={"help": "channel multipliers (empty: preset's)", "min": 1})
    num_res: int = field(default=0, metadata={"help": "residual blocks per level (0: the preset's)", "min": 0})
    schedule: str = field(default="linear", metadata={"help": "beta_t", "choices": ["linear", "cosine", "sigmoid"]})
    cosine_clip: float = field(default=0.999, metadata={"help": "--schedule cosine: the largest beta_t"})
    T: int = field(default=1000, metadata={"help": "number of diffusion steps", "min": 1})
    epochs: int = field(default=40, metadata={"help": "epochs in all (with --resume: up to this many)", "min": 1})
    batch_size: int = field(default=128, metadata={"help": "images per step", "min": 1})
    lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate after warm-up"})
    warmup_steps: int = field(default=500, metadata={"help": "lr warm-up (at most a fifth of the run)", "min": 0})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA of the weights that sample"})
    ddim_steps: int = field(default=50, metadata={"help": "DDIM steps of the sample grids", "min": 1})
    eta: float = field(default=0.0, metadata={"help": "DDIM noise: 0 deterministic, 1 DDPM-like", "min": 0})
    clip: bool = field(default=True, metadata={"help": "clip x0_hat to [-1, 1] at every DDPM and DDIM step"})
    n_samples: int = field(default=64, metadata={"help": "images per sample grid", "min": 2})
    sample_every: int = field(default=5, metadata={"help": "epochs between progress grids", "min": 1})
    out: str = field(default="runs/ddpm_mnist", metadata={"help": "folder of the checkpoint and figures"})
    ckpt: str = field(default="", metadata={"help": "checkpoint path (empty: OUT/ckpt.pt)"})


def check_config(cfg: Config) -> None:
    """What the flags' choices and minimums cannot say; each check stops in one line, before any work."""
    common.check(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    common.check(0 <= cfg.ema_decay < 1, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    common.check(cfg.ddim_steps <= cfg.T, f"--ddim-steps must be in 1..--T ({cfg.T}), got {cfg.ddim_steps}")
    common.check(0 < cfg.cosine_clip <= 0.999, f"--cosine-clip must be in (0, 0.999], got {cfg.cosine_clip}")
    common.check(cfg.cosine_clip == 0.999 or cfg.schedule == "cosine", "--cosine-clip applies to --schedule "
                 f"cosine only, not {cfg.schedule}; add --schedule cosine or leave --cosine-clip out")


# ----------------------------------------------------------------------------- the method


class DDPM(nn.Module):
    """The diffusion process: schedule buffers named after the paper's symbols, the training loss,
    and the two samplers. Samplers take the noise predictor `model(x_t, t)` as an argument."""

    def __init__(self, T: int = 1000, schedule: str = "linear", cosine_clip: float = 0.999):
        super().__init__()
        self.T = T
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
        """Algorithm 1: || eps - eps_theta(x_t, t) ||^2 at a uniform random step t for each image."""
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        return F.mse_loss(model(self.q_sample(x0, t, eps), t).float(), eps)

    def eps_from(self, model, clip: bool = False):
        """The noise predictor that the samplers take: the network itself, with the x0_hat it implies
        clipped to [-1, 1] at every step when `clip` (clip_x0)."""
        return clip_x0(model, self.alpha_bar) if clip else model

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
    """Wrap a noise predictor eps_fn(x_t, t): the clean image it implies, x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps)
    / sqrt(alpha_bar_t), is clipped to [-1, 1] and eps recomputed from it, so that DDPM and DDIM steps (functions of
    x0_hat) stop aiming outside the data ("clip_denoised" in Dhariwal & Nichol's code). alpha_bar (T,), t (N,)."""
    def eps(x_t, t):
        ab = alpha_bar[t].view(-1, *([1] * (x_t.dim() - 1)))
        x0_hat = ((x_t - (1 - ab).sqrt() * eps_fn(x_t, t).float()) / ab.sqrt()).clamp(-1, 1)
        return (x_t - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
    return eps


# ----------------------------------------------------------------------------- network


PRESETS = {  # base channels, channel multiplier per resolution level, residual blocks per level, dropout
    "tiny": dict(base=16, mults=(1, 2, 2), num_res=1, dropout=0.0),     # 28 -> 14 -> 7: fast on a CPU
    "mnist": dict(base=64, mults=(1, 2, 2), num_res=2, dropout=0.1),    # 28 -> 14 -> 7
    "cifar": dict(base=128, mults=(1, 2, 2, 2), num_res=2, dropout=0.1),  # 32 -> 16 -> 8 -> 4
}


def preset_for(preset: str, image_size: int, channels: int) -> dict:
    """PRESETS[preset]; "auto" picks cifar for 32x32 RGB images, mnist for anything else."""
    return PRESETS[preset if preset != "auto" else "cifar" if (image_size, channels) == (32, 3) else "mnist"]


def norm(c: int) -> nn.GroupNorm:
    """GroupNorm with at most 32 groups of at least 4 channels each: never one channel per group, which would
    subtract any per-channel constant added before it (see ResBlock)."""
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
    """GroupNorm-SiLU-conv twice, the time embedding in between; optional self-attention after. GroupNorm
    subtracts each group's mean, so a per-channel constant added before it would be subtracted again: t
    enters after the norm, as a scale and a shift (Dhariwal & Nichol's scale-shift norm, DiT's adaLN):
        h = conv1(silu(norm1(x)));   h = norm2(h) * (1 + gamma(emb)) + beta(emb);   h = conv2(silu(h))"""

    def __init__(self, c_in: int, c_out: int, t_dim: int, dropout: float, attn: bool = False):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, 2 * c_out)                                  # emb -> (gamma, beta)
        self.norm2, self.drop, self.conv2 = norm(c_out), nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = SelfAttention(c_out) if attn else nn.Identity()

    def forward(self, x, emb):                           # x (N, c_in, H, W), emb (N, t_dim)
        gamma, beta = self.t_proj(emb)[:, :, None, None].chunk(2, dim=1)       # each (N, c_out, 1, 1)
        h = self.norm2(self.conv1(F.silu(self.norm1(x)))) * (1 + gamma) + beta  # t enters after the norm
        h = self.conv2(self.drop(F.silu(h)))
        return self.attn(self.skip(x) + h)               # (N, c_out, H, W)


class Level(nn.Module):
    """One resolution of the UNet: residual blocks, then a resampling layer (or none)."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module):
        super().__init__()
        self.blocks, self.resample = nn.ModuleList(blocks), resample


class UNet(nn.Module):
    """eps_theta(x_t, t): encoder, bottleneck and decoder with skip connections; self-attention at
    the lowest resolution. The lessons that build on it walk these same parts in their own forward."""

    def __init__(self, image_size=28, channels=1, base=64, mults=(1, 2, 2), num_res=2, dropout=0.1):
        super().__init__()
        k = 2 ** (len(mults) - 1)                        # the lowest level is image_size / k wide
        common.check(image_size % k == 0, f"image size {image_size} is not divisible by 2^{len(mults) - 1}; "
                     f"use fewer levels, or --pad-to {-(-image_size // k) * k} (ddpm_figures.py)")
        self.config = dict(image_size=image_size, channels=channels, base=base, mults=tuple(mults),
                           num_res=num_res, dropout=dropout)                   # what a loader rebuilds it from
        t_dim, last = 4 * base, len(mults) - 1
        self.base = base
        self.time_mlp = nn.Sequential(nn.Linear(base, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.inc = nn.Conv2d(channels, base, 3, padding=1)
        self.downs, skip_c, c = nn.ModuleList(), [], base
        for i, m in enumerate(mults):
            blocks = []
            for _ in range(num_res):
                blocks.append(ResBlock(c, base * m, t_dim, dropout, i == last))
                c = base * m
                skip_c.append(c)
            down = nn.Conv2d(c, c, 3, stride=2, padding=1) if i < last else nn.Identity()
            self.downs.append(Level(blocks, down))
        self.mid = nn.ModuleList([ResBlock(c, c, t_dim, dropout, True),
                                  ResBlock(c, c, t_dim, dropout, False)])
        self.ups = nn.ModuleList()
        for i, m in reversed(list(enumerate(mults))):
            blocks = []
            for _ in range(num_res):
                blocks.append(ResBlock(c + skip_c.pop(), base * m, t_dim, dropout, i == last))
                c = base * m
            up = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1)) if i > 0 else nn.Identity()
            self.ups.append(Level(blocks, up))
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # start by predicting eps = 0
        nn.init.zeros_(self.out[-1].bias)

    def embed_time(self, t):                             # t (N,) integer steps -> (N, t_dim)
        return self.time_mlp(common.timestep_embedding(t, self.base))

    def forward(self, x, t):                             # x (N, C, H, W), t (N,) -> eps (N, C, H, W)
        emb, h, hs = self.embed_time(t), self.inc(x), []
        for level in self.downs:                         # encoder: keep every block's output as a skip
            for block in level.blocks:
                h = block(h, emb)
                hs.append(h)
            h = level.resample(h)
        for block in self.mid:                           # bottleneck, at the lowest resolution
            h = block(h, emb)
        for level in self.ups:                           # decoder: each block takes the last unused skip
            for block in level.blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            h = level.resample(h)
        return self.out(h)


# ----------------------------------------------------------------------------- training


def load_data(cfg: Config, device, train: bool = True):
    """The whole split as one tensor on `device`: x (N, C, H, W) in [-1, 1], y (N,)."""
    return common.load_images(cfg.dataset, cfg.data_dir, train=train, download=cfg.download,
                              image_size=cfg.image_size or None, channels=cfg.channels, device=device)


def unet_kwargs(cfg: Config, x) -> dict:
    """The UNet's constructor arguments for images like x: the preset, overridden by --base/--mults/--num-res."""
    net = dict(preset_for(cfg.preset, x.shape[-1], x.shape[1]))
    net |= {k: v for k, v in dict(base=cfg.base, mults=tuple(cfg.mults), num_res=cfg.num_res).items() if v}
    return dict(image_size=x.shape[-1], channels=x.shape[1], **net)


def train(cfg: Config, model: UNet, ddpm: DDPM, x_train, device, same: tuple[str, ...] = SAME) -> tuple[UNet, DDPM]:
    """Algorithm 1 as a loop: AdamW with warm-up, EMA weights that sample, one atomic checkpoint per
    epoch (--resume continues it exactly; the cfg fields in `same` must match), a DDIM grid every
    --sample-every epochs. -> (EMA UNet in eval mode, ddpm)"""
    ckpt = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    model, ddpm = model.to(device), ddpm.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ema = common.make_ema(model, cfg.ema_decay)         # theta_ema: the weights that sample
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=device.type == "cuda")
    net = torch.compile(model) if cfg.compile else model
    step, start, losses = 0, 0, []
    if cfg.resume:  # weights, EMA, optimizer and RNG state come back; a changed process or network is refused
        state = checkpoints.resume(ckpt, device, KIND, model, ema, opt, cfg, same=same)
        step, start, losses = state["step"], state["epoch"], state["losses"]
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(x_train)} training "
          f"images on {device}")
    batch = min(cfg.batch_size, len(x_train))
    steps_per_epoch = len(x_train) // batch
    for epoch in range(start, cfg.epochs):
        model.train()
        t0, epoch_losses = time.perf_counter(), []
        for x0, _ in common.progress(common.batches(x_train, batch_size=batch, seed=cfg.seed + epoch),
                                     f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch):
            common.set_lr(opt, cfg.lr, step, cfg.warmup_steps, cfg.epochs * steps_per_epoch)
            with common.autocast(device, cfg.amp):
                loss = ddpm.loss(net, x0)                # || eps - eps_theta(x_t, t) ||^2 at a random t
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update_parameters(model)                 # theta_ema <- d theta_ema + (1 - d) theta
            epoch_losses.append(loss.detach())           # kept on the device: no sync per step
            step += 1
        epoch_losses = torch.stack(epoch_losses)
        checkpoints.check_finite(epoch_losses.mean(), step, ckpt)   # before saving: the last good epoch stays on disk
        common.sync(device)
        seconds = time.perf_counter() - t0
        print(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {epoch_losses.mean():.4f}  {seconds:.1f}s  "
              f"{len(epoch_losses) * batch / seconds:.0f} img/s", flush=True)
        losses += epoch_losses.tolist()
        checkpoints.save(ckpt, kind=KIND, net=model.config, config=asdict(cfg), model=model.state_dict(),
                         ema=ema.module.state_dict(), opt=opt.state_dict(), step=step, epoch=epoch + 1,
                         losses=losses, rng=checkpoints.rng_state())
        if (epoch + 1) % cfg.sample_every == 0 or epoch + 1 == cfg.epochs:
            sample_grid(cfg, ema.module.eval(), ddpm, device, f"samples_epoch{epoch + 1:03d}.png", f"epoch {epoch + 1}")
    plots.plot_curves(os.path.join(cfg.out, "loss.png"), {"train loss": plots.smooth(losses)},
                      title="training loss per step (running mean of 50)")
    return ema.module.eval(), ddpm


def ensure_trained(path: str, device, *, dataset: str = "mnist", data_dir: str = "data", download: bool = True,
                   image_size: int = 0, channels: int = 3, seed: int = 0, amp: bool = True) -> str:
    """The path of a trained ddpm_mnist.py checkpoint, for the scripts that build on one: the default
    path is trained first (with this script's defaults) when it is missing; any other path must exist."""
    if path == DEFAULT_CKPT and not os.path.isfile(path):
        print(f"no base model at '{path}': training it first with ddpm_mnist.py's defaults")
        cfg = Config(dataset=dataset, data_dir=data_dir, download=download, image_size=image_size,
                     channels=channels, seed=seed, amp=amp, out=os.path.dirname(path), ckpt=path)
        checkpoints.new_or_resume(path, resume=False, overwrite=False)
        common.seed_everything(seed)
        x_train = load_data(cfg, device)[0]
        train(cfg, UNet(**unet_kwargs(cfg, x_train)), DDPM(cfg.T, cfg.schedule, cfg.cosine_clip), x_train, device)
    common.check(os.path.isfile(path), f"--base-ckpt '{path}' not found; train one with `python ddpm_mnist.py "
                 f"--out DIR` and pass DIR/ckpt.pt, or leave --base-ckpt out to use (and train) {DEFAULT_CKPT}")
    return path


def load_trained(path: str, device) -> tuple[UNet, DDPM, dict]:
    """The EMA network (eval mode), the process and the whole state of a checkpoint written by `train`
    (state["net"]: the UNet's arguments)."""
    state = checkpoints.load(path, device, KIND, keys=("net", "ema", "config"),
                             hint="train one with `python ddpm_mnist.py` first")
    c = state["config"]
    other = [f"--{k.replace('_', '-')} {c[k]}" for k in ("predict", "pad_to", "time_embed", "arch")
             if c.get(k) not in (None, 0, "eps", "add", "unet")]  # ddpm_figures.py's exercises
    common.check(not other, f"'{path}' was trained with {' '.join(other)}: load it with ddpm_figures.py")
    model = UNet(**state["net"]).to(device)
    checkpoints.load_weights(model, state["ema"], path)
    return model.eval(), DDPM(c["T"], c["schedule"], c.get("cosine_clip", 0.999)).to(device), state


def sample_grid(cfg: Config, model, ddpm: DDPM, device, name: str, when: str) -> None:
    """OUT/name: --n-samples DDIM samples (--ddim-steps, --eta) of `model` from noise fixed by --seed, drawn
    by a generator of their own (the run's random state is untouched). ddpm_figures.py: the DDPM grid."""
    c = model.config
    x = ddpm.ddim_sample(ddpm.eps_from(model, cfg.clip), (cfg.n_samples, c["channels"], c["image_size"],
                         c["image_size"]), cfg.ddim_steps, cfg.eta, generator=common.generator(device, cfg.seed))
    plots.save_labelled_grid(x, os.path.join(cfg.out, name), 8, [], f"DDIM, {cfg.ddim_steps} steps, eta {cfg.eta:g}: "
                             f"{len(x)} samples of the EMA weights, {when}")


def main(argv=None) -> tuple[UNet, DDPM]:
    """Train (or load, --sample-only, and draw OUT/samples.png). -> (EMA UNet, DDPM)"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    device, ckpt = common.get_device(cfg.device), cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    common.prepare_out(cfg.out)
    common.seed_everything(cfg.seed)
    common.setup_speed(device)
    if cfg.sample_only:
        model, ddpm, _ = load_trained(ckpt, device)      # a missing or foreign file stops here
        sample_grid(cfg, model, ddpm, device, "samples.png", f"from {ckpt}")
    else:
        checkpoints.new_or_resume(ckpt, cfg.resume, cfg.overwrite)  # never replace a trained model by mistake
        x_train = load_data(cfg, device)[0]
        model, ddpm = train(cfg, UNet(**unet_kwargs(cfg, x_train)), DDPM(cfg.T, cfg.schedule, cfg.cosine_clip),
                            x_train, device)
    print(f"figures in {cfg.out}/")
    return model, ddpm


if __name__ == "__main__":
    main()
