"""Classifier-free guidance (Ho & Salimans, 2022): one class-conditional UNet that has also learned
the unconditional task, and a guidance weight w that trades diversity for class fidelity.

Training is the DDPM loss of ddpm_mnist.py with the label y as a second input, replaced by a
dedicated null class (id K = the number of classes, "no label") with probability p_uncond:
    L = || eps - eps_theta(x_t, t, y~) ||^2,   y~ = null with probability p_uncond, else y
Sampling runs ddpm_mnist.py's DDPM or DDIM sampler, unchanged, on the guided noise prediction
    eps~(x_t, t, y) = eps_theta(x_t, t, null) + w (eps_theta(x_t, t, y) - eps_theta(x_t, t, null))
w = 1 is the plain conditional model, w = 0 the unconditional one; w > 1 extrapolates away from
the unconditional prediction: more typical digits, less variety. Both predictions come from ONE
forward pass over the doubled batch [x_t, x_t] with labels [y, null].
How the label enters the network (--cond):
    input  (a): a learned embedding of y, shaped into `planes` maps of the image size and
                concatenated with x_t as extra input channels
    xattn  (b): cross-attention from the feature maps (queries) to `tokens` learned class tokens
                (keys, values), in every block of the bottleneck and of the lowest resolution
Conventions of ddpm_mnist.py: integer steps t = 0..T-1, images in [-1, 1], EMA weights sample.

Run:
    python cfg.py                          # train, then the figures below
    python cfg.py --cond input             # the label as input planes instead of cross-attention
    python cfg.py --sample-only --ws 0 1 2 4 --classes 3 8   # from runs/cfg/ckpt.pt, no training
    python cfg.py --resume                 # continue an interrupted run
Figures in --out: cfg_w{w}.png for each w in --ws (one row per class, the same noise for every
w), tradeoff.png and tradeoff.md: against w, the class accuracy and FD of evaluate.py's LeNet
(--no-eval skips them) and the within-class diversity (mean pairwise distance, real images = 1).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import ddpm_mnist
from ddpm_mnist import DDPM, PRESETS, norm


@dataclass
class Config:
    dataset: str = field(default="mnist", metadata={"help": "mnist, cifar10, or an image folder ROOT/<class>/"})
    data_dir: str = field(default="data", metadata={"help": "root of the torchvision datasets"})
    download: bool = field(default=True, metadata={"help": "download mnist/cifar10 when missing"})
    image_size: int = field(default=0, metadata={"help": "resize images to this (0: MNIST 28, others 32)"})
    channels: int = field(default=3, metadata={"help": "image folders only: 1 (gray) or 3 (RGB)"})
    cond: str = field(default="xattn", metadata={"help": "how y enters the UNet", "choices": ["input", "xattn"]})
    planes: int = field(default=4, metadata={"help": "--cond input: label maps concatenated with x_t"})
    tokens: int = field(default=4, metadata={"help": "--cond xattn: class tokens per label"})
    cond_dim: int = field(default=128, metadata={"help": "--cond xattn: width of a class token"})
    p_uncond: float = field(default=0.1, metadata={"help": "probability of dropping y to the null class"})
    preset: str = field(default="auto", metadata={"help": "UNet size", "choices": ["auto", *PRESETS]})
    schedule: str = field(default="linear", metadata={"choices": ["linear", "cosine", "sigmoid"]})
    T: int = field(default=1000, metadata={"help": "number of diffusion steps"})
    epochs: int = 30
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 500
    ema_decay: float = 0.999
    w: float = field(default=3.0, metadata={"help": "guidance weight of the progress grids"})
    ws: tuple[float, ...] = field(default=(0.0, 1.0, 3.0, 5.0, 7.5), metadata={"help": "guidance weights of the figures"})
    classes: tuple[int, ...] = field(default=tuple(range(10)), metadata={"help": "classes (grid rows) to sample"})
    n_per_class: int = field(default=50, metadata={"help": "samples per class and w (grids show 10)"})
    sampler: str = field(default="ddim", metadata={"choices": ["ddim", "ddpm"]})
    ddim_steps: int = 50
    eta: float = field(default=0.0, metadata={"help": "DDIM noise: 0 deterministic, 1 DDPM-like"})
    clip: bool = field(default=True, metadata={"help": "clip x0_hat to [-1, 1] at every step (large w overshoots)"})
    eval: bool = field(default=True, metadata={"help": "class accuracy and FD with evaluate.py (trains its "
                                                       "LeNet once, ~1 min on a GPU, cached in checkpoints/)"})
    sample_every: int = field(default=5, metadata={"help": "epochs between progress grids"})
    out: str = "runs/cfg"
    ckpt: str = field(default="", metadata={"help": "checkpoint path (default OUT/ckpt.pt)"})
    resume: bool = False
    sample_only: bool = field(default=False, metadata={"help": "load --ckpt and make figures, no training"})
    seed: int = 0
    device: str = "auto"
    amp: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the UNet"})


# ----------------------------------------------------------------------------- network


class CrossAttention(nn.Module):
    """Feature maps attend to the class tokens of their label, after the block's own attention:
        h <- h + proj(softmax(q k^T / sqrt(d)) v),  q = W_q norm(h) (one per pixel), k, v = W_kv tokens.
    The UNet's blocks call `attn(h)` with h alone, so CondUNet.forward hands the tokens of the
    current batch to `self.tokens` before each pass. `proj` starts at zero: no effect at first."""

    def __init__(self, c: int, cond_dim: int, inner: nn.Module, heads: int = 4):
        super().__init__()
        self.inner, self.heads, self.tokens = inner, heads, None
        self.norm, self.q, self.kv = norm(c), nn.Conv2d(c, c, 1), nn.Linear(cond_dim, 2 * c)
        self.proj = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h):
        h = self.inner(h)                                                  # (N, C, H, W)
        N, C, H, W = h.shape
        q = self.q(self.norm(h)).reshape(N, self.heads, C // self.heads, H * W).transpose(-1, -2)
        k, v = self.kv(self.tokens).reshape(N, -1, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))  # (N, heads, HW, C/heads)
        return h + self.proj(a.transpose(-1, -2).reshape(N, C, H, W))


class CondUNet(ddpm_mnist.UNet):
    """eps_theta(x_t, t, y): ddpm_mnist's UNet with a label y in 0..K-1, or y = K = `null` (none)."""

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
        else:                 # (b) cross-attention in the bottleneck and the lowest-resolution level
            self.label_tokens = nn.Embedding(num_classes + 1, tokens * cond_dim)
            blocks = [*self.downs[-1].blocks, *self.mid, *self.ups[0].blocks]
            for b in blocks:
                b.attn = CrossAttention(b.conv2.out_channels, cond_dim, inner=b.attn)
            self.xattn = [b.attn for b in blocks]  # a plain list: the modules are registered in the blocks

    def forward(self, x, t, y):                  # x (N, C, H, W), t (N,), y (N,) -> eps (N, C, H, W)
        emb = self.embed_time(t)
        if self.cond == "input":
            maps = self.label_maps(y).reshape(len(y), -1, *x.shape[-2:])                 # (N, planes, H, W)
            x = torch.cat([x, maps.to(x.dtype)], dim=1)                                   # (N, C + planes, H, W)
        else:
            tokens = self.label_tokens(y).reshape(len(y), self.n_tokens, -1)          # (N, tokens, cond_dim)
            for layer in self.xattn:
                layer.tokens = tokens
        eps = self.decode(*self.encode(x, emb), emb)
        for layer in getattr(self, "xattn", []):
            layer.tokens = None  # keep no reference to this batch (memory; deepcopy for EMA)
        return eps


def build_unet(cfg: Config, image_size: int, channels: int, num_classes: int) -> CondUNet:
    preset = cfg.preset if cfg.preset != "auto" else ("cifar" if (image_size, channels) == (32, 3) else "mnist")
    return CondUNet(num_classes, cfg.cond, cfg.planes, cfg.tokens, cfg.cond_dim, image_size=image_size,
                    channels=channels, **PRESETS[preset])


# ----------------------------------------------------------------------------- the method


def check_labels(y: torch.Tensor, num_classes: int) -> None:
    common.check(bool(((y >= 0) & (y < num_classes)).all()),
                 f"class labels must be in 0..{num_classes - 1}, got {sorted(set(y.tolist()))}")


def drop_labels(y: torch.Tensor, p_uncond: float, null: int) -> torch.Tensor:
    """y~: each label replaced by the null id with probability p_uncond, so that one network learns
    both eps(x_t, t, y) and eps(x_t, t, null)."""
    drop = torch.rand(y.shape, device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, null), y)


def loss(ddpm: DDPM, model, x0: torch.Tensor, y: torch.Tensor, p_uncond: float, null: int) -> torch.Tensor:
    """L = || eps - eps_theta(x_t, t, y~) ||^2: DDPM.loss with the (dropped) label bound to the model."""
    y_tilde = drop_labels(y, p_uncond, null)
    return ddpm.loss(lambda x_t, t: model(x_t, t, y_tilde), x0)


def guided_eps(model: CondUNet, y: torch.Tensor, w: float):
    """The guided noise predictor eps~(x_t, t) for labels y (N,) and weight w, in the form the
    samplers call, model(x_t, t). One forward pass of 2N images gives eps_cond and eps_uncond."""
    null = torch.full_like(y, model.null)

    def eps(x_t, t):                                                   # x_t (N, C, H, W), t (N,)
        e = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).float()  # (2N, C, H, W)
        eps_cond, eps_uncond = e.chunk(2)
        return eps_uncond + w * (eps_cond - eps_uncond)  # eps~ = eps_uncond + w (eps_cond - eps_uncond)
    return eps


@torch.no_grad()
def sample(model: CondUNet, ddpm: DDPM, y: torch.Tensor, w: float, sampler: str = "ddim", steps: int = 50,
           eta: float = 0.0, clip: bool = True, x_T=None, generator=None) -> torch.Tensor:
    """Images (N, C, H, W), clamped to [-1, 1], of the classes y (N,) at guidance weight w. With
    `clip`, the estimate x0_hat of the guided eps is clipped to [-1, 1] at every step (common.clip_x0)."""
    check_labels(y, model.null)
    common.check(isinstance(w, (int, float)) and math.isfinite(w), f"the guidance weight w must be a number, got {w!r}")
    c = model.config
    shape = (len(y), c["channels"], c["image_size"], c["image_size"])
    eps = common.clip_x0(guided_eps(model, y, w), ddpm.alpha_bar) if clip else guided_eps(model, y, w)
    if sampler == "ddpm":
        x = ddpm.ddpm_sample(eps, shape, x_T=x_T, generator=generator)
    else:
        x = ddpm.ddim_sample(eps, shape, steps, eta, x_T=x_T, generator=generator)
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------- training


def class_rows(classes, per_row: int, device) -> torch.Tensor:
    """Labels for a grid with one row of `per_row` images per class: (len(classes) * per_row,)."""
    return torch.tensor(classes, device=device).repeat_interleave(per_row)


def train(cfg: Config, device) -> tuple[CondUNet, DDPM]:
    """common.fit's loop (AdamW with warm-up, EMA, a checkpoint per epoch) on the CFG loss."""
    ckpt = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    x_train, y_train = ddpm_mnist.load_data(cfg, device)
    K = int(y_train.max()) + 1
    check_labels(torch.tensor(cfg.classes), K)
    model = build_unet(cfg, x_train.shape[-1], x_train.shape[1], K).to(device)
    ddpm = DDPM(cfg.T, cfg.schedule).to(device)
    print(f"CondUNet ({cfg.cond}): {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(x_train)} training images, {K} classes, null id {K}, on {device}")

    def batches(epoch):
        return common.batches(x_train, y_train, cfg.batch_size, generator=torch.Generator().manual_seed(cfg.seed + epoch))

    def progress(epoch, ema_model):
        if epoch % cfg.sample_every == 0 or epoch == cfg.epochs:
            y = class_rows(cfg.classes, 8, device)
            x = sample(ema_model, ddpm, y, cfg.w, "ddim", cfg.ddim_steps, 0.0, cfg.clip,
                       generator=torch.Generator(device).manual_seed(cfg.seed))
            common.save_grid(x, os.path.join(cfg.out, f"samples_epoch{epoch:03d}_w{cfg.w:g}.png"), nrow=8)

    ema_model, losses = common.fit(
        model, lambda net, b: loss(ddpm, net, b[0], b[1], cfg.p_uncond, K), batches, epochs=cfg.epochs,
        ckpt=ckpt, device=device, lr=cfg.lr, warmup_steps=cfg.warmup_steps, ema_decay=cfg.ema_decay,
        resume=cfg.resume, amp=cfg.amp, compile=cfg.compile, on_epoch=progress,
        config=asdict(cfg), unet=model.config)
    common.plot_curves(os.path.join(cfg.out, "loss.png"), {"train loss": common.smooth(losses)})
    return ema_model, ddpm


def load_trained(path: str, device) -> tuple[CondUNet, DDPM, dict]:
    """The EMA network and diffusion process of a checkpoint written by `train`."""
    state = common.load_checkpoint(path, device, hint="train with `python cfg.py` first, or pass --ckpt")
    common.check("unet" in state and "num_classes" in state["unet"], f"'{path}' is not a cfg.py checkpoint")
    model = CondUNet(**state["unet"]).to(device)
    common.load_weights(model, state["ema"], path)
    return model.eval(), DDPM(state["config"]["T"], state["config"]["schedule"]).to(device), state


# ----------------------------------------------------------------------------- figures


@torch.no_grad()
def make_figures(cfg: Config, model: CondUNet, ddpm: DDPM, device, evaluator=None) -> list[list]:
    """For each w: n_per_class samples of every class in --classes from the same noise; a grid of
    the first 10 per class, and the trade-off table: within-class diversity relative to real test
    images (always), class accuracy and FD of evaluate.py's LeNet (with an evaluator)."""
    c, n = model.config, cfg.n_per_class
    y = class_rows(cfg.classes, n, device)                                   # (N,)
    check_labels(y, model.null)
    gen = lambda: torch.Generator(device).manual_seed(cfg.seed)  # noqa: E731 (the same noise for every w)
    x_T = torch.randn((len(y), c["channels"], c["image_size"], c["image_size"]), device=device, generator=gen())
    cols = min(n, 10)
    in_grid = torch.arange(len(y), device=device) % n < cols
    x_real, y_real = ddpm_mnist.load_data(cfg, device, train=False)
    real = torch.cat([(y_real == k).nonzero()[:n, 0] for k in cfg.classes])
    div_real = common.within_class_diversity(x_real[real], y_real[real])
    rows = []
    for w in cfg.ws:
        x = sample(model, ddpm, y, w, cfg.sampler, cfg.ddim_steps, cfg.eta, cfg.clip, x_T, gen())
        common.save_grid(x[in_grid], os.path.join(cfg.out, f"cfg_w{w:g}.png"), nrow=cols)
        row = [w, common.within_class_diversity(x, y) / div_real]
        if evaluator is not None:
            row += [evaluator.accuracy(x, y), evaluator.fd(x)]
        rows.append(row)
    header = ["w", "diversity (real = 1)"] + (["class accuracy", evaluator.name] if evaluator else [])
    print(common.write_table(os.path.join(cfg.out, "tradeoff.md"), header, rows))
    curves = {"diversity (within-class distance, real = 1)": [(r[0], r[1]) for r in rows]}
    if evaluator is not None:
        curves["class accuracy"] = [(r[0], r[2]) for r in rows]
    common.plot_curves(os.path.join(cfg.out, "tradeoff.png"), curves, xlabel="guidance weight w", ylabel="",
                       logy=False, title=f"CFG ({cfg.cond}, {cfg.sampler}): fidelity vs diversity, {n}/class")
    return rows


def main(argv=None) -> list[list]:
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    common.check(all(math.isfinite(w) for w in (cfg.w, *cfg.ws)),
                 f"--w and --ws must be finite numbers, got {cfg.w}, {cfg.ws}")
    common.check(0 <= cfg.p_uncond < 1, f"--p-uncond must be in [0, 1), got {cfg.p_uncond}")
    common.check(cfg.epochs >= 1 and cfg.n_per_class >= 2, "--epochs must be >= 1 and --n-per-class >= 2")
    common.check(1 <= cfg.ddim_steps <= cfg.T, f"--ddim-steps must be in 1..--T ({cfg.T}), got {cfg.ddim_steps}")
    common.check(min(cfg.classes) >= 0, f"--classes must be class ids >= 0, got {cfg.classes}")
    common.seed_everything(cfg.seed)
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.sample_only:
        model, ddpm, _ = load_trained(cfg.ckpt or os.path.join(cfg.out, "ckpt.pt"), device)
    else:
        model, ddpm = train(cfg, device)
    evaluator = None
    if cfg.eval:
        import evaluate  # only the figures need it
        evaluator = evaluate.Evaluator(cfg.dataset, cfg.data_dir, cfg.download, device,
                                       image_size=cfg.image_size or None, channels=cfg.channels)
    rows = make_figures(cfg, model, ddpm, device, evaluator)
    print(f"figures in {cfg.out}/")
    return rows


if __name__ == "__main__":
    main()
