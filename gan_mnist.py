"""A GAN on MNIST, the baseline of the course's question "diffusion or GAN?" (Goodfellow et al., 2014;
the convolutional DCGAN of Radford et al., 2016; spectral normalisation of Miyato et al., 2018).

A generator G turns noise z ~ N(0, I) (z_dim numbers) into an image in ONE forward pass; a
discriminator D gives each image a logit, "real" (from the data) against "generated". They play a
two-player game, each player with its own Adam, one step each per batch:
    D step:  L_D = softplus(-D(x)) + softplus(D(G(z)))     = -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z))))
    G step:  L_G = softplus(-D(G(z)))                      = -log sigmoid(D(G(z)))
The G loss is the "non-saturating" one: the minimax loss log(1 - sigmoid(D(G(z)))) is flat where D
wins easily, which is exactly at the start, so G would get no gradient. D's weights are spectrally
normalised (each layer divided by its largest singular value), which bounds how sharply D can
change and keeps its gradients useful to G: the usual cure for GANs' unstable training. Adam has
betas (0.5, 0.999) as in DCGAN; an EMA of G's weights makes the samples, as in every lesson here.
Against diffusion (ddpm_mnist.py): sampling costs one network pass instead of 50 (DDIM) or 1000
(DDPM), but nothing in the loss asks G to cover every mode, and nothing says when training is done.
Images live in [-1, 1] (G ends in tanh).

Run:
    python gan_mnist.py                              # 30 epochs into runs/gan_mnist/: samples.png, loss.png
    python gan_mnist.py --eval 2000 --eval-every 5   # + FD-LeNet and classes found every 5 epochs, as it trains
    python gan_mnist.py --resume --epochs 60         # continue a run (a new --lr is taken)
    python -m tools.gan_figures --sample-only --eval 2000  # score runs/gan_mnist/ckpt.pt: eval.md, fd_vs_time.png
gan_figures.py takes this script's flags: it trains (or loads) as this one does, then scores the end.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

import checkpoints
import common
import plots

KIND = "gan_mnist.py GAN"


@dataclass
class Config(common.RunConfig):
    dataset: str = field(default="mnist", metadata={"help": "mnist, or a folder of grayscale 28x28 images"})
    z_dim: int = field(default=64, metadata={"min": 1, "help": "numbers in the noise z"})
    width: int = field(default=64, metadata={"min": 4, "help": "channels of G's and D's first layer"})
    epochs: int = field(default=30, metadata={"min": 1, "help": "epochs in all (with --resume: up to this many)"})
    batch_size: int = field(default=128, metadata={"min": 1})
    lr: float = field(default=2e-4, metadata={"help": "Adam learning rate of both players"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA of G's weights, which sample"})
    n_samples: int = field(default=64, metadata={"min": 1, "help": "images per sample grid"})
    sample_every: int = field(default=5, metadata={"min": 1, "help": "epochs between progress grids"})
    eval: int = field(default=0, metadata={"min": 0, "help": "score N samples with evaluate.py (FD-LeNet, "
                      "classes found) every --eval-every K epochs while training (gan_figures.py: also at the end); "
                      "0 = off"})
    eval_every: int = field(default=0, metadata={"min": 0, "help": "with --eval N: epochs between scores during "
                            "training (the FD against training time); 0 = none"})
    out: str = field(default="runs/gan_mnist", metadata={"help": "folder of the checkpoint and figures"})


def check_config(cfg: Config) -> None:
    common.check(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    common.check(0 <= cfg.ema_decay < 1, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    common.check(cfg.eval != 1, "--eval must be 0 (off) or >= 2 samples, got 1")
    common.check(cfg.eval or not cfg.eval_every, "--eval-every needs --eval N (the samples to score)")


# ----------------------------------------------------------------------------- the method


def d_loss(D, x_real, x_fake) -> torch.Tensor:
    """L_D = softplus(-D(x)) + softplus(D(G(z))): -log p(real) on data, -log p(generated) on fakes."""
    return F.softplus(-D(x_real)).mean() + F.softplus(D(x_fake)).mean()


def g_loss(D, x_fake) -> torch.Tensor:
    """L_G = softplus(-D(G(z))): the non-saturating loss, G wants its images called real."""
    return F.softplus(-D(x_fake)).mean()


@torch.no_grad()
def sample(G, n: int, generator=None) -> torch.Tensor:
    """n images (n, 1, 28, 28) in [-1, 1]: one pass of G over z ~ N(0, I)."""
    device = next(G.parameters()).device
    return G(torch.randn((n, G.config["z_dim"]), device=device, generator=generator)).clamp(-1, 1)


# ----------------------------------------------------------------------------- network


class Generator(nn.Module):
    """G(z): a linear layer to 7x7 maps, then two upsampling stages (14x14, 28x28) of conv,
    GroupNorm and ReLU, and a last conv with tanh. (GroupNorm, not BatchNorm: EMA averages weights,
    never running statistics.)"""

    def __init__(self, z_dim: int = 64, width: int = 64):
        super().__init__()
        self.config = dict(z_dim=z_dim, width=width)
        c = 2 * width
        self.fc = nn.Linear(z_dim, c * 7 * 7)
        self.net = nn.Sequential(
            nn.GroupNorm(8, c), nn.ReLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU(),
            nn.Conv2d(width, 1, 3, padding=1), nn.Tanh())

    def forward(self, z):                                # z (N, z_dim) -> x (N, 1, 28, 28)
        return self.net(self.fc(z).view(len(z), -1, 7, 7))


class Discriminator(nn.Module):
    """D(x): three strided convolutions (28 -> 14 -> 7 -> 4) with LeakyReLU, then a linear logit;
    every layer spectrally normalised."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            spectral_norm(nn.Conv2d(1, width, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(width, 2 * width, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(2 * width, 4 * width, 3, 2, 1)), nn.LeakyReLU(0.2),
            nn.Flatten(), spectral_norm(nn.Linear(4 * width * 4 * 4, 1)))

    def forward(self, x):                                # x (N, 1, 28, 28) -> logit (N,)
        return self.net(x).squeeze(1)


# ----------------------------------------------------------------------------- training


def train(cfg: Config, x_train, device, evaluator=None):
    """The two-player loop: per batch one Adam step of D, then one of G, then G's EMA (the weights that
    sample); one atomic checkpoint per epoch with both players, both optimizers and the RNG (--resume is
    exact; a new --lr is taken). -> (EMA generator, {"g", "d": losses, "fd": [(seconds, epoch, FD, classes)]})"""
    ckpt = os.path.join(cfg.out, "ckpt.pt")
    G, D = Generator(cfg.z_dim, cfg.width).to(device), Discriminator(cfg.width).to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    ema = common.make_ema(G, cfg.ema_decay)                  # theta_ema, G's weights that sample
    step, start, losses, history = 0, 0, [], dict(d=[], fd=[], seconds=0.0)
    if cfg.resume:   # G, its EMA, both optimizers and the RNG come back; a changed network is refused
        state = checkpoints.resume(ckpt, device, KIND, G, ema, opt_g, cfg, same=("z_dim", "width"),
                                   keys=("disc", "disc_opt", "history"))
        D.load_state_dict(state["disc"])
        opt_d.load_state_dict(state["disc_opt"])
        step, start, losses, history = state["step"], state["epoch"], state["losses"], state["history"]
        for group in opt_g.param_groups + opt_d.param_groups:
            group["lr"] = cfg.lr                             # a constant rate: no warm-up, no decay
    millions = [sum(p.numel() for p in net.parameters()) / 1e6 for net in (G, D)]
    print(f"G {millions[0]:.2f}M, D {millions[1]:.2f}M parameters; {len(x_train)} training images on {device}")
    batch = min(cfg.batch_size, len(x_train))
    for epoch in range(start, cfg.epochs):
        G.train(), D.train()
        t0, g_epoch, d_epoch = time.perf_counter(), [], []
        for x, _ in common.progress(common.batches(x_train, batch_size=batch, seed=cfg.seed + epoch),
                                    f"epoch {epoch + 1}/{cfg.epochs}", len(x_train) // batch):
            z = torch.randn((len(x), cfg.z_dim), device=device)
            with common.autocast(device, cfg.amp):
                loss_d = d_loss(D, x, G(z).detach())             # D: data real, fakes generated
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            with common.autocast(device, cfg.amp):
                loss_g = g_loss(D, G(z))                         # G: fool the D just updated
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            ema.update_parameters(G)                             # theta_ema <- d theta_ema + (1 - d) theta
            d_epoch.append(loss_d.detach()), g_epoch.append(loss_g.detach())   # on the device: no sync per step
            step += 1
        d_epoch, g_epoch = torch.stack(d_epoch), torch.stack(g_epoch)
        for mean in (d_epoch.mean(), g_epoch.mean()):           # before saving: the last good epoch stays on disk
            checkpoints.check_finite(mean, step, ckpt)
        common.sync(device)
        seconds = time.perf_counter() - t0
        print(f"epoch {epoch + 1:3d}/{cfg.epochs} (G loss)  loss {g_epoch.mean():.4f}  {seconds:.1f}s  "
              f"{len(g_epoch) * batch / seconds:.0f} img/s", flush=True)
        losses += g_epoch.tolist()
        history["d"] += d_epoch.tolist()
        history["seconds"] += seconds
        if evaluator is not None and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0:
            from tools import evaluate
            x = sample(ema.module.eval(), cfg.eval, common.generator(device, cfg.seed))
            fd, classes = evaluator.fd(x), evaluate.coverage(evaluator.histogram(x))
            history["fd"].append((history["seconds"], epoch + 1, fd, classes))
            print(f"  after {history['seconds'] / 60:.1f} min of training: {evaluator.name} {fd:.2f}, {classes}")
        checkpoints.save(ckpt, kind=KIND, net=G.config, config=asdict(cfg), disc=D.state_dict(),
                         disc_opt=opt_d.state_dict(), history=history, model=G.state_dict(),
                         ema=ema.module.state_dict(), opt=opt_g.state_dict(), step=step, epoch=epoch + 1,
                         losses=losses, rng=checkpoints.rng_state())
        if (epoch + 1) % cfg.sample_every == 0 or epoch + 1 == cfg.epochs:
            plots.save_labelled_grid(sample(ema.module.eval(), cfg.n_samples, common.generator(device, cfg.seed)),
                                     os.path.join(cfg.out, f"samples_epoch{epoch + 1:03d}.png"), 8, [],
                                     f"GAN: EMA generator after epoch {epoch + 1}, one pass each")
    return ema.module.eval(), dict(history, g=losses)


def load_trained(path: str, device):
    """The EMA generator and the training history of a checkpoint written by `train`."""
    state = checkpoints.load(path, device, KIND, keys=("net", "ema", "history", "losses"),
                             hint="train with `python gan_mnist.py` first")
    G = Generator(**state["net"]).to(device)
    checkpoints.load_weights(G, state["ema"], path)
    return G.eval(), dict(state["history"], g=state["losses"])


def train_or_load(cfg: Config, device):
    """--sample-only: the run in cfg.out; otherwise a new run (or --resume) trained there, scored every
    --eval-every K epochs. -> (EMA generator, history, the evaluator of --eval N or None)"""
    ckpt = os.path.join(cfg.out, "ckpt.pt")
    common.prepare_out(cfg.out)
    if cfg.sample_only:
        G, history = load_trained(ckpt, device)          # a missing or foreign file stops here
    else:
        checkpoints.new_or_resume(ckpt, cfg.resume, cfg.overwrite)
    common.seed_everything(cfg.seed)
    common.setup_speed(device)
    evaluator = None
    if cfg.eval:  # before training: a problem with the evaluator shows now, not after the run
        from tools import evaluate
        evaluator = evaluate.Evaluator(cfg.dataset, cfg.data_dir, cfg.download, device, image_size=28, channels=1)
    if not cfg.sample_only:
        x_train, _ = common.load_images(cfg.dataset, cfg.data_dir, True, cfg.download, 28, 1, device)
        t0 = time.perf_counter()
        G, history = train(cfg, x_train, device, evaluator)
        print(f"trained in {(time.perf_counter() - t0) / 60:.1f} min ({history['seconds'] / 60:.1f} min of epochs)")
    return G, history, evaluator


# ----------------------------------------------------------------------------- figures


def samples_and_losses(out: str, G, history: dict, n: int, seed: int, device) -> None:
    """samples.png (n images of the EMA generator) and loss.png (D's loss against G's)."""
    plots.save_labelled_grid(sample(G, n, common.generator(device, seed)), os.path.join(out, "samples.png"), 8, [],
                             f"GAN: {n} samples of the EMA generator, one network call each")
    plots.plot_curves(os.path.join(out, "loss.png"), {"D loss": plots.smooth(history["d"]),
                                                       "G loss": plots.smooth(history["g"])},
                      logy=False, title="GAN: D's loss against G's (no loss says when a GAN is done)")


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    """Train (or load, --sample-only), then samples.png and loss.png. -> the training seconds and FD record"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    common.check(not cfg.eval or (cfg.eval_every and not cfg.sample_only), "--eval N scores while training "
                 "(with --eval-every K); to score a run at its end: python -m tools.gan_figures --eval N [--sample-only]")
    device = common.get_device(cfg.device)
    G, history, _ = train_or_load(cfg, device)
    samples_and_losses(cfg.out, G, history, cfg.n_samples, cfg.seed, device)
    print(f"figures in {cfg.out}/ (eval.md and fd_vs_time.png: gan_figures.py)")
    return dict(train_seconds=history["seconds"], fd_history=history["fd"])


if __name__ == "__main__":
    main()
