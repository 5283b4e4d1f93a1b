"""Classifier guidance (Dhariwal & Nichol, 2021): steer an UNCONDITIONAL diffusion model towards a
class y with the gradient of a classifier that was trained on noisy images.

The classifier p_phi(y | x_t, t) learns (cross-entropy) on x_t = sqrt(alpha_bar_t) x_0 +
sqrt(1 - alpha_bar_t) eps, t ~ U{0..T-1}, on the base model's own schedule. By Bayes' rule
    grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t),  grad log p(x_t) = -eps(x_t, t) / sqrt(1 - alpha_bar_t),
so DDIM (their Algorithm 2) runs unchanged on the shifted noise prediction
    eps_hat = eps_theta(x_t, t) - s sqrt(1 - alpha_bar_t) grad_x log p_phi(y | x_t, t)
and DDPM (their Algorithm 1) moves the mean of every step along the gradient
    x_{t-1} ~ N(mu + s Sigma_t grad_x log p_phi(y | x_t, t), Sigma_t),   Sigma_t = sigma_t^2 I.
The guidance scale s = 0 is plain unguided sampling; a larger s gives more recognisable digits of
class y and less variety. Each step costs one UNet pass plus a classifier forward and backward.
The base model is ddpm_mnist.py's (runs/ddpm_mnist/ckpt.pt; when it is missing, ddpm_mnist.py's
training runs first with its default settings). Integer steps t = 0..T-1, images in [-1, 1].

Run:
    python classifier_guidance.py          # (the base model,) the classifier, a guided grid every few epochs
    python classifier_guidance.py --base-ckpt runs/ddpm_cosine/ckpt.pt --out runs/cg_cosine
    python classifier_guidance.py --resume # continue the classifier's training
    python -m tools.classifier_guidance_sweep --scales 0 2 5 --samplers ddim   # guided grids, accuracy per t and s
"""
from __future__ import annotations

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
from ddpm_mnist import DDPM, PRESETS, Level, ResBlock, norm, preset_for

KIND = "classifier_guidance.py classifier"


@dataclass
class Config(common.RunConfig):   # --scales and the flags below it are classifier_guidance_sweep.py's
    dataset: str = field(default="mnist", metadata={"help": "the base model's data: mnist, cifar10 or an image folder"})
    image_size: int = field(default=0, metadata={"help": "resize images to this (0: the base model's size)", "min": 0})
    channels: int = field(default=3, metadata={"help": "image folders: 1 (gray) or 3 (RGB)", "choices": [1, 3]})
    base_ckpt: str = field(default=ddpm_mnist.DEFAULT_CKPT, metadata={"help": "ddpm_mnist.py checkpoint to guide"})
    preset: str = field(default="auto", metadata={"help": "classifier size (UNet encoder)", "choices": ["auto", *PRESETS]})
    epochs: int = field(default=10, metadata={"help": "passes over the training set", "min": 1})
    batch_size: int = field(default=128, metadata={"help": "images per optimizer step", "min": 1})
    lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate (after the warm-up)"})
    warmup_steps: int = field(default=200, metadata={"help": "linear warm-up (at most a fifth of the run)", "min": 0})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA of the weights, which guide", "min": 0})
    scale: float = field(default=3.0, metadata={"help": "guidance scale s of the progress grids"})
    classes: tuple[int, ...] = field(default=tuple(range(10)), metadata={"help": "target classes (rows)", "min": 0})
    ddim_steps: int = field(default=50, metadata={"help": "DDIM steps (at most the base's T)", "min": 1})
    clip: bool = field(default=True, metadata={"help": "clip x0_hat to [-1, 1] at every step (large s overshoots)"})
    sample_every: int = field(default=5, metadata={"help": "epochs between progress grids", "min": 1})
    out: str = field(default="runs/classifier_guidance", metadata={"help": "output folder"})
    ckpt: str = field(default="", metadata={"help": "classifier checkpoint (default OUT/ckpt.pt)"})
    scales: tuple[float, ...] = field(default=(0.0, 1.0, 3.0, 10.0), metadata={"help": "guidance scales s"})
    samplers: tuple[str, ...] = field(default=("ddim", "ddpm"), metadata={"help": "ddpm: T steps, each with a "
                                      "classifier gradient", "choices": ["ddim", "ddpm"]})
    n_per_class: int = field(default=50, metadata={"help": "samples per class and scale (grids show 10)", "min": 2})
    eta: float = field(default=0.0, metadata={"help": "DDIM noise: 0 deterministic, 1 DDPM-like", "min": 0})
    sigma: str = field(default="posterior", metadata={"help": "DDPM Sigma_t", "choices": ["beta", "posterior"]})
    eval: int = field(default=0, metadata={"help": "LeNet accuracy and FD of N samples per s (0: off)", "min": 0})


def check_config(cfg: Config) -> None:
    """The checks that argparse (choices, min) cannot make (the sweep's too); those against the base: load_base."""
    common.check(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    common.check(all(math.isfinite(s) for s in (cfg.scale, *cfg.scales)),
                 f"--scale and --scales must be finite numbers, got {cfg.scale} and {cfg.scales}")
    common.check(cfg.eval != 1, "--eval needs at least 2 samples for a Frechet distance (or 0: off)")


# ----------------------------------------------------------------------------- the method


def classifier_loss(ddpm: DDPM, classifier, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of p_phi(y | x_t, t), x_t ~ q(x_t | x_0) at t ~ U{0..T-1} of the base's schedule."""
    t = torch.randint(0, ddpm.T, (len(x0),), device=x0.device)
    return F.cross_entropy(classifier(ddpm.q_sample(x0, t, torch.randn_like(x0)), t).float(), y)


def log_prob_grad(classifier, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_x log p_phi(y | x_t, t), shape of x_t. The samples of a batch are independent, so the
    gradient of the summed log-probabilities is every sample's own gradient."""
    with torch.enable_grad():                      # the samplers run under no_grad
        x = x_t.detach().requires_grad_(True)
        log_p = F.log_softmax(classifier(x, t).float(), dim=-1)[torch.arange(len(y)), y]  # (N,)
        return torch.autograd.grad(log_p.sum(), x)[0]


def guided_eps(model, classifier, ddpm: DDPM, y: torch.Tensor, scale: float, sampler: str = "ddim",
               sigma: str = "posterior"):
    """The guided noise predictor, in the form DDPM.ddim_sample / ddpm_sample call: eps(x_t, t)."""
    def eps(x_t, t):                               # x_t (N, C, H, W), t (N,)
        e = model(x_t, t).float()
        g = scale * log_prob_grad(classifier, x_t, t, y)                 # s grad log p_phi(y | x_t)
        alpha_bar = ddpm.alpha_bar[t].view(-1, 1, 1, 1)
        if sampler == "ddim":
            return e - (1 - alpha_bar).sqrt() * g  # eps_hat = eps - s sqrt(1 - alpha_bar_t) grad
        # DDPM: ddpm_sample forms mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t), so
        # mu + s Sigma_t grad is the mean it forms from eps - Sigma_t sqrt(alpha_t) sqrt(1 - alpha_bar_t) / beta_t (s grad).
        var = (ddpm.beta if sigma == "beta" else ddpm.posterior_var)[t].view(-1, 1, 1, 1)  # Sigma_t
        alpha, beta = ddpm.alpha[t].view(-1, 1, 1, 1), ddpm.beta[t].view(-1, 1, 1, 1)
        return e - var * alpha.sqrt() * (1 - alpha_bar).sqrt() / beta * g
    return eps


@torch.no_grad()
def sample(model, classifier: NoisyClassifier, ddpm: DDPM, y: torch.Tensor, scale: float, sampler: str = "ddim",
           steps: int = 50, eta: float = 0.0, sigma: str = "posterior", clip: bool = True, x_T=None,
           generator=None) -> torch.Tensor:
    """Images (N, C, H, W), clamped to [-1, 1], of the target classes y (N,), guided with scale s.
    With `clip`, the base model's estimate x0_hat is clipped to [-1, 1] at every step before the
    guidance moves it (ddpm_mnist.clip_x0; the order of Dhariwal & Nichol's code)."""
    K = classifier.config["num_classes"]
    common.check(bool(((y >= 0) & (y < K)).all()), f"class labels must be in 0..{K - 1}, got {sorted(set(y.tolist()))}")
    common.check(isinstance(scale, (int, float)) and math.isfinite(scale),
                 f"the guidance scale must be a number, got {scale!r}")
    c = model.config
    shape = (len(y), c["channels"], c["image_size"], c["image_size"])
    unguided = ddpm_mnist.clip_x0(model, ddpm.alpha_bar) if clip else model    # eps_theta(x_t, t)
    eps = guided_eps(unguided, classifier, ddpm, y, scale, sampler, sigma)
    if sampler == "ddpm":
        x = ddpm.ddpm_sample(eps, shape, sigma, x_T=x_T, generator=generator)
    else:
        x = ddpm.ddim_sample(eps, shape, steps, eta, x_T=x_T, generator=generator)
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------- network


class NoisyClassifier(nn.Module):
    """p_phi(y | x_t, t): the encoder half of ddpm_mnist's UNet (time embedding, input convolution,
    down levels, bottleneck; built in the UNet's order, under the UNet's names), then GroupNorm-SiLU
    and a linear layer on the flattened bottleneck map. No decoder: a classifier needs the features,
    not an image. (Where a stroke is matters for a digit: with global average pooling instead, the
    same network learned ~10x more slowly.)"""

    def __init__(self, num_classes: int, image_size=28, channels=1, base=64, mults=(1, 2, 2), num_res=2, dropout=0.1):
        super().__init__()
        last = len(mults) - 1                            # the bottleneck is image_size / 2^last wide
        common.check(image_size % 2 ** last == 0, f"image size {image_size} is not divisible by 2^{last}: the "
                     f"classifier's {len(mults)} levels do not fit it; pick a --preset with fewer levels")
        self.config = dict(image_size=image_size, channels=channels, base=base, mults=tuple(mults),
                           num_res=num_res, dropout=dropout, num_classes=num_classes)
        self.base, t_dim = base, 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.inc = nn.Conv2d(channels, base, 3, padding=1)
        self.downs, c = nn.ModuleList(), base
        for i, m in enumerate(mults):                    # self-attention at the lowest resolution, as in the UNet
            blocks = []
            for _ in range(num_res):
                blocks.append(ResBlock(c, base * m, t_dim, dropout, i == last))
                c = base * m
            self.downs.append(Level(blocks, nn.Conv2d(c, c, 3, stride=2, padding=1) if i < last else nn.Identity()))
        self.mid = nn.ModuleList([ResBlock(c, c, t_dim, dropout, True), ResBlock(c, c, t_dim, dropout, False)])
        side = image_size // 2 ** last
        self.head = nn.Sequential(norm(c), nn.SiLU(), nn.Flatten(), nn.Linear(c * side * side, num_classes))

    def forward(self, x, t):                             # x_t (N, C, H, W), t (N,) -> logits (N, K)
        emb, h = self.time_mlp(common.timestep_embedding(t, self.base)), self.inc(x)
        for level in self.downs:
            for block in level.blocks:
                h = block(h, emb)
            h = level.resample(h)
        for block in self.mid:
            h = block(h, emb)
        return self.head(h)                              # from (N, c, side, side), side = H / 2^(levels - 1)


def build_classifier(preset: str, image_size: int, channels: int, num_classes: int) -> NoisyClassifier:
    return NoisyClassifier(num_classes, image_size, channels, **preset_for(preset, image_size, channels))


# ----------------------------------------------------------------------------- training


def load_base(cfg: Config, device):
    """The unconditional EMA UNet, its DDPM, and what a classifier must match: {path, T, schedule,
    image_size, channels}. ddpm_mnist.py's default model is trained first when it is missing."""
    path = ddpm_mnist.ensure_trained(cfg.base_ckpt, device, dataset=cfg.dataset, data_dir=cfg.data_dir,
                                     download=cfg.download, image_size=cfg.image_size, channels=cfg.channels,
                                     seed=cfg.seed, amp=cfg.amp)
    model, ddpm, state = ddpm_mnist.load_trained(path, device)
    base = dict(path=path, T=ddpm.T, schedule=state["config"]["schedule"], image_size=model.config["image_size"],
                channels=model.config["channels"])
    size = base["image_size"]
    common.check(cfg.image_size in (0, size), f"--image-size is {cfg.image_size} but the base model '{path}' makes "
                 f"{size}x{size} images; leave --image-size out (0: the base's size)")
    common.check(cfg.ddim_steps <= ddpm.T, f"--ddim-steps must be at most the base's T ({ddpm.T}), "
                 f"got {cfg.ddim_steps}")
    return model, ddpm, base


def check_fits_base(state: dict, base: dict, path: str) -> None:
    """A classifier guides only a base with its schedule and image shape (one line otherwise)."""
    net, trained = state["net"], (state["base"]["T"], state["base"]["schedule"])
    common.check(trained == (base["T"], base["schedule"]), f"the classifier in '{path}' learned the schedule "
                 f"{trained}, the base model uses {(base['T'], base['schedule'])}; train one for this base "
                 "(another --out, or --overwrite)")
    common.check((net["channels"], net["image_size"]) == (base["channels"], base["image_size"]),
                 f"the classifier in '{path}' reads {net['channels']}x{net['image_size']} images, the base model "
                 f"makes {base['channels']}x{base['image_size']}; train one for this base (another --out, or "
                 "--overwrite)")


def train(cfg: Config, model, ddpm: DDPM, base: dict, x_train, y_train, ckpt: str, device) -> NoisyClassifier:
    """AdamW with warm-up on the classifier loss, EMA weights that guide, one atomic checkpoint per epoch
    (--resume continues it exactly), a grid guided by the EMA classifier every --sample-every epochs."""
    K = int(y_train.max()) + 1
    classifier = build_classifier(cfg.preset, x_train.shape[-1], x_train.shape[1], K).to(device)
    ema = common.make_ema(classifier, cfg.ema_decay)     # phi_ema, the weights that guide
    opt = torch.optim.AdamW(classifier.parameters(), lr=cfg.lr, weight_decay=0.0, fused=device.type == "cuda")
    step, start, losses = 0, 0, []
    if cfg.resume:   # weights, EMA, optimizer and RNG come back; another classifier size is refused
        state = checkpoints.resume(ckpt, device, KIND, classifier, ema, opt, cfg, same=("preset",))
        step, start, losses = state["step"], state["epoch"], state["losses"]
    net = torch.compile(classifier) if cfg.compile else classifier
    batch = min(cfg.batch_size, len(x_train))
    total = cfg.epochs * (len(x_train) // batch)
    print(f"noisy classifier: {sum(p.numel() for p in classifier.parameters()) / 1e6:.2f}M parameters, "
          f"{len(x_train)} training images, T = {ddpm.T}, on {device}")
    for epoch in range(start, cfg.epochs):
        classifier.train()
        t0, epoch_losses = time.perf_counter(), []
        for x0, y in common.progress(common.batches(x_train, y_train, batch, cfg.seed + epoch),
                                     f"epoch {epoch + 1}/{cfg.epochs}"):
            common.set_lr(opt, cfg.lr, step, cfg.warmup_steps, total)
            with common.autocast(device, cfg.amp):
                loss = classifier_loss(ddpm, net, x0, y)   # -log p_phi(y | x_t, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update_parameters(classifier)            # phi_ema <- d phi_ema + (1 - d) phi
            epoch_losses.append(loss.detach())           # on the device: no sync per step
            step += 1
        epoch_losses = torch.stack(epoch_losses)
        checkpoints.check_finite(epoch_losses.mean(), step, ckpt)   # before saving: the last good epoch stays on disk
        seconds = time.perf_counter() - t0
        print(f"epoch {epoch + 1:3d}/{cfg.epochs} (cross-entropy)  loss {epoch_losses.mean().item():.4f}  "
              f"{seconds:.1f}s  {len(epoch_losses) * batch / seconds:.0f} img/s", flush=True)
        losses += epoch_losses.tolist()
        checkpoints.save(ckpt, kind=KIND, net=classifier.config, config=asdict(cfg), base=base,
                         model=classifier.state_dict(), ema=ema.module.state_dict(), opt=opt.state_dict(),
                         step=step, epoch=epoch + 1, losses=losses, rng=checkpoints.rng_state())
        if (epoch + 1) % cfg.sample_every == 0 or epoch + 1 == cfg.epochs:   # own generator: the run's RNG stays
            y = torch.tensor(cfg.classes, device=device).repeat_interleave(8)     # one row of 8 per class
            x = sample(model, ema.module.eval(), ddpm, y, cfg.scale, "ddim", cfg.ddim_steps, 0.0, "posterior",
                       cfg.clip, generator=common.generator(device, cfg.seed))
            plots.save_labelled_grid(x, os.path.join(cfg.out, f"samples_epoch{epoch + 1:03d}_s{cfg.scale:g}.png"), 8,
                                     [f"class {k}" for k in cfg.classes], f"guided by the EMA classifier after epoch "
                                     f"{epoch + 1}: s = {cfg.scale:g}, DDIM-{cfg.ddim_steps}")
    plots.plot_curves(os.path.join(cfg.out, "loss.png"), {"train cross-entropy": plots.smooth(losses)},
                      title="noisy classifier: training cross-entropy per step (smoothed)")
    return ema.module.eval()


def main(argv=None) -> NoisyClassifier:
    """Train the classifier (or continue it, --resume) into --out. -> the EMA classifier"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    common.check(not cfg.sample_only, "classifier_guidance.py trains; sample with a trained classifier with "
                 "`python -m tools.classifier_guidance_sweep` (same flags)")
    check_config(cfg)
    common.seed_everything(cfg.seed)
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    common.prepare_out(cfg.out)
    ckpt = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    checkpoints.new_or_resume(ckpt, cfg.resume, cfg.overwrite)
    model, ddpm, base = load_base(cfg, device)
    if cfg.resume:   # every check against the base BEFORE training: a mismatch never costs a run or a checkpoint
        check_fits_base(checkpoints.load(ckpt, device, KIND, keys=("net", "base")), base, ckpt)
    x_train, y_train = common.load_images(cfg.dataset, cfg.data_dir, True, cfg.download, base["image_size"],
                                          cfg.channels, device)            # (N, C, H, W) in [-1, 1], (N,)
    common.check(x_train.shape[1] == base["channels"], f"the data has {x_train.shape[1]} channel(s), the base "
                 f"model '{base['path']}' makes {base['channels']}-channel images; pass its --dataset and --channels")
    K = int(y_train.max()) + 1
    common.check(max(cfg.classes) < K, f"--classes must be in 0..{K - 1}, got {cfg.classes}")
    classifier = train(cfg, model, ddpm, base, x_train, y_train, ckpt, device)
    print(f"trained: {ckpt}; guided grids and accuracies: python -m tools.classifier_guidance_sweep --out {cfg.out}")
    return classifier


if __name__ == "__main__":
    main()
