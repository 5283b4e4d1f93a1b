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
    python gan_mnist.py                              # 30 epochs into runs/gan_mnist/, then the figures
    python gan_mnist.py --eval 2000 --eval-every 5   # + FD-LeNet and classes found against training time
    python gan_mnist.py --sample-only --eval 2000    # score runs/gan_mnist/ckpt.pt, no training
    python gan_mnist.py --resume --epochs 60         # continue a run (a new --lr is taken)
Figures in --out: samples.png (64 samples of the EMA generator), samples_epochNNN.png during training,
loss.png (D's and G's losses), and with --eval N: eval.md (FD-LeNet, classes found, seconds to sample
1,000 images) and, with --eval-every K, fd_vs_time.png and fd_vs_time.json (the curve, in training
seconds, for gallery.py's comparison with diffusion).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

import common

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
                      "classes found) at the end; 0 = off"})
    eval_every: int = field(default=0, metadata={"min": 0, "help": "with --eval N: also every K epochs during "
                            "training (fd_vs_time.png); 0 = at the end only"})
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
    """The two-player loop: per batch one Adam step of D, then one of G; the EMA of G samples; one
    atomic checkpoint per epoch (both players, both optimizers, the RNG: --resume is exact).
    -> (EMA generator, {"g": G losses, "d": D losses, "fd": [(training seconds, epoch, FD, classes)]})"""
    ckpt = os.path.join(cfg.out, "ckpt.pt")
    G, D = Generator(cfg.z_dim, cfg.width).to(device), Discriminator(cfg.width).to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    run = common.Run(G, ckpt, KIND, device, cfg.lr, cfg.ema_decay, opt=opt_g)   # G, its EMA, step and G losses
    history = dict(d=[], fd=[], seconds=0.0)
    if cfg.resume:        # G, its EMA and optimizer (with the RNG) through run.resume; then D's own
        state = run.resume(cfg, same=("z_dim", "width"), keys=("disc", "disc_opt", "history"))
        D.load_state_dict(state["disc"])
        opt_d.load_state_dict(state["disc_opt"])
        history = state["history"]
    print(f"G {run.millions():.2f}M, D {run.millions(D):.2f}M parameters; {len(x_train)} training images on {device}")
    n_batches = len(x_train) // min(cfg.batch_size, len(x_train))
    for epoch in range(run.epoch, cfg.epochs):
        G.train(), D.train()
        run.new_epoch(f"epoch {epoch + 1:3d}/{cfg.epochs} (G loss)")
        d_epoch = []
        for x, _ in common.progress(common.batches(x_train, batch_size=cfg.batch_size, seed=cfg.seed + epoch),
                                    f"epoch {epoch + 1}/{cfg.epochs}", n_batches):
            for opt in (opt_g, opt_d):
                common.set_lr(opt, cfg.lr, run.step, 0, 1)       # constant: a GAN is not warmed up
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
            run.ema.update_parameters(G)
            d_epoch.append(loss_d.detach())
            run.add(loss_g, len(x))
        common.check_finite(torch.stack(d_epoch).mean(), run.step, ckpt)   # D's loss, then G's, before saving
        run.end_epoch(save=False)
        history["d"] += torch.stack(d_epoch).tolist()
        history["seconds"] += run.seconds
        if evaluator is not None and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0:
            x = sample(run.ema.module.eval(), cfg.eval, common.generator(device, cfg.seed))
            history["fd"].append((history["seconds"], epoch + 1, evaluator.fd(x), evaluate_coverage(evaluator, x)))
            print(f"  after {history['seconds'] / 60:.1f} min of training: {evaluator.name} {history['fd'][-1][2]:.2f}, "
                  f"{history['fd'][-1][3]}")
        run.save(net=G.config, config=asdict(cfg), disc=D.state_dict(), disc_opt=opt_d.state_dict(), history=history)
        if (epoch + 1) % cfg.sample_every == 0 or epoch + 1 == cfg.epochs:
            common.save_grid(sample(run.ema.module.eval(), cfg.n_samples, common.generator(device, cfg.seed)),
                             os.path.join(cfg.out, f"samples_epoch{epoch + 1:03d}.png"))
    return run.ema.module.eval(), dict(history, g=run.losses)


def evaluate_coverage(evaluator, x) -> str:
    import evaluate
    return evaluate.coverage(evaluator.histogram(x))


def load_trained(path: str, device):
    """The EMA generator and the training history of a checkpoint written by `train`."""
    state = common.load_checkpoint(path, device, KIND, keys=("net", "ema", "history", "losses"),
                                   hint="train with `python gan_mnist.py` first")
    G = Generator(**state["net"]).to(device)
    common.load_weights(G, state["ema"], path)
    return G.eval(), dict(state["history"], g=state["losses"])


# ----------------------------------------------------------------------------- figures


def make_figures(cfg: Config, G, history: dict, device, evaluator=None) -> dict:
    """samples.png, loss.png; with an evaluator the FD, classes found and sampling time of cfg.eval
    samples (eval.md), and the FD-against-training-time curve. -> the results, for gallery.py"""
    common.save_grid(sample(G, cfg.n_samples, common.generator(device, cfg.seed)), os.path.join(cfg.out, "samples.png"))
    common.plot_curves(os.path.join(cfg.out, "loss.png"), {"D loss": common.smooth(history["d"]),
                                                           "G loss": common.smooth(history["g"])},
                       logy=False, title="the two players' losses (no loss says when a GAN is done)")
    results = dict(train_seconds=history["seconds"], fd_history=history["fd"])
    if evaluator is None:
        return results
    _, seconds = common.timed(device, lambda: sample(G, 1000, common.generator(device, cfg.seed + 1)))
    import evaluate
    x = sample(G, cfg.eval, common.generator(device, cfg.seed))
    hist = evaluator.histogram(x)
    results |= dict(fd=evaluator.fd(x), classes=evaluate.coverage(hist), histogram=hist, sample_seconds_1000=seconds)
    common.write_table(os.path.join(cfg.out, "eval.md"), ["samples", evaluator.name, "classes found",
                                                          "seconds to sample 1,000"],
                       [[cfg.eval, results["fd"], results["classes"], seconds]])
    print(f"{evaluator.name} {results['fd']:.2f} ({cfg.eval} samples), {results['classes']}; "
          f"1,000 samples in {seconds:.3f}s")
    if history["fd"]:
        with open(os.path.join(cfg.out, "fd_vs_time.json"), "w") as f:
            json.dump(history["fd"], f)
        common.plot_curves(os.path.join(cfg.out, "fd_vs_time.png"),
                           {"GAN": [(s / 60, fd) for s, _, fd, _ in history["fd"]]},
                           xlabel="training minutes", ylabel=evaluator.name, title="sample quality against training time")
    return results


def comparison_figure(path: str, runs: list[dict], gan_history: dict, diffusion_losses: list) -> None:
    """The course's comparison in one figure (gallery.py's gan part makes the runs): FD against
    training minutes (each GAN seed's curve, diffusion's curve where a run has one, x at the end of
    every run), diffusion's one falling loss, and the GAN's two losses, a game with no end in sight.
    runs: [{model, seed, minutes, fd, and fd_history (GAN) or curve [(minutes, epoch, fd)]}]"""
    fig, (a, b, c) = common.figure(1, 3, figsize=(15, 4))
    for r in runs:
        color = "tab:red" if r["model"] == "GAN" else "tab:blue"
        curve = [(s / 60, fd) for s, _, fd, _ in r.get("fd_history", [])] or [(m, fd) for m, _, fd in r.get("curve", [])]
        if curve:
            a.plot(*zip(*curve), color=color, alpha=0.6, marker=".", label=f"{r['model']}, seed {r['seed']}")
        a.scatter([r["minutes"]], [r["fd"]], color=color, marker="x")
    a.set(xlabel="training minutes", ylabel="FD-LeNet (x: 2,000 samples at the end)", yscale="log",
          title="sample quality against training time")
    b.plot(*zip(*common.smooth(diffusion_losses)), color="tab:blue")
    b.set(xlabel="step", ylabel="eps-MSE", yscale="log", title="diffusion: one loss, falling")
    for name, key, color in (("D", "d", "tab:gray"), ("G", "g", "tab:red")):
        c.plot(*zip(*common.smooth(gan_history[key])), color=color, label=name)
    c.set(xlabel="step", ylabel="loss", title="GAN: two losses, a game")
    common.save_figure(fig, path, dpi=110, legend=7)


def main(argv=None) -> dict:
    """Train (or load, --sample-only) and make the figures. -> make_figures' results"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    device = common.get_device(cfg.device)
    ckpt = os.path.join(cfg.out, "ckpt.pt")
    common.prepare_out(cfg.out)
    if cfg.sample_only:
        G, history = load_trained(ckpt, device)          # a missing or foreign file stops here
    else:
        common.new_or_resume(ckpt, cfg.resume, cfg.overwrite)
    common.seed_everything(cfg.seed)
    common.setup_speed(device)
    evaluator = None
    if cfg.eval:  # before training: a problem with the evaluator shows now, not after the run
        import evaluate
        evaluator = evaluate.Evaluator(cfg.dataset, cfg.data_dir, cfg.download, device, image_size=28, channels=1)
    if not cfg.sample_only:
        x_train, _ = common.load_images(cfg.dataset, cfg.data_dir, True, cfg.download, 28, 1, device)
        t0 = time.perf_counter()
        G, history = train(cfg, x_train, device, evaluator)
        print(f"trained in {(time.perf_counter() - t0) / 60:.1f} min ({history['seconds'] / 60:.1f} min of epochs)")
    results = make_figures(cfg, G, history, device, evaluator)
    print(f"figures in {cfg.out}/")
    return results


if __name__ == "__main__":
    main()
