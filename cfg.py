"""Classifier-free guidance (Ho & Salimans, 2022): one class-conditional UNet that has also learned
the unconditional task, and a guidance weight w that trades diversity for class fidelity.

Training is ddpm_mnist.py's DDPM loss with the label y as a second input, replaced by a dedicated
null class (id K = the number of classes, "no label") with probability p_uncond:
    L = || eps - eps_theta(x_t, t, y~) ||^2,   y~ = null with probability p_uncond, else y
Sampling runs ddpm_mnist.py's DDPM or DDIM sampler, unchanged, on the guided noise prediction
    eps~(x_t, t, y) = eps_theta(x_t, t, null) + w (eps_theta(x_t, t, y) - eps_theta(x_t, t, null))
w = 1 is the plain conditional model, w = 0 the unconditional one; w > 1 extrapolates away from the
unconditional prediction: more typical digits, less variety. Both predictions come from ONE forward
pass over the doubled batch [x_t, x_t] with labels [y, null].
How the label enters the network (--cond):
    input  (a): a learned embedding of y, shaped into `planes` maps of the image size and
                concatenated with x_t as extra input channels
    xattn  (b): cross-attention from the feature maps (queries) to `tokens` learned class tokens
                (keys, values) after every block of the lowest resolution and of the bottleneck;
                the forward hands the tokens to those blocks as an argument, like the time embedding
Conventions of ddpm_mnist.py: integer steps t = 0..T-1, images in [-1, 1], EMA weights sample.

Run:
    python cfg.py                          # train with cross-attention into runs/cfg/ (the loss and a
                                           # grid at w = --scale every --sample-every epochs)
    python cfg.py --cond input             # the label as input maps instead
    python cfg.py --resume                 # continue an interrupted run (--overwrite: start again)
    python -m tools.cfg_sweep --scales 0 1 2 4 --classes 3 8   # from runs/cfg/ckpt.pt: a grid per w, what w trades
"""
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import common
import plots
import ddpm_mnist
from ddpm_mnist import DDPM, PRESETS, norm, preset_for

KIND = "cfg.py CondUNet"


@dataclass
class Config(common.RunConfig):   # --scales and the flags below it are cfg_sweep.py's
    dataset: str = field(default="mnist", metadata={"help": "mnist, cifar10, or an image folder ROOT/<class>/"})
    image_size: int = field(default=0, metadata={"help": "resize images to this (0: MNIST 28, others 32)", "min": 0})
    channels: int = field(default=3, metadata={"help": "image folders only: 1 (gray) or 3 (RGB)", "choices": [1, 3]})
    cond: str = field(default="xattn", metadata={"help": "how y enters the UNet", "choices": ["input", "xattn"]})
    planes: int = field(default=4, metadata={"help": "--cond input: label maps concatenated with x_t", "min": 1})
    tokens: int = field(default=4, metadata={"help": "--cond xattn: class tokens per label", "min": 1})
    cond_dim: int = field(default=128, metadata={"help": "--cond xattn: width of a class token", "min": 1})
    p_uncond: float = field(default=0.1, metadata={"help": "probability of dropping y to the null class", "min": 0})
    preset: str = field(default="auto", metadata={"help": "UNet size", "choices": ["auto", *PRESETS]})
    schedule: str = field(default="linear", metadata={"help": "beta_t", "choices": ["linear", "cosine", "sigmoid"]})
    T: int = field(default=1000, metadata={"help": "number of diffusion steps", "min": 1})
    epochs: int = field(default=30, metadata={"help": "passes over the training set", "min": 1})
    batch_size: int = field(default=128, metadata={"help": "images per optimizer step", "min": 1})
    lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate (after the warm-up)"})
    warmup_steps: int = field(default=500, metadata={"help": "linear warm-up (at most a fifth of the run)", "min": 0})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA of the weights, which sample", "min": 0})
    scale: float = field(default=3.0, metadata={"help": "guidance weight w of the progress grids"})
    classes: tuple[int, ...] = field(default=tuple(range(10)), metadata={"help": "classes (grid rows)", "min": 0})
    ddim_steps: int = field(default=50, metadata={"help": "DDIM steps (at most --T)", "min": 1})
    clip: bool = field(default=True, metadata={"help": "clip x0_hat to [-1, 1] at every step (large w overshoots)"})
    sample_every: int = field(default=5, metadata={"help": "epochs between progress grids", "min": 1})
    out: str = field(default="runs/cfg", metadata={"help": "output folder"})
    ckpt: str = field(default="", metadata={"help": "checkpoint path (default OUT/ckpt.pt)"})
    scales: tuple[float, ...] = field(default=(0.0, 1.0, 3.0, 5.0, 7.5), metadata={"help": "guidance weights w"})
    n_per_class: int = field(default=50, metadata={"help": "samples per class and w (grids show 10)", "min": 2})
    sampler: str = field(default="ddim", metadata={"help": "ddpm runs all T steps", "choices": ["ddim", "ddpm"]})
    eta: float = field(default=0.0, metadata={"help": "DDIM noise: 0 deterministic, 1 DDPM-like", "min": 0})
    eval: int = field(default=0, metadata={"help": "class accuracy and FD of N samples per w (0: off)", "min": 0})


def check_config(cfg: Config) -> None:
    """The checks that argparse (choices, min) cannot make (cfg_sweep.py's too: it sets --sample-only)."""
    common.check(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    common.check(cfg.p_uncond < 1, f"--p-uncond must be < 1 (1 never shows a label), got {cfg.p_uncond}")
    common.check(cfg.p_uncond > 0 or cfg.sample_only, "--p-uncond 0 never shows the network the null class, so "
                 "guidance would extrapolate from a prediction it never learned; train with --p-uncond 0.1")
    common.check(all(math.isfinite(w) for w in (cfg.scale, *cfg.scales)),
                 f"--scale and --scales must be finite numbers, got {cfg.scale} and {cfg.scales}")
    common.check(cfg.sample_only or cfg.ddim_steps <= cfg.T, f"--ddim-steps must be at most --T ({cfg.T}), "
                 f"got {cfg.ddim_steps}")
    common.check(cfg.eval != 1, "--eval needs at least 2 samples for a Frechet distance (or 0: off)")


# ----------------------------------------------------------------------------- the method


def drop_labels(y: torch.Tensor, p_uncond: float, null: int) -> torch.Tensor:
    """y~: each label replaced by the null id with probability p_uncond, so that one network learns
    both eps(x_t, t, y) and eps(x_t, t, null)."""
    drop = torch.rand(y.shape, device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, null), y)


def loss(ddpm: DDPM, model, x0: torch.Tensor, y: torch.Tensor, p_uncond: float, null: int) -> torch.Tensor:
    """L = || eps - eps_theta(x_t, t, y~) ||^2: DDPM.loss with the (dropped) label bound to the model."""
    y_tilde = drop_labels(y, p_uncond, null)
    return ddpm.loss(lambda x_t, t: model(x_t, t, y_tilde), x0)


def guided_eps(model: "CondUNet", y: torch.Tensor, w: float):
    """The guided noise predictor eps~(x_t, t) for labels y (N,) and weight w, in the form the
    samplers call, model(x_t, t). One forward pass of 2N images gives eps_cond and eps_uncond.
    Any network model(x_t, t, y) with a null id model.null will do: dit_cifar.py's DiT uses it too."""
    null = torch.full_like(y, model.null)

    def eps(x_t, t):                                                   # x_t (N, C, H, W), t (N,)
        e = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).float()  # (2N, C, H, W)
        eps_cond, eps_uncond = e.chunk(2)
        return eps_uncond + w * (eps_cond - eps_uncond)  # eps~ = eps_uncond + w (eps_cond - eps_uncond)
    return eps


@torch.no_grad()
def sample(model: "CondUNet", ddpm: DDPM, y: torch.Tensor, w: float, sampler: str = "ddim", steps: int = 50,
           eta: float = 0.0, clip: bool = True, x_T=None, generator=None) -> torch.Tensor:
    """Images (N, C, H, W), clamped to [-1, 1], of the classes y (N,) at guidance weight w. With
    `clip`, the estimate x0_hat of the guided eps is clipped to [-1, 1] at every step (clip_x0)."""
    common.check(bool(((y >= 0) & (y < model.null)).all()),
                 f"class labels must be in 0..{model.null - 1}, got {sorted(set(y.tolist()))}")
    common.check(isinstance(w, (int, float)) and math.isfinite(w), f"the guidance weight w must be a number, got {w!r}")
    c = model.config
    shape = (len(y), c["channels"], c["image_size"], c["image_size"])
    eps = ddpm_mnist.clip_x0(guided_eps(model, y, w), ddpm.alpha_bar) if clip else guided_eps(model, y, w)
    if sampler == "ddpm":
        x = ddpm.ddpm_sample(eps, shape, x_T=x_T, generator=generator)
    else:
        x = ddpm.ddim_sample(eps, shape, steps, eta, x_T=x_T, generator=generator)
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------- network


class CrossAttention(nn.Module):
    """Feature maps attend to the class tokens of their label:
        h <- h + proj(softmax(q k^T / sqrt(d)) v),  q = W_q norm(h) (one per pixel), (k, v) = W_kv tokens.
    `proj` starts at zero, so the block begins as the identity and the label's effect is learned."""

    def __init__(self, c: int, cond_dim: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm, self.q, self.kv = norm(c), nn.Conv2d(c, c, 1), nn.Linear(cond_dim, 2 * c)
        self.proj = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h, tokens):                        # h (N, C, H, W), tokens (N, L, cond_dim)
        N, C, H, W = h.shape
        q = self.q(self.norm(h)).reshape(N, self.heads, C // self.heads, H * W).transpose(-1, -2)
        k, v = self.kv(tokens).reshape(N, -1, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))  # (N, heads, HW, C/heads)
        return h + self.proj(a.transpose(-1, -2).reshape(N, C, H, W))


class XAttnBlock(nn.Module):
    """A ResBlock of ddpm_mnist's UNet, then cross-attention to the class tokens: (h, emb, tokens) -> h."""

    def __init__(self, block: nn.Module, c: int, cond_dim: int):
        super().__init__()
        self.block, self.xattn = block, CrossAttention(c, cond_dim)

    def forward(self, h, emb, tokens):
        return self.xattn(self.block(h, emb), tokens)


class CondUNet(ddpm_mnist.UNet):
    """eps_theta(x_t, t, y): ddpm_mnist's UNet with a label y in 0..K-1, or y = K = `null` (none).
    Its forward walks the UNet's parts as UNet.forward does and hands the class tokens to the
    cross-attention blocks, an argument beside the time embedding (nothing is stored between calls)."""

    def __init__(self, num_classes: int, cond: str = "xattn", planes: int = 4, tokens: int = 4,
                 cond_dim: int = 128, **unet):
        super().__init__(**unet)
        self.config.update(num_classes=num_classes, cond=cond, planes=planes, tokens=tokens, cond_dim=cond_dim)
        self.cond, self.null, self.n_tokens = cond, num_classes, tokens
        if cond == "input":   # (a) x_t and `planes` label maps enter the first convolution together.
            # Maps, not constants: a constant plane only adds a per-channel offset, which the GroupNorm
            # that opens every ResBlock subtracts again (it all but stopped the label from training).
            self.label_maps = nn.Embedding(num_classes + 1, planes * self.config["image_size"] ** 2)
            self.inc = nn.Conv2d(self.config["channels"] + planes, self.base, 3, padding=1)
        else:                 # (b) cross-attention after each block of the lowest resolution and the bottleneck
            self.label_tokens = nn.Embedding(num_classes + 1, tokens * cond_dim)
            c = self.base * self.config["mults"][-1]     # the width of all those blocks
            for blocks in (self.downs[-1].blocks, self.mid, self.ups[0].blocks):
                for i, block in enumerate(blocks):
                    blocks[i] = XAttnBlock(block, c, cond_dim)

    def forward(self, x, t, y):                          # x (N, C, H, W), t (N,), y (N,) -> eps (N, C, H, W)
        emb, tokens = self.embed_time(t), None
        if self.cond == "input":
            maps = self.label_maps(y).reshape(len(y), -1, *x.shape[-2:])                 # (N, planes, H, W)
            x = torch.cat([x, maps.to(x.dtype)], dim=1)                                   # (N, C + planes, H, W)
        else:
            tokens = self.label_tokens(y).reshape(len(y), self.n_tokens, -1)              # (N, tokens, cond_dim)

        def run(block, h):                               # the tokens go to the cross-attention blocks only
            return block(h, emb, tokens) if isinstance(block, XAttnBlock) else block(h, emb)

        h, hs = self.inc(x), []
        for level in self.downs:                         # encoder: keep every block's output as a skip
            for block in level.blocks:
                h = run(block, h)
                hs.append(h)
            h = level.resample(h)
        for block in self.mid:                           # bottleneck, at the lowest resolution
            h = run(block, h)
        for level in self.ups:                           # decoder: each block takes the last unused skip
            for block in level.blocks:
                h = run(block, torch.cat([h, hs.pop()], dim=1))
            h = level.resample(h)
        return self.out(h)


def build_unet(cfg: Config, image_size: int, channels: int, num_classes: int) -> CondUNet:
    return CondUNet(num_classes, cfg.cond, cfg.planes, cfg.tokens, cfg.cond_dim, image_size=image_size,
                    channels=channels, **preset_for(cfg.preset, image_size, channels))


# ----------------------------------------------------------------------------- training


def train(cfg: Config, x_train: torch.Tensor, y_train: torch.Tensor, ckpt: str, device) -> tuple[CondUNet, DDPM]:
    """AdamW with warm-up on the CFG loss, EMA weights that sample, one atomic checkpoint per epoch
    (--resume continues it exactly), a guided grid every --sample-every epochs. -> (EMA CondUNet, DDPM)"""
    K = int(y_train.max()) + 1
    model = build_unet(cfg, x_train.shape[-1], x_train.shape[1], K).to(device)
    ema = common.make_ema(model, cfg.ema_decay)          # theta_ema, the weights that sample
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=device.type == "cuda")
    ddpm = DDPM(cfg.T, cfg.schedule).to(device)
    step, start, losses = 0, 0, []
    if cfg.resume:   # weights, EMA, optimizer and RNG come back; a changed process or network is refused
        state = checkpoints.resume(ckpt, device, KIND, model, ema, opt, cfg, same=(
            "T", "schedule", "preset", "cond", "planes", "tokens", "cond_dim", "image_size", "channels"))
        step, start, losses = state["step"], state["epoch"], state["losses"]
    net = torch.compile(model) if cfg.compile else model
    batch = min(cfg.batch_size, len(x_train))
    total = cfg.epochs * (len(x_train) // batch)
    print(f"CondUNet ({cfg.cond}): {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(x_train)} training images, {K} classes, null id {K}, on {device}")
    for epoch in range(start, cfg.epochs):
        model.train()
        t0, epoch_losses = time.perf_counter(), []
        for x0, y in common.progress(common.batches(x_train, y_train, batch, cfg.seed + epoch),
                                     f"epoch {epoch + 1}/{cfg.epochs}"):
            common.set_lr(opt, cfg.lr, step, cfg.warmup_steps, total)
            with common.autocast(device, cfg.amp):
                batch_loss = loss(ddpm, net, x0, y, cfg.p_uncond, K)   # || eps - eps_theta(x_t, t, y~) ||^2
            opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            opt.step()
            ema.update_parameters(model)                 # theta_ema <- d theta_ema + (1 - d) theta
            epoch_losses.append(batch_loss.detach())     # on the device: no sync per step
            step += 1
        epoch_losses = torch.stack(epoch_losses)
        checkpoints.check_finite(epoch_losses.mean(), step, ckpt)   # before saving: the last good epoch stays on disk
        seconds = time.perf_counter() - t0
        print(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {epoch_losses.mean().item():.4f}  {seconds:.1f}s  "
              f"{len(epoch_losses) * batch / seconds:.0f} img/s", flush=True)
        losses += epoch_losses.tolist()
        checkpoints.save(ckpt, kind=KIND, net=model.config, config=asdict(cfg), model=model.state_dict(),
                         ema=ema.module.state_dict(), opt=opt.state_dict(), step=step, epoch=epoch + 1,
                         losses=losses, rng=checkpoints.rng_state())
        if (epoch + 1) % cfg.sample_every == 0 or epoch + 1 == cfg.epochs:   # own generator: the run's RNG stays
            y = torch.tensor(cfg.classes, device=device).repeat_interleave(8)     # one row of 8 per class
            x = sample(ema.module.eval(), ddpm, y, cfg.scale, "ddim", cfg.ddim_steps, 0.0, cfg.clip,
                       generator=common.generator(device, cfg.seed))
            plots.save_labelled_grid(x, os.path.join(cfg.out, f"samples_epoch{epoch + 1:03d}_w{cfg.scale:g}.png"), 8,
                                     [f"class {k}" for k in cfg.classes], f"CFG after epoch {epoch + 1}: EMA weights, "
                                     f"w = {cfg.scale:g}, DDIM-{cfg.ddim_steps}")
    plots.plot_curves(os.path.join(cfg.out, "loss.png"), {"train loss": plots.smooth(losses)},
                      title=f"CondUNet ({cfg.cond}): training loss per step (smoothed)")
    return ema.module.eval(), ddpm


def main(argv=None) -> tuple[CondUNet, DDPM]:
    """Train (or continue, --resume) into --out. -> (EMA CondUNet, DDPM)"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    common.check(not cfg.sample_only, "cfg.py trains; sample a trained run with `python -m tools.cfg_sweep` (same flags)")
    check_config(cfg)
    common.seed_everything(cfg.seed)
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    common.prepare_out(cfg.out)
    ckpt = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    checkpoints.new_or_resume(ckpt, cfg.resume, cfg.overwrite)
    x_train, y_train = common.load_images(cfg.dataset, cfg.data_dir, True, cfg.download, cfg.image_size or None,
                                          cfg.channels, device)            # (N, C, H, W) in [-1, 1], (N,)
    K = int(y_train.max()) + 1
    common.check(max(cfg.classes) < K, f"--classes must be in 0..{K - 1}, got {cfg.classes}")
    model, ddpm = train(cfg, x_train, y_train, ckpt, device)
    print(f"trained: {ckpt}; a grid per w and what w trades: python -m tools.cfg_sweep --out {cfg.out}")
    return model, ddpm


if __name__ == "__main__":
    main()
