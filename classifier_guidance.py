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
    python classifier_guidance.py --resume             # continue the classifier's training
Printed: the classifier's test accuracy per noise level (also accuracy_per_t.png). Figures in
--out: guided_{sampler}_s{scale}.png (one row per target class, the same noise for every scale,
s = 0 the unguided baseline), accuracy_vs_scale.png and .md: class accuracy by evaluate.py's LeNet
(independent of the guide; --no-eval skips it), by p_phi itself at t = 0 (optimistic: the samples
were pushed towards what p_phi likes), and the within-class diversity.
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

DEFAULT_BASE = "runs/ddpm_mnist/ckpt.pt"


@dataclass
class Config:
    dataset: str = field(default="mnist", metadata={"help": "the base model's data: mnist, cifar10 or an image folder"})
    data_dir: str = field(default="data", metadata={"help": "root of the torchvision datasets"})
    download: bool = field(default=True, metadata={"help": "download mnist/cifar10 when missing"})
    image_size: int = field(default=0, metadata={"help": "resize images to this (0: MNIST 28, others 32)"})
    channels: int = field(default=3, metadata={"help": "image folders only: 1 (gray) or 3 (RGB)"})
    base_ckpt: str = field(default="", metadata={"help": f"unconditional ddpm_mnist.py checkpoint (default "
                                                         f"{DEFAULT_BASE}, trained first when missing)"})
    preset: str = field(default="auto", metadata={"help": "classifier size (that UNet's encoder)",
                                                  "choices": ["auto", *PRESETS]})
    epochs: int = 10
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    scales: tuple[float, ...] = field(default=(0.0, 1.0, 3.0, 10.0), metadata={"help": "guidance scales s"})
    samplers: tuple[str, ...] = field(default=("ddim", "ddpm"), metadata={"choices": ["ddim", "ddpm"]})
    classes: tuple[int, ...] = field(default=tuple(range(10)), metadata={"help": "target classes (grid rows)"})
    n_per_class: int = field(default=50, metadata={"help": "samples per class and scale (grids show 10)"})
    ddim_steps: int = 50
    eta: float = field(default=0.0, metadata={"help": "DDIM noise: 0 deterministic, 1 DDPM-like"})
    sigma: str = field(default="posterior", metadata={"help": "DDPM Sigma_t = sigma_t^2 I",
                                                      "choices": ["beta", "posterior"]})
    clip: bool = field(default=True, metadata={"help": "clip x0_hat to [-1, 1] at every step (large s overshoots)"})
    eval: bool = field(default=True, metadata={"help": "class accuracy and FD with evaluate.py (trains its "
                                                       "LeNet once, ~1 min on a GPU, cached in checkpoints/)"})
    out: str = "runs/classifier_guidance"
    ckpt: str = field(default="", metadata={"help": "classifier checkpoint (default OUT/ckpt.pt)"})
    resume: bool = False
    sample_only: bool = field(default=False, metadata={"help": "load --ckpt and make figures, no training"})
    seed: int = 0
    device: str = "auto"
    amp: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the classifier"})


# ----------------------------------------------------------------------------- network


class NoisyClassifier(ddpm_mnist.UNet):
    """p_phi(y | x_t, t): the encoder half of ddpm_mnist's UNet (time embedding, down levels and
    bottleneck, `UNet.encode`), then GroupNorm-SiLU and a linear layer on the flattened bottleneck
    map. (Where a stroke is matters for a digit: with global average pooling instead, the same
    network learned ~10x more slowly on MNIST.)"""

    def __init__(self, num_classes: int, image_size=28, channels=1, base=64, mults=(1, 2, 2), num_res=2, dropout=0.1):
        super().__init__(image_size, channels, base, mults, num_res, dropout)
        del self.ups, self.out  # no decoder: a classifier needs the features, not an image
        self.config["num_classes"] = num_classes
        c, side = base * mults[-1], image_size // 2 ** (len(mults) - 1)
        self.head = nn.Sequential(norm(c), nn.SiLU(), nn.Flatten(), nn.Linear(c * side * side, num_classes))

    def forward(self, x, t):                        # x_t (N, C, H, W), t (N,) -> logits (N, K)
        h, _ = self.encode(x, self.embed_time(t))   # (N, c, side, side), side = H / 2^(levels - 1)
        return self.head(h)


def build_classifier(cfg: Config, image_size: int, channels: int, num_classes: int) -> NoisyClassifier:
    preset = cfg.preset if cfg.preset != "auto" else ("cifar" if (image_size, channels) == (32, 3) else "mnist")
    return NoisyClassifier(num_classes, image_size, channels, **PRESETS[preset])


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
    guidance moves it (common.clip_x0; the order of Dhariwal & Nichol's code)."""
    K = classifier.config["num_classes"]
    common.check(bool(((y >= 0) & (y < K)).all()), f"class labels must be in 0..{K - 1}, got {sorted(set(y.tolist()))}")
    common.check(isinstance(scale, (int, float)) and math.isfinite(scale),
                 f"the guidance scale must be a number, got {scale!r}")
    c = model.config
    shape = (len(y), c["channels"], c["image_size"], c["image_size"])
    unguided = common.clip_x0(model, ddpm.alpha_bar) if clip else model        # eps_theta(x_t, t)
    eps = guided_eps(unguided, classifier, ddpm, y, scale, sampler, sigma)
    if sampler == "ddpm":
        x = ddpm.ddpm_sample(eps, shape, sigma, x_T=x_T, generator=generator)
    else:
        x = ddpm.ddim_sample(eps, shape, steps, eta, x_T=x_T, generator=generator)
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------- training


def load_base(cfg: Config, device):
    """The unconditional EMA UNet and its DDPM; trains ddpm_mnist.py's default model when the
    default checkpoint is missing (an explicit --base-ckpt must exist)."""
    def train_base():
        ddpm_mnist.train(ddpm_mnist.Config(dataset=cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                                           image_size=cfg.image_size, channels=cfg.channels, seed=cfg.seed,
                                           out=os.path.dirname(DEFAULT_BASE), amp=cfg.amp), device)
    path = common.checkpoint_or_train(cfg.base_ckpt, DEFAULT_BASE, train_base, "base model")
    model, ddpm, state = ddpm_mnist.load_trained(path, device)
    return model, ddpm, dict(path=path, T=state["config"]["T"], schedule=state["config"]["schedule"])


def train(cfg: Config, ddpm: DDPM, base: dict, device) -> NoisyClassifier:
    """common.fit's loop (AdamW with warm-up, EMA, a checkpoint per epoch) on the classifier loss."""
    x_train, y_train = ddpm_mnist.load_data(cfg, device)
    classifier = build_classifier(cfg, x_train.shape[-1], x_train.shape[1], int(y_train.max()) + 1).to(device)
    print(f"noisy classifier: {sum(p.numel() for p in classifier.parameters()) / 1e6:.2f}M parameters, "
          f"{len(x_train)} training images, T = {ddpm.T}, on {device}")

    def batches(epoch):
        return common.batches(x_train, y_train, cfg.batch_size, generator=torch.Generator().manual_seed(cfg.seed + epoch))

    ema, losses = common.fit(
        classifier, lambda net, b: classifier_loss(ddpm, net, b[0], b[1]), batches, epochs=cfg.epochs,
        ckpt=cfg.ckpt or os.path.join(cfg.out, "ckpt.pt"), device=device, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        ema_decay=cfg.ema_decay, resume=cfg.resume, amp=cfg.amp, compile=cfg.compile, config=asdict(cfg),
        classifier=classifier.config, base=base)
    common.plot_curves(os.path.join(cfg.out, "loss.png"), {"train cross-entropy": common.smooth(losses)})
    return ema


def load_classifier(path: str, base: dict, device) -> NoisyClassifier:
    """The EMA classifier of a checkpoint written by `train`; its schedule must be the base's."""
    state = common.load_checkpoint(path, device, hint="train with `python classifier_guidance.py` first, or pass --ckpt")
    common.check("classifier" in state, f"'{path}' is not a classifier_guidance.py checkpoint")
    trained = (state["base"]["T"], state["base"]["schedule"])
    common.check(trained == (base["T"], base["schedule"]), f"the classifier in '{path}' learned the schedule "
                 f"{trained}, the base model uses {(base['T'], base['schedule'])}; train it again for this base")
    classifier = NoisyClassifier(**state["classifier"]).to(device)
    common.load_weights(classifier, state["ema"], path)
    return classifier.eval()


# ----------------------------------------------------------------------------- figures


@torch.no_grad()
def accuracy_per_t(classifier, ddpm: DDPM, x: torch.Tensor, y: torch.Tensor, levels: int = 10, seed: int = 0):
    """Test accuracy of p_phi(y | x_t, t) at `levels` noise levels t from 0 to T-1: [(t, accuracy)]."""
    g = torch.Generator(x.device).manual_seed(seed)
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
def make_figures(cfg: Config, model, classifier, ddpm: DDPM, device, evaluator=None) -> list[list]:
    """Accuracy per noise level, then for each sampler and scale: n_per_class samples of every
    class in --classes from the same noise, a grid of the first 10 per class, and the table of
    within-class diversity relative to real test images (and evaluate.py's accuracy and FD)."""
    x_test, y_test = ddpm_mnist.load_data(cfg, device, train=False)
    per_t = accuracy_per_t(classifier, ddpm, x_test[:2000], y_test[:2000], seed=cfg.seed)
    print("noisy classifier, test accuracy per noise level:\n" + "\n".join(f"  t = {t:4d}: {a:.3f}" for t, a in per_t))
    common.plot_curves(os.path.join(cfg.out, "accuracy_per_t.png"), {"test accuracy": per_t}, xlabel="t",
                       ylabel="accuracy", logy=False, title="p_phi(y | x_t, t) on the test set")
    c, n = model.config, cfg.n_per_class
    y = torch.tensor(cfg.classes, device=device).repeat_interleave(n)       # (N,) one row per class
    gen = lambda: torch.Generator(device).manual_seed(cfg.seed)  # noqa: E731 (the same noise for every scale)
    x_T = torch.randn((len(y), c["channels"], c["image_size"], c["image_size"]), device=device, generator=gen())
    cols = min(n, 10)
    in_grid = torch.arange(len(y), device=device) % n < cols
    real = torch.cat([(y_test == k).nonzero()[:n, 0] for k in cfg.classes])
    div_real = common.within_class_diversity(x_test[real], y_test[real])
    rows = []
    for sampler in cfg.samplers:
        for s in cfg.scales:
            x = sample(model, classifier, ddpm, y, s, sampler, cfg.ddim_steps, cfg.eta, cfg.sigma, cfg.clip, x_T, gen())
            common.save_grid(x[in_grid], os.path.join(cfg.out, f"guided_{sampler}_s{s:g}.png"), nrow=cols)
            own = (classifier(x, torch.zeros_like(y)).argmax(1) == y).float().mean().item()  # p_phi at t = 0
            row = [sampler, s, common.within_class_diversity(x, y) / div_real, own]
            rows.append(row + ([evaluator.accuracy(x, y), evaluator.fd(x)] if evaluator is not None else []))
    header = ["sampler", "scale s", "diversity (real = 1)", "accuracy by p_phi itself"]
    header += ["class accuracy (LeNet)", evaluator.name] if evaluator else []
    print(common.write_table(os.path.join(cfg.out, "accuracy_vs_scale.md"), header, rows))
    series = [("diversity", 2), ("accuracy by p_phi", 3)] + ([("accuracy by LeNet", 4)] if evaluator else [])
    curves = {f"{name}, {smp}": [(r[1], r[i]) for r in rows if r[0] == smp]
              for smp in cfg.samplers for name, i in series}
    common.plot_curves(os.path.join(cfg.out, "accuracy_vs_scale.png"), curves, xlabel="guidance scale s", ylabel="",
                       logy=False, title=f"classifier guidance, {n} samples per class")
    return rows


def main(argv=None) -> list[list]:
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    common.check(all(math.isfinite(s) for s in cfg.scales), f"--scales must be finite numbers, got {cfg.scales}")
    common.check(cfg.epochs >= 1 and cfg.n_per_class >= 2, "--epochs must be >= 1 and --n-per-class >= 2")
    common.check(min(cfg.classes) >= 0, f"--classes must be class ids >= 0, got {cfg.classes}")
    common.seed_everything(cfg.seed)
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    os.makedirs(cfg.out, exist_ok=True)
    model, ddpm, base = load_base(cfg, device)
    common.check(1 <= cfg.ddim_steps <= ddpm.T, f"--ddim-steps must be in 1..{ddpm.T} (the base's T), got {cfg.ddim_steps}")
    if cfg.sample_only:
        classifier = load_classifier(cfg.ckpt or os.path.join(cfg.out, "ckpt.pt"), base, device)
    else:
        classifier = train(cfg, ddpm, base, device)
    same = all(classifier.config[k] == model.config[k] for k in ("image_size", "channels"))
    common.check(same, f"the base model makes {model.config['channels']}x{model.config['image_size']} images, "
                 f"the classifier reads {classifier.config['channels']}x{classifier.config['image_size']}; "
                 "use the base's data")
    evaluator = None
    if cfg.eval:
        import evaluate  # only the figures need it
        evaluator = evaluate.Evaluator(cfg.dataset, cfg.data_dir, cfg.download, device,
                                       image_size=cfg.image_size or None, channels=cfg.channels)
    rows = make_figures(cfg, model, classifier, ddpm, device, evaluator)
    print(f"figures in {cfg.out}/")
    return rows


if __name__ == "__main__":
    main()
