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
Images live in [-1, 1] inside the model. The file reads as the paper does: the process (DDPM:
schedule, loss, samplers), the network that predicts eps (UNet), the training loop (train), figures.

Run:
    python ddpm_mnist.py                      # train 40 epochs into runs/ddpm_mnist/, then all figures
    python ddpm_mnist.py --epochs 100 --schedule cosine --out runs/cosine
    python ddpm_mnist.py --resume --epochs 60 # continue a run (takes a new --lr; T, schedule, preset must match)
    python ddpm_mnist.py --sample-only        # figures from runs/ddpm_mnist/ckpt.pt, no training
    python ddpm_mnist.py --preset tiny --epochs 1 --no-ddpm-grid --sweep-steps 10 50   # a CPU: minutes
    python ddpm_mnist.py --sample-only --eval 10000   # + FD-LeNet of DDPM and the DDIM sweep (evaluate.py)
    python ddpm_mnist.py --dataset cifar10    # pixel-space CIFAR-10 with the wider UNet preset
    python ddpm_mnist.py --dataset PATH       # your own images, PATH/<class>/<image>.png
The graded course interface (DiffusionModel, DiffusionProcess) lives in diffusion.py.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

KIND = "ddpm_mnist.py UNet"               # what this script's checkpoints hold (checked by every loader)
DEFAULT_CKPT = "runs/ddpm_mnist/ckpt.pt"  # the base model of the scripts that build on this one


@dataclass
class Config:
    dataset: str = field(default="mnist", metadata={"help": "mnist, cifar10, or an image folder ROOT/<class>/<image>"})
    data_dir: str = field(default="data", metadata={"help": "root of the torchvision datasets"})
    download: bool = field(default=True, metadata={"help": "download mnist/cifar10 when missing"})
    image_size: int = field(default=0, metadata={"help": "image folders only: resize to this (0 = 32)", "min": 0})
    channels: int = field(default=3, metadata={"help": "image folders only: 1 (gray) or 3 (RGB)", "choices": [1, 3]})
    preset: str = field(default="auto", metadata={"help": "UNet size (auto: cifar for 32x32 RGB, else mnist)",
                                                  "choices": ["auto", "tiny", "mnist", "cifar"]})
    schedule: str = field(default="linear", metadata={"help": "beta_t", "choices": ["linear", "cosine", "sigmoid"]})
    T: int = field(default=1000, metadata={"help": "number of diffusion steps", "min": 1})
    epochs: int = field(default=40, metadata={"help": "epochs in all (with --resume: up to this many)", "min": 1})
    batch_size: int = field(default=128, metadata={"help": "images per step", "min": 1})
    lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate after warm-up"})
    warmup_steps: int = field(default=500, metadata={"help": "lr warm-up (at most a fifth of the run)", "min": 0})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA of the weights that sample"})
    sigma: str = field(default="posterior", metadata={"help": "DDPM sigma_t^2", "choices": ["beta", "posterior"]})
    ddim_steps: int = field(default=50, metadata={"help": "DDIM steps of the grids and progress samples", "min": 1})
    eta: float = field(default=0.0, metadata={"help": "DDIM noise: 0 deterministic, 1 DDPM-like", "min": 0})
    n_samples: int = field(default=64, metadata={"help": "images per sample grid", "min": 2})
    sample_every: int = field(default=5, metadata={"help": "epochs between progress grids", "min": 1})
    ddpm_grid: bool = field(default=True, metadata={"help": "DDPM grids ddpm_4x4/8x8.png: T UNet passes over "
                            "--n-samples images (2-core CPU: ~10 min with --preset tiny, ~1 h with the mnist UNet)"})
    sweep_steps: tuple[int, ...] = field(default=(10, 20, 50, 100, 1000), metadata={"min": 0, "help": "DDIM step "
                                         "counts of ddim_sweep.png, 8 images each; counts above --T are left out, 0 = "
                                         "no sweep (2-core CPU, per 1000 steps: ~1.5 min tiny, ~8 min mnist UNet)"})
    eval: int = field(default=0, metadata={"min": 0, "help": "score N samples from DDPM and from each DDIM sweep "
                      "step count with evaluate.py into OUT/eval.md; 0 = off; costs N x (T + sweep steps) UNet passes"})
    out: str = field(default="runs/ddpm_mnist", metadata={"help": "folder of the checkpoint and figures"})
    ckpt: str = field(default="", metadata={"help": "checkpoint path (empty: OUT/ckpt.pt)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --ckpt up to --epochs"})
    overwrite: bool = field(default=False, metadata={"help": "replace the run in --ckpt with a new one"})
    sample_only: bool = field(default=False, metadata={"help": "load --ckpt and make figures, no training"})
    seed: int = field(default=0, metadata={"help": "same seed: same batches, noise and samples"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    amp: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the UNet"})


def check_config(cfg: Config) -> None:
    """What the flags' choices and minimums cannot say; each check stops in one line, before any work."""
    common.check(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    common.check(0 <= cfg.ema_decay < 1, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    common.check(cfg.ddim_steps <= cfg.T, f"--ddim-steps must be in 1..--T ({cfg.T}), got {cfg.ddim_steps}")
    common.check(cfg.eval != 1, "--eval must be 0 (off) or >= 2 samples, got 1")


# ----------------------------------------------------------------------------- the method


class DDPM(nn.Module):
    """The diffusion process: schedule buffers named after the paper's symbols, the training loss,
    and the two samplers. Samplers take the noise predictor `model(x_t, t)` as an argument."""

    def __init__(self, T: int = 1000, schedule: str = "linear"):
        super().__init__()
        self.T = T
        beta = common.make_beta_schedule(schedule, T)                    # beta_t, float64
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
        """Simple DDPM loss: MSE between the true and the predicted noise at a random step."""
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        return F.mse_loss(model(self.q_sample(x0, t, eps), t).float(), eps)

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


PRESETS = {  # base channels, channel multiplier per resolution level, residual blocks per level
    "tiny": dict(base=16, mults=(1, 2, 2), num_res=1),  # 28 -> 14 -> 7: attention over 49 positions, fast on a CPU
    "mnist": dict(base=64, mults=(1, 2, 2), num_res=2),    # 28 -> 14 -> 7
    "cifar": dict(base=128, mults=(1, 2, 2, 2), num_res=2),  # 32 -> 16 -> 8 -> 4
}


def norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, c), c)


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
    """GroupNorm-SiLU-conv twice; the time embedding, projected by a linear layer, is *added* to
    the feature maps in between. Optional self-attention after the residual."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, dropout: float, attn: bool = False):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)
        self.norm2, self.drop, self.conv2 = norm(c_out), nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = SelfAttention(c_out) if attn else nn.Identity()

    def forward(self, x, emb):                           # x (N, c_in, H, W), emb (N, t_dim)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.t_proj(emb)[:, :, None, None]       # time enters every block
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.attn(self.skip(x) + h)               # (N, c_out, H, W)


class Level(nn.Module):
    """One resolution of the UNet: residual blocks, then a resampling layer (or none)."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module):
        super().__init__()
        self.blocks, self.resample = nn.ModuleList(blocks), resample


class UNet(nn.Module):
    """eps_theta(x_t, t): encoder, bottleneck and decoder with skip connections; self-attention at
    the lowest resolution. `encode`/`decode` are separate so ControlNet and DeepCache can reach in."""

    def __init__(self, image_size=28, channels=1, base=64, mults=(1, 2, 2), num_res=2, dropout=0.1):
        super().__init__()
        common.check(image_size % 2 ** (len(mults) - 1) == 0,
                     f"image size {image_size} is not divisible by 2^{len(mults) - 1}; use fewer levels")
        self.config = dict(image_size=image_size, channels=channels, base=base, mults=tuple(mults),
                           num_res=num_res, dropout=dropout)
        t_dim, last = 4 * base, len(mults) - 1
        self.base = base
        self.time_mlp = nn.Sequential(nn.Linear(base, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.inc = nn.Conv2d(channels, base, 3, padding=1)
        self.downs, skip_c, c = nn.ModuleList(), [], base
        for i, m in enumerate(mults):
            blocks = []
            for _ in range(num_res):
                blocks.append(ResBlock(c, base * m, t_dim, dropout, attn=i == last))
                c = base * m
                skip_c.append(c)
            down = nn.Conv2d(c, c, 3, stride=2, padding=1) if i < last else nn.Identity()
            self.downs.append(Level(blocks, down))
        self.mid = nn.ModuleList([ResBlock(c, c, t_dim, dropout, attn=True), ResBlock(c, c, t_dim, dropout)])
        self.ups = nn.ModuleList()
        for i, m in reversed(list(enumerate(mults))):
            blocks = []
            for _ in range(num_res):
                blocks.append(ResBlock(c + skip_c.pop(), base * m, t_dim, dropout, attn=i == last))
                c = base * m
            up = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1)) if i > 0 else nn.Identity()
            self.ups.append(Level(blocks, up))
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # start by predicting eps = 0
        nn.init.zeros_(self.out[-1].bias)

    def embed_time(self, t):                             # t (N,) integer steps -> (N, t_dim)
        return self.time_mlp(common.timestep_embedding(t, self.base))

    def encode(self, x, emb):
        """-> bottleneck features h and the list of skip activations, shallowest first."""
        h, hs = self.inc(x), []
        for level in self.downs:
            for block in level.blocks:
                h = block(h, emb)
                hs.append(h)
            h = level.resample(h)
        for block in self.mid:
            h = block(h, emb)
        return h, hs

    def decode(self, h, hs, emb):
        hs = list(hs)
        for level in self.ups:
            for block in level.blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            h = level.resample(h)
        return self.out(h)

    def forward(self, x, t):                             # x (N, C, H, W), t (N,) -> eps (N, C, H, W)
        emb = self.embed_time(t)
        return self.decode(*self.encode(x, emb), emb)


# ----------------------------------------------------------------------------- training


def load_data(cfg: Config, device, train: bool = True):
    """The whole split as one tensor on `device`: x (N, C, H, W) in [-1, 1], y (N,)."""
    return common.load_images(cfg.dataset, cfg.data_dir, train=train, download=cfg.download,
                              image_size=cfg.image_size or None, channels=cfg.channels, device=device)


def train(cfg: Config, x_train, y_train, device) -> tuple[UNet, DDPM]:
    """Algorithm 1 as a loop: AdamW with warm-up, EMA weights that sample, one atomic checkpoint per
    epoch (--resume continues it exactly), a DDIM grid every --sample-every epochs. -> (EMA UNet, DDPM)"""
    ckpt = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    preset = cfg.preset if cfg.preset != "auto" else "cifar" if x_train.shape[1:] == (3, 32, 32) else "mnist"
    model = UNet(x_train.shape[-1], x_train.shape[1], **PRESETS[preset]).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ema, opt = common.make_ema(model, cfg.ema_decay), common.make_optimizer(model, cfg.lr)
    ddpm = DDPM(cfg.T, cfg.schedule).to(device)
    net = torch.compile(model) if cfg.compile else model
    step, start, losses = 0, 0, []
    if cfg.resume:  # weights, EMA, optimizer and RNG state; a changed T, schedule or preset is refused
        step, start, losses = common.resume(ckpt, device, KIND, cfg, ("T", "schedule", "preset"), model, ema, opt)
    print(f"UNet: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(x_train)} training images on {device}")
    batch = min(cfg.batch_size, len(x_train))
    steps_per_epoch = len(x_train) // batch
    for epoch in range(start, cfg.epochs):
        model.train()
        t0, epoch_losses = time.perf_counter(), []
        for x0, _ in common.progress(common.batches(x_train, y_train, batch, cfg.seed + epoch),
                                     f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch):
            common.set_lr(opt, cfg.lr, step, cfg.warmup_steps, cfg.epochs * steps_per_epoch)
            with common.autocast(device, cfg.amp):
                loss = ddpm.loss(net, x0)                # || eps - eps_theta(x_t, t) ||^2 at a random t
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update_parameters(model)                 # theta_ema <- d theta_ema + (1 - d) theta
            epoch_losses.append(loss.detach())
            step += 1
        mean = torch.stack(epoch_losses).mean()
        common.check_finite(mean, step, ckpt)            # before saving: the last good checkpoint stays
        losses += torch.stack(epoch_losses).tolist()
        common.sync(device)
        seconds = time.perf_counter() - t0
        print(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {mean.item():.4f}  {seconds:.1f}s  "
              f"{len(epoch_losses) * batch / seconds:.0f} img/s")
        common.save_checkpoint(ckpt, kind=KIND, net=model.config, config=asdict(cfg),
                               **common.training_state(model, ema, opt, step, epoch + 1, losses))
        if (epoch + 1) % cfg.sample_every == 0 or epoch + 1 == cfg.epochs:  # own generator: the run's RNG is untouched
            x = ddpm.ddim_sample(ema.module.eval(), (cfg.n_samples, *x_train.shape[1:]), cfg.ddim_steps,
                                 generator=torch.Generator(device).manual_seed(cfg.seed))
            common.save_grid(x, os.path.join(cfg.out, f"samples_epoch{epoch + 1:03d}.png"))
    common.plot_curves(os.path.join(cfg.out, "loss.png"), {"train loss": common.smooth(losses)})
    return ema.module.eval(), ddpm


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
        train(cfg, *load_data(cfg, device), device)
    common.check(os.path.isfile(path), f"--base-ckpt '{path}' not found; train one with `python ddpm_mnist.py "
                 f"--out DIR` and pass DIR/ckpt.pt, or leave --base-ckpt out to use (and train) {DEFAULT_CKPT}")
    return path


def load_trained(path: str, device) -> tuple[UNet, DDPM, dict]:
    """The EMA network (eval mode), the diffusion process and the whole state of a checkpoint
    written by `train`; state["net"] holds the UNet's constructor arguments."""
    state = common.load_checkpoint(path, device, KIND, keys=("net", "ema", "config"),
                                   hint="train one with `python ddpm_mnist.py` first")
    model = UNet(**state["net"]).to(device)
    common.load_weights(model, state["ema"], path)
    return model.eval(), DDPM(state["config"]["T"], state["config"]["schedule"]).to(device), state


# ----------------------------------------------------------------------------- figures


@torch.no_grad()
def test_loss_per_timestep(model, ddpm: DDPM, x_test, bins: int = 20, max_images: int = 2000, seed: int = 0):
    """Test loss with one random t per image, averaged overall and within `bins` bins of t."""
    g = torch.Generator(x_test.device).manual_seed(seed)
    x0 = x_test[:max_images]
    t = torch.randint(0, ddpm.T, (len(x0),), device=x0.device, generator=g)
    eps = torch.randn(x0.shape, device=x0.device, generator=g)
    per_image = torch.cat([((model(ddpm.q_sample(a, b, c), b).float() - c) ** 2).flatten(1).mean(1)
                           for a, b, c in zip(x0.split(256), t.split(256), eps.split(256))])
    idx = (t * bins // ddpm.T)
    curve = [((i + 0.5) * ddpm.T / bins, per_image[idx == i].mean().item()) for i in range(bins) if (idx == i).any()]
    return per_image.mean().item(), curve


def slerp(z0, z1, alpha):
    """Spherical interpolation: keeps interpolated Gaussian noise at the norm the model expects."""
    omega = torch.acos((z0.flatten() @ z1.flatten() / (z0.norm() * z1.norm())).clamp(-1, 1))
    return (torch.sin((1 - alpha) * omega) * z0 + torch.sin(alpha * omega) * z1) / torch.sin(omega)


def make_figures(cfg: Config, model, ddpm: DDPM, device, shape) -> None:
    """Cheap: test loss per timestep, DDIM grids, noise interpolation. Expensive, each timed and
    optional: the DDPM grids (--no-ddpm-grid), the DDIM step sweep (--sweep-steps), --eval N."""
    out, n, T = cfg.out, cfg.n_samples, ddpm.T
    gen = lambda: torch.Generator(device).manual_seed(cfg.seed)  # noqa: E731 (same noise for every figure)
    x_T = torch.randn((n, *shape), device=device, generator=gen())
    x_test, _ = load_data(cfg, device, train=False)
    test_loss, per_t = test_loss_per_timestep(model, ddpm, x_test, seed=cfg.seed)
    print(f"test loss {test_loss:.4f} ({min(len(x_test), 2000)} test images)")
    common.plot_curves(os.path.join(out, "loss_per_timestep.png"), {"test loss": per_t}, xlabel="t",
                       title=f"test loss per timestep (mean {test_loss:.4f})")

    x, sec = common.timed(device, lambda: ddpm.ddim_sample(model, x_T.shape, cfg.ddim_steps, cfg.eta, x_T=x_T,
                                                          generator=gen()))
    print(f"DDIM grid: {cfg.ddim_steps} steps x {n} images in {sec:.1f}s")
    common.save_grid(x[:16], os.path.join(out, f"ddim{cfg.ddim_steps}_4x4.png"), nrow=4)
    common.save_grid(x, os.path.join(out, f"ddim{cfg.ddim_steps}_8x8.png"), nrow=8)
    z = torch.stack([slerp(x_T[0], x_T[1], a) for a in torch.linspace(0, 1, 10, device=device)])
    x = ddpm.ddim_sample(model, z.shape, cfg.ddim_steps, x_T=z)
    common.save_grid(x, os.path.join(out, "interpolation.png"), nrow=10)
    if cfg.ddpm_grid:
        print(f"DDPM grid: {T} steps x {n} images (--no-ddpm-grid skips it) ...", flush=True)
        x, sec = common.timed(device, lambda: ddpm.ddpm_sample(model, x_T.shape, cfg.sigma, x_T=x_T, generator=gen()))
        print(f"DDPM grid: {T} steps x {n} images in {sec:.1f}s")
        common.save_grid(x[:16], os.path.join(out, "ddpm_4x4.png"), nrow=4)
        common.save_grid(x, os.path.join(out, "ddpm_8x8.png"), nrow=8)

    sweep = sorted({s for s in cfg.sweep_steps if 1 <= s <= T})
    if sweep:  # the same 8 noise images through each step count: one row each, and its wall time
        print(f"DDIM sweep: {' + '.join(map(str, sweep))} steps x 8 images (--sweep-steps sets them) ...", flush=True)
        rows, times = [], []
        for steps in sweep:
            x, sec = common.timed(device, lambda: ddpm.ddim_sample(model, x_T[:8].shape, steps, x_T=x_T[:8]))
            rows.append(x)
            times.append((steps, sec))
            print(f"DDIM {steps:4d} steps: {sec:.2f}s per batch of 8")
        common.save_grid(torch.cat(rows), os.path.join(out, "ddim_sweep.png"), nrow=8)
        common.plot_curves(os.path.join(out, "ddim_sweep_time.png"), {"batch of 8": times}, xlabel="DDIM steps",
                           ylabel="seconds per batch", title="DDIM: steps vs wall time")
    if cfg.eval:  # opt-in: the same sweep, measured (FD in a cached classifier's features, see evaluate.py)
        import evaluate
        ev = evaluate.Evaluator(cfg.dataset, cfg.data_dir, cfg.download, device,
                                image_size=cfg.image_size or None, channels=cfg.channels)
        samplers = {("DDPM", T): lambda z, g: ddpm.ddpm_sample(model, z.shape, cfg.sigma, x_T=z, generator=g)}
        samplers |= {("DDIM", s): lambda z, g, s=s: ddpm.ddim_sample(model, z.shape, s, cfg.eta, x_T=z, generator=g)
                     for s in sweep}
        evaluate.score_sweep(ev, samplers, cfg.eval, shape, device, os.path.join(out, "eval.md"), cfg.seed, amp=cfg.amp)


def main(argv=None) -> None:
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    device = common.get_device(cfg.device)
    ckpt = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    common.prepare_out(cfg.out)
    if cfg.sample_only:
        model, ddpm, _ = load_trained(ckpt, device)            # a missing or foreign file stops here
        common.check(cfg.ddim_steps <= ddpm.T, f"--ddim-steps must be in 1..{ddpm.T} (the T of '{ckpt}'), "
                     f"got {cfg.ddim_steps}")
    else:
        common.new_or_resume(ckpt, cfg.resume, cfg.overwrite)  # never replace a trained model by mistake
    common.seed_everything(cfg.seed)
    common.setup_speed(device)
    if not cfg.sample_only:
        x_train, y_train = load_data(cfg, device)
        model, ddpm = train(cfg, x_train, y_train, device)
    c = model.config
    make_figures(cfg, model, ddpm, device, (c["channels"], c["image_size"], c["image_size"]))
    print(f"figures in {cfg.out}/")


if __name__ == "__main__":
    main()
