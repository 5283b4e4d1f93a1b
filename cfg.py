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
                (keys, values), after every block of the lowest resolution and of the bottleneck;
                the tokens are an argument of those blocks, like the time embedding
Conventions of ddpm_mnist.py: integer steps t = 0..T-1, images in [-1, 1], EMA weights sample.

Run:
    python cfg.py                          # train (cross-attention), then the figures below
    python cfg.py --cond input             # the label as input maps instead of cross-attention
    python cfg.py --sample-only --scales 0 1 2 4 --classes 3 8   # from runs/cfg/ckpt.pt, no training
    python cfg.py --sample-only --eval 1000   # + class accuracy and FD of 1000 samples per w (evaluate.py)
    python cfg.py --resume                 # continue an interrupted run (--overwrite: start again)
Figures in --out: cfg_w{w}.png for each w in --scales (one row per class, the same noise for every
w), tradeoff.png and tradeoff.md: the within-class diversity against w (mean pairwise distance,
real images = 1), with --eval N also the class accuracy and FD of evaluate.py's classifier.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import ddpm_mnist
from ddpm_mnist import DDPM, PRESETS, norm, preset_for

KIND = "cfg.py CondUNet"


@dataclass
class Config(common.RunConfig):
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
    scales: tuple[float, ...] = field(default=(0.0, 1.0, 3.0, 5.0, 7.5), metadata={
        "help": "guidance weights w; w = 1 is the plain conditional model"})
    classes: tuple[int, ...] = field(default=tuple(range(10)), metadata={"help": "classes (grid rows)", "min": 0})
    n_per_class: int = field(default=50, metadata={"help": "samples per class and w for the diversity (grids show 10)",
                                                   "min": 2})
    sampler: str = field(default="ddim", metadata={"help": "ddpm runs all T steps", "choices": ["ddim", "ddpm"]})
    ddim_steps: int = field(default=50, metadata={"help": "DDIM steps (at most --T)", "min": 1})
    eta: float = field(default=0.0, metadata={"help": "DDIM noise: 0 deterministic, 1 DDPM-like", "min": 0})
    clip: bool = field(default=True, metadata={"help": "clip x0_hat to [-1, 1] at every step (large w overshoots)"})
    eval: int = field(default=0, metadata={"min": 0, "help": "score N samples per w (balanced over --classes) "
                      "with evaluate.py: class accuracy and FD; 0 = off. Costs N x 2 x steps UNet passes per w, "
                      "and training evaluate.py's classifier once (~1 min on a GPU, cached in checkpoints/)"})
    sample_every: int = field(default=5, metadata={"help": "epochs between progress grids", "min": 1})
    out: str = field(default="runs/cfg", metadata={"help": "output folder"})
    ckpt: str = field(default="", metadata={"help": "checkpoint path (default OUT/ckpt.pt)"})


def check_config(cfg: Config) -> None:
    """The checks that argparse (choices, min) cannot make."""
    common.check(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    common.check(cfg.p_uncond < 1, f"--p-uncond must be < 1 (1 never shows a label), got {cfg.p_uncond}")
    common.check(cfg.p_uncond > 0 or cfg.sample_only, "--p-uncond 0 never shows the network the null class, so "
                 "guidance would extrapolate from a prediction it never learned; train with --p-uncond 0.1")
    common.check(all(math.isfinite(w) for w in (cfg.scale, *cfg.scales)),
                 f"--scale and --scales must be finite numbers, got {cfg.scale} and {cfg.scales}")
    common.check(cfg.sample_only or cfg.ddim_steps <= cfg.T, f"--ddim-steps must be at most --T ({cfg.T}), "
                 f"got {cfg.ddim_steps}")
    common.check(cfg.eval != 1, "--eval needs at least 2 samples for a Frechet distance (or 0: off)")


def load_data(cfg: Config, device, train: bool = True):
    """(x, y): images (N, C, H, W) in [-1, 1] and their class labels (N,)."""
    return common.load_images(cfg.dataset, cfg.data_dir, train, cfg.download, cfg.image_size or None,
                              cfg.channels, device)


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


def guided_eps(model: CondUNet, y: torch.Tensor, w: float):
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
def sample(model: CondUNet, ddpm: DDPM, y: torch.Tensor, w: float, sampler: str = "ddim", steps: int = 50,
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
    With cross-attention, the UNet's encode/decode hand the class tokens to every block as `cond`,
    an argument beside the time embedding (no state is stored on a module between calls)."""

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
        return self.decode(*self.encode(self.inc(x), emb, tokens), emb, tokens)


def build_unet(cfg: Config, image_size: int, channels: int, num_classes: int) -> CondUNet:
    return CondUNet(num_classes, cfg.cond, cfg.planes, cfg.tokens, cfg.cond_dim, image_size=image_size,
                    channels=channels, **preset_for(cfg.preset, image_size, channels))


# ----------------------------------------------------------------------------- training


def train(cfg: Config, x_train: torch.Tensor, y_train: torch.Tensor, ckpt: str, device) -> tuple[CondUNet, DDPM]:
    """AdamW with warm-up on the CFG loss, EMA weights for sampling, a checkpoint every epoch."""
    K = int(y_train.max()) + 1
    model = build_unet(cfg, x_train.shape[-1], x_train.shape[1], K).to(device)
    run = common.Run(model, ckpt, KIND, device, cfg.lr, cfg.ema_decay)   # + the EMA, AdamW, step and losses
    ddpm = DDPM(cfg.T, cfg.schedule).to(device)
    if cfg.resume:
        run.resume(cfg, same=("T", "schedule", "preset", "cond", "planes", "tokens", "cond_dim", "image_size",
                              "channels"))
    net = torch.compile(model) if cfg.compile else model
    total = cfg.epochs * (len(x_train) // min(cfg.batch_size, len(x_train)))
    print(f"CondUNet ({cfg.cond}): {run.millions():.2f}M parameters, {len(x_train)} training images, {K} classes, "
          f"null id {K}, on {device}")
    for epoch in range(run.epoch, cfg.epochs):
        model.train()
        run.new_epoch(f"epoch {epoch + 1:3d}/{cfg.epochs}")
        for x0, y in common.progress(common.batches(x_train, y_train, cfg.batch_size, cfg.seed + epoch),
                                     f"epoch {epoch + 1}/{cfg.epochs}"):
            common.set_lr(run.opt, cfg.lr, run.step, cfg.warmup_steps, total)
            with common.autocast(device, cfg.amp):
                batch_loss = loss(ddpm, net, x0, y, cfg.p_uncond, K)  # || eps - eps_theta(x_t, t, y~) ||^2
            run.opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            run.opt.step()
            run.ema.update_parameters(model)
            run.add(batch_loss, len(x0))
        run.end_epoch(net=model.config, config=asdict(cfg))   # NaN guard, loss/time/img/s line, checkpoint
        if (epoch + 1) % cfg.sample_every == 0 or epoch + 1 == cfg.epochs:   # a cheap progress grid
            y = torch.tensor(cfg.classes, device=device).repeat_interleave(8)     # one row of 8 per class
            x = sample(run.ema.module.eval(), ddpm, y, cfg.scale, "ddim", cfg.ddim_steps, 0.0, cfg.clip,
                       generator=common.generator(device, cfg.seed))
            common.save_grid(x, os.path.join(cfg.out, f"samples_epoch{epoch + 1:03d}_w{cfg.scale:g}.png"), nrow=8)
    common.plot_curves(os.path.join(cfg.out, "loss.png"), {"train loss": common.smooth(run.losses)})
    return run.ema.module.eval(), ddpm


def load_trained(path: str, device) -> tuple[CondUNet, DDPM, dict]:
    """The EMA network and diffusion process of a checkpoint written by `train`."""
    state = common.load_checkpoint(path, device, KIND, keys=("net", "ema", "config"),
                                   hint="train with `python cfg.py` first, or pass --ckpt")
    model = CondUNet(**state["net"]).to(device)
    common.load_weights(model, state["ema"], path)
    return model.eval(), DDPM(state["config"]["T"], state["config"]["schedule"]).to(device), state


# ----------------------------------------------------------------------------- figures


@torch.no_grad()
def make_figures(cfg: Config, model: CondUNet, ddpm: DDPM, device, evaluator=None) -> list[list]:
    """For each w: n_per_class samples of every class in --classes from the same noise, a grid of
    the first 10 per class and their within-class diversity relative to real test images; with an
    evaluator, also the class accuracy and FD of cfg.eval samples balanced over the classes."""
    import evaluate  # for the diversity metric (evaluate.py imports torchmetrics: slow, so only here)

    c, n = model.config, cfg.n_per_class
    y = torch.tensor(cfg.classes, device=device).repeat_interleave(n)       # (N,) one row per class
    gen = functools.partial(common.generator, device, cfg.seed, 1)   # the samplers' z: the same for every w
    x_T = torch.randn((len(y), c["channels"], c["image_size"], c["image_size"]), device=device,
                      generator=common.generator(device, cfg.seed))
    cols = min(n, 10)
    in_grid = torch.arange(len(y), device=device) % n < cols
    x_real, y_real = load_data(cfg, device, train=False)
    real = torch.cat([(y_real == k).nonzero()[:n, 0] for k in cfg.classes])
    div_real = evaluate.within_class_diversity(x_real[real], y_real[real])
    y_eval = torch.tensor(cfg.classes, device=device).repeat(math.ceil(cfg.eval / len(cfg.classes)))[:cfg.eval]
    rows = []
    for w in common.progress(cfg.scales, "guidance weights"):
        x = sample(model, ddpm, y, w, cfg.sampler, cfg.ddim_steps, cfg.eta, cfg.clip, x_T, gen())
        common.save_grid(x[in_grid], os.path.join(cfg.out, f"cfg_w{w:g}.png"), nrow=cols)
        row = [w, evaluate.within_class_diversity(x, y) / div_real]
        if evaluator is not None:                        # cfg.eval more samples, in batches of 500
            g = common.generator(device, cfg.seed)   # one stream: x_T, then its z, batch after batch
            x = torch.cat([sample(model, ddpm, yb, w, cfg.sampler, cfg.ddim_steps, cfg.eta, cfg.clip, generator=g)
                           for yb in common.progress(y_eval.split(500), f"w = {w:g}: {cfg.eval} samples")])
            row += [evaluator.accuracy(x, y_eval), evaluator.fd(x)]
        rows.append(row)
    header = ["w", "diversity (real = 1)"] + (["class accuracy", evaluator.name] if evaluator else [])
    print(common.write_table(os.path.join(cfg.out, "tradeoff.md"), header, rows))
    curves = {"diversity (within-class distance, real = 1)": [(r[0], r[1]) for r in rows]}
    if evaluator is not None:
        curves["class accuracy"] = [(r[0], r[2]) for r in rows]
    common.plot_curves(os.path.join(cfg.out, "tradeoff.png"), curves, xlabel="guidance weight w", ylabel="",
                       logy=False, title=f"CFG ({c['cond']}, {cfg.sampler}): fidelity vs diversity, {n}/class")
    return rows


def main(argv=None) -> list[list]:
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    common.seed_everything(cfg.seed)
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    common.prepare_out(cfg.out)
    ckpt = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    if cfg.sample_only:
        model, ddpm, _ = load_trained(ckpt, device)
        K, c = model.null, model.config          # the figures compare with real images of the model's shape
        cfg = dataclasses.replace(cfg, image_size=c["image_size"], channels=c["channels"])
        common.check(cfg.ddim_steps <= ddpm.T, f"--ddim-steps must be at most the model's T ({ddpm.T}), "
                     f"got {cfg.ddim_steps}")
    else:
        common.new_or_resume(ckpt, cfg.resume, cfg.overwrite)
        x_train, y_train = load_data(cfg, device)
        K = int(y_train.max()) + 1
    common.check(max(cfg.classes) < K, f"--classes must be in 0..{K - 1}, got {cfg.classes}")
    evaluator = None
    if cfg.eval:  # before training: a problem with the evaluator shows now, not after the run
        import evaluate
        evaluator = evaluate.Evaluator(cfg.dataset, cfg.data_dir, cfg.download, device,
                                       image_size=cfg.image_size or None, channels=cfg.channels)
    if not cfg.sample_only:
        model, ddpm = train(cfg, x_train, y_train, ckpt, device)
    rows = make_figures(cfg, model, ddpm, device, evaluator)
    print(f"figures in {cfg.out}/")
    return rows


if __name__ == "__main__":
    main()
