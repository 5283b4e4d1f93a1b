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
    python classifier_guidance.py                      # (base model,) classifier, then the figures
    python classifier_guidance.py --base-ckpt runs/ddpm_cosine/ckpt.pt --out runs/cg_cosine
    python classifier_guidance.py --sample-only --scales 0 2 5 --samplers ddim   # no training
    python classifier_guidance.py --sample-only --eval 1000   # + LeNet accuracy and FD of 1000 samples per s
    python classifier_guidance.py --resume             # continue the classifier's training
Printed: the classifier's test accuracy per noise level (also accuracy_per_t.png). Figures in
--out: guided_{sampler}_s{scale}.png (one row per target class, the same noise for every scale,
s = 0 the unguided baseline), accuracy_vs_scale.png and .md: the class accuracy by p_phi itself at
t = 0 (optimistic: the samples were pushed towards what p_phi likes) and the within-class diversity;
with --eval N also the class accuracy by evaluate.py's LeNet (independent of the guide) and FD.
"""
from __future__ import annotations

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

KIND = "classifier_guidance.py classifier"


@dataclass
class Config(common.RunConfig):
    dataset: str = field(default="mnist", metadata={"help": "the base model's data: mnist, cifar10 or an image folder"})
    image_size: int = field(default=0, metadata={"help": "resize images to this (0: the base model's size)", "min": 0})
    channels: int = field(default=3, metadata={"help": "image folders only: 1 (gray) or 3 (RGB), as the base's",
                                               "choices": [1, 3]})
    base_ckpt: str = field(default=ddpm_mnist.DEFAULT_CKPT, metadata={
        "help": "unconditional ddpm_mnist.py checkpoint (this default is trained first when missing)"})
    preset: str = field(default="auto", metadata={"help": "classifier size (that UNet's encoder)",
                                                  "choices": ["auto", *PRESETS]})
    epochs: int = field(default=10, metadata={"help": "passes over the training set", "min": 1})
    batch_size: int = field(default=128, metadata={"help": "images per optimizer step", "min": 1})
    lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate (after the warm-up)"})
    warmup_steps: int = field(default=200, metadata={"help": "linear warm-up (at most a fifth of the run)", "min": 0})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA of the weights, which guide", "min": 0})
    scale: float = field(default=3.0, metadata={"help": "guidance scale s of the progress grids"})
    scales: tuple[float, ...] = field(default=(0.0, 1.0, 3.0, 10.0), metadata={
        "help": "guidance scales s; s = 0 is the unguided base model"})
    samplers: tuple[str, ...] = field(default=("ddim", "ddpm"), metadata={
        "help": "ddpm runs all T steps of the base, each with a classifier gradient", "choices": ["ddim", "ddpm"]})
    classes: tuple[int, ...] = field(default=tuple(range(10)), metadata={"help": "target classes (rows)", "min": 0})
    n_per_class: int = field(default=50, metadata={"help": "samples per class and scale (grids show 10)", "min": 2})
    ddim_steps: int = field(default=50, metadata={"help": "DDIM steps (at most the base's T)", "min": 1})
    eta: float = field(default=0.0, metadata={"help": "DDIM noise: 0 deterministic, 1 DDPM-like", "min": 0})
    sigma: str = field(default="posterior", metadata={"help": "DDPM Sigma_t = sigma_t^2 I",
                                                      "choices": ["beta", "posterior"]})
    clip: bool = field(default=True, metadata={"help": "clip x0_hat to [-1, 1] at every step (large s overshoots)"})
    eval: int = field(default=0, metadata={"min": 0, "help": "score N samples per sampler and s (balanced over "
                      "--classes) with evaluate.py: LeNet class accuracy and FD; 0 = off. Costs N x steps x (UNet "
                      "+ classifier forward and backward) each, and training evaluate.py's classifier once "
                      "(~1 min on a GPU, cached in checkpoints/)"})
    sample_every: int = field(default=5, metadata={"help": "epochs between progress grids", "min": 1})
    out: str = field(default="runs/classifier_guidance", metadata={"help": "output folder"})
    ckpt: str = field(default="", metadata={"help": "classifier checkpoint (default OUT/ckpt.pt)"})


def check_config(cfg: Config) -> None:
    """The checks that argparse (choices, min) cannot make; those against the base come in load_base."""
    common.check(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    common.check(all(math.isfinite(s) for s in (cfg.scale, *cfg.scales)),
                 f"--scale and --scales must be finite numbers, got {cfg.scale} and {cfg.scales}")
    common.check(cfg.eval != 1, "--eval needs at least 2 samples for a Frechet distance (or 0: off)")


def load_data(cfg: Config, image_size: int, channels: int, device, train: bool = True):
    """(x, y): images (N, C, H, W) in [-1, 1] at the base's size, and their class labels (N,)."""
    return common.load_images(cfg.dataset, cfg.data_dir, train, cfg.download, image_size, channels, device)


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


class NoisyClassifier(ddpm_mnist.UNet):
    """p_phi(y | x_t, t): the encoder half of ddpm_mnist's UNet (time embedding, down levels and
    bottleneck, `UNet.encode`; no decoder: a classifier needs the features, not an image), then
    GroupNorm-SiLU and a linear layer on the flattened bottleneck map. (Where a stroke is matters
    for a digit: with global average pooling instead, the same network learned ~10x more slowly.)"""

    def __init__(self, num_classes: int, image_size=28, channels=1, base=64, mults=(1, 2, 2), num_res=2, dropout=0.1):
        super().__init__(image_size, channels, base, mults, num_res, dropout, decoder=False)
        self.config["num_classes"] = num_classes
        c, side = base * mults[-1], image_size // 2 ** (len(mults) - 1)
        self.head = nn.Sequential(norm(c), nn.SiLU(), nn.Flatten(), nn.Linear(c * side * side, num_classes))

    def forward(self, x, t):                        # x_t (N, C, H, W), t (N,) -> logits (N, K)
        h, _ = self.encode(self.inc(x), self.embed_time(t))   # (N, c, side, side), side = H / 2^(levels - 1)
        return self.head(h)


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
    """AdamW with warm-up on the classifier loss, EMA weights that guide, a checkpoint every epoch,
    and a grid guided by the EMA classifier every --sample-every epochs."""
    K = int(y_train.max()) + 1
    classifier = build_classifier(cfg.preset, x_train.shape[-1], x_train.shape[1], K).to(device)
    run = common.Run(classifier, ckpt, KIND, device, cfg.lr, cfg.ema_decay)   # + the EMA, AdamW, step and losses
    if cfg.resume:
        run.resume(cfg, same=("preset",))
    net = torch.compile(classifier) if cfg.compile else classifier
    total = cfg.epochs * (len(x_train) // min(cfg.batch_size, len(x_train)))
    print(f"noisy classifier: {run.millions():.2f}M parameters, {len(x_train)} training images, T = {ddpm.T}, "
          f"on {device}")
    for epoch in range(run.epoch, cfg.epochs):
        classifier.train()
        run.new_epoch(f"epoch {epoch + 1:3d}/{cfg.epochs} (cross-entropy)")
        for x0, y in common.progress(common.batches(x_train, y_train, cfg.batch_size, cfg.seed + epoch),
                                     f"epoch {epoch + 1}/{cfg.epochs}"):
            common.set_lr(run.opt, cfg.lr, run.step, cfg.warmup_steps, total)
            with common.autocast(device, cfg.amp):
                loss = classifier_loss(ddpm, net, x0, y)   # -log p_phi(y | x_t, t)
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            run.opt.step()
            run.ema.update_parameters(classifier)
            run.add(loss, len(x0))
        run.end_epoch(net=classifier.config, config=asdict(cfg), base=base)   # NaN guard, line, checkpoint
        if (epoch + 1) % cfg.sample_every == 0 or epoch + 1 == cfg.epochs:   # a cheap progress grid
            y = torch.tensor(cfg.classes, device=device).repeat_interleave(8)
            x = sample(model, run.ema.module.eval(), ddpm, y, cfg.scale, "ddim", cfg.ddim_steps, 0.0, cfg.sigma,
                       cfg.clip, generator=common.generator(device, cfg.seed))
            common.save_grid(x, os.path.join(cfg.out, f"samples_epoch{epoch + 1:03d}_s{cfg.scale:g}.png"), nrow=8)
    common.plot_curves(os.path.join(cfg.out, "loss.png"), {"train cross-entropy": common.smooth(run.losses)})
    return run.ema.module.eval()


def load_classifier(path: str, base: dict, device) -> NoisyClassifier:
    """The EMA classifier of a checkpoint written by `train`; it must fit the base (check_fits_base)."""
    state = common.load_checkpoint(path, device, KIND, keys=("net", "ema", "base"),
                                   hint="train with `python classifier_guidance.py` first, or pass --ckpt")
    check_fits_base(state, base, path)
    classifier = NoisyClassifier(**state["net"]).to(device)
    common.load_weights(classifier, state["ema"], path)
    return classifier.eval()


# ----------------------------------------------------------------------------- figures


@torch.no_grad()
def accuracy_per_t(classifier, ddpm: DDPM, x: torch.Tensor, y: torch.Tensor, levels: int = 10, seed: int = 0):
    """Test accuracy of p_phi(y | x_t, t) at `levels` noise levels t from 0 to T-1: [(t, accuracy)]."""
    g = common.generator(x.device, seed)
    rows = []
    for t in torch.linspace(0, ddpm.T - 1, levels).round().long().unique().tolist():
        correct = 0
        for xb, yb in zip(x.split(500), y.split(500)):
            tb = torch.full((len(xb),), t, device=x.device)
            x_t = ddpm.q_sample(xb, tb, torch.randn(xb.shape, device=x.device, generator=g))
            correct += (classifier(x_t, tb).argmax(1) == yb).sum().item()
        rows.append((t, correct / len(x)))
    return rows


@torch.no_grad()
def make_figures(cfg: Config, model, classifier, ddpm: DDPM, device, evaluator=None) -> dict:
    """Accuracy per noise level, then for each sampler and scale: n_per_class samples of every
    class in --classes from the same noise, a grid of the first 10 per class, the within-class
    diversity relative to real test images and p_phi's own accuracy; with an evaluator, also
    evaluate.py's accuracy and FD of cfg.eval samples balanced over the classes.
    -> {accuracy_per_t: [(t, accuracy)], rows: the rows of accuracy_vs_scale.md}"""
    import evaluate  # for the diversity metric (evaluate.py imports torchmetrics: slow, so only here)

    c, n = model.config, cfg.n_per_class
    x_test, y_test = load_data(cfg, c["image_size"], c["channels"], device, train=False)
    per_t = accuracy_per_t(classifier, ddpm, x_test[:2000], y_test[:2000], seed=cfg.seed)
    print("noisy classifier, test accuracy per noise level:\n" + "\n".join(f"  t = {t:4d}: {a:.3f}" for t, a in per_t))
    common.plot_curves(os.path.join(cfg.out, "accuracy_per_t.png"), {"test accuracy": per_t}, xlabel="t",
                       ylabel="accuracy", logy=False, title="p_phi(y | x_t, t) on the test set")
    y = torch.tensor(cfg.classes, device=device).repeat_interleave(n)       # (N,) one row per class
    gen = functools.partial(common.generator, device, cfg.seed, 1)   # the samplers' z: the same for every scale
    x_T = torch.randn((len(y), c["channels"], c["image_size"], c["image_size"]), device=device,
                      generator=common.generator(device, cfg.seed))
    cols = min(n, 10)
    in_grid = torch.arange(len(y), device=device) % n < cols
    real = torch.cat([(y_test == k).nonzero()[:n, 0] for k in cfg.classes])
    div_real = evaluate.within_class_diversity(x_test[real], y_test[real])
    y_eval = torch.tensor(cfg.classes, device=device).repeat(math.ceil(cfg.eval / len(cfg.classes)))[:cfg.eval]
    rows = []
    for sampler, s in common.progress([(a, b) for a in cfg.samplers for b in cfg.scales], "guidance scales"):
        x = sample(model, classifier, ddpm, y, s, sampler, cfg.ddim_steps, cfg.eta, cfg.sigma, cfg.clip, x_T, gen())
        common.save_grid(x[in_grid], os.path.join(cfg.out, f"guided_{sampler}_s{s:g}.png"), nrow=cols)
        own = (classifier(x, torch.zeros_like(y)).argmax(1) == y).float().mean().item()  # p_phi at t = 0
        row = [sampler, s, evaluate.within_class_diversity(x, y) / div_real, own]
        if evaluator is not None:                        # cfg.eval more samples, in batches of 500
            g = common.generator(device, cfg.seed)   # one stream: x_T, then its z, batch after batch
            x = torch.cat([sample(model, classifier, ddpm, yb, s, sampler, cfg.ddim_steps, cfg.eta, cfg.sigma,
                                  cfg.clip, generator=g)
                           for yb in common.progress(y_eval.split(500), f"{sampler} s = {s:g}: {cfg.eval} samples")])
            row += [evaluator.accuracy(x, y_eval), evaluator.fd(x)]
        rows.append(row)
    header = ["sampler", "scale s", "diversity (real = 1)", "accuracy by p_phi itself"]
    header += ["class accuracy (LeNet)", evaluator.name] if evaluator else []
    print(common.write_table(os.path.join(cfg.out, "accuracy_vs_scale.md"), header, rows))
    series = [("diversity", 2), ("accuracy by p_phi", 3)] + ([("accuracy by LeNet", 4)] if evaluator else [])
    curves = {f"{name}, {smp}": [(r[1], r[i]) for r in rows if r[0] == smp]
              for smp in cfg.samplers for name, i in series}
    common.plot_curves(os.path.join(cfg.out, "accuracy_vs_scale.png"), curves, xlabel="guidance scale s", ylabel="",
                       logy=False, title=f"classifier guidance, {n} samples per class")
    return dict(accuracy_per_t=per_t, rows=rows)


def main(argv=None) -> dict:
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    common.seed_everything(cfg.seed)
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    common.prepare_out(cfg.out)
    ckpt = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    if cfg.sample_only:  # stop now, not after training a base model, when there is nothing to sample with
        common.load_checkpoint(ckpt, device, KIND, keys=("net", "ema", "base"),
                               hint="train with `python classifier_guidance.py` first, or pass --ckpt")
        common.check(os.path.isfile(cfg.base_ckpt), f"--base-ckpt '{cfg.base_ckpt}' not found; --sample-only "
                     "needs the base model the classifier was trained for")
    else:
        common.new_or_resume(ckpt, cfg.resume, cfg.overwrite)
    model, ddpm, base = load_base(cfg, device)
    if cfg.sample_only:
        classifier = load_classifier(ckpt, base, device)
        K = classifier.config["num_classes"]
    else:  # every check against the base BEFORE training: a mismatch never costs a run or a checkpoint
        if cfg.resume:
            check_fits_base(common.load_checkpoint(ckpt, device, KIND, keys=("net", "base")), base, ckpt)
        x_train, y_train = load_data(cfg, base["image_size"], cfg.channels, device)
        common.check(x_train.shape[1] == base["channels"], f"the data has {x_train.shape[1]} channel(s), the "
                     f"base model '{base['path']}' makes {base['channels']}-channel images; pass its --dataset "
                     "and --channels")
        K = int(y_train.max()) + 1
    common.check(max(cfg.classes) < K, f"--classes must be in 0..{K - 1}, got {cfg.classes}")
    evaluator = None
    if cfg.eval:  # before training: a problem with the evaluator shows now, not after the run
        import evaluate
        evaluator = evaluate.Evaluator(cfg.dataset, cfg.data_dir, cfg.download, device,
                                       image_size=base["image_size"], channels=base["channels"])
    if not cfg.sample_only:
        classifier = train(cfg, model, ddpm, base, x_train, y_train, ckpt, device)
    results = make_figures(cfg, model, classifier, ddpm, device, evaluator)
    print(f"figures in {cfg.out}/")
    return results


if __name__ == "__main__":
    main()
