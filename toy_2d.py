"""DDPM on 2D points: the whole method where every step can be plotted (runs on a CPU in seconds).

Data x_0 is a 2D point cloud (Swiss roll, spiral or two moons). With T = 100 steps and a linear
beta schedule (beta_1 = 1e-4 to beta_T = 0.1), the forward process adds Gaussian noise step by step,
    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I),
and, because Gaussians compose, in closed form from the data,
    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),   alpha_bar_t = prod_{s<=t} (1 - beta_s).
An MLP eps_theta(x_t, t) learns to predict the added noise (loss ||eps - eps_theta||^2), and
sampling runs the chain backwards from x_T ~ N(0, I):
    x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) + sigma_t z.
Time convention: paper time t = 1..T, where x_0 is the data; the 0-based arrays below hold
beta_t at index t - 1 (the same as ddpm_mnist.py, whose integer step i = t - 1).

Run:  python toy_2d.py                 # Swiss roll, figures in runs/toy_2d/
      python toy_2d.py --data moons
Figures: forward.png, reverse.png, loss.png, reverse.gif; printed: held-out loss and the energy
distance of the samples (and of pure noise) to held-out data.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Config:
    data: str = field(default="swiss_roll", metadata={"choices": ["swiss_roll", "spiral", "moons"]})
    n_train: int = 20000
    n_test: int = 2000
    T: int = 100
    beta_1: float = 1e-4
    beta_T: float = field(default=0.1, metadata={"help": "last beta of the linear schedule"})
    steps: int = field(default=4000, metadata={"help": "training steps"})
    batch_size: int = 512
    lr: float = 2e-3
    hidden: int = 256
    n_samples: int = 2000
    gif: bool = field(default=True, metadata={"help": "write reverse.gif"})
    out: str = "runs/toy_2d"
    seed: int = 0


# ----------------------------------------------------------------------------- data


def make_points(name: str, n: int, rng: np.random.Generator) -> torch.Tensor:
    """n points of a 2D shape, scaled to roughly unit variance per coordinate. -> (n, 2)"""
    if name == "swiss_roll":
        u = 1.5 * np.pi * (1 + 2 * rng.random(n))
        x = np.stack([u * np.cos(u), u * np.sin(u)], 1) / 10
    elif name == "spiral":
        u = np.sqrt(rng.random(n)) * 3 * np.pi
        sign = rng.choice([-1.0, 1.0], n)[:, None]          # two interleaved arms
        x = sign * np.stack([u * np.cos(u), u * np.sin(u)], 1) / 8
    else:  # two interlocking half circles
        u, upper = np.pi * rng.random(n), rng.random(n) < 0.5
        x = np.where(upper[:, None], np.stack([np.cos(u), np.sin(u)], 1),
                     np.stack([1 - np.cos(u), 0.5 - np.sin(u)], 1)) - [0.5, 0.25]
    x = x + 0.02 * rng.standard_normal(x.shape)
    return torch.tensor(x / x.std(0), dtype=torch.float32)


# ----------------------------------------------------------------------------- network


class MLP(nn.Module):
    """eps_theta(x_t, t): the point concatenated with a sinusoidal embedding of t, 3 hidden layers."""

    def __init__(self, hidden: int = 256, t_dim: int = 32):
        super().__init__()
        self.t_dim = t_dim
        self.net = nn.Sequential(nn.Linear(2 + t_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x, t):                        # x (N, 2), t (N,) integer -> eps (N, 2)
        return self.net(torch.cat([x, common.timestep_embedding(t, self.t_dim)], dim=1))


# ----------------------------------------------------------------------------- the method


class Diffusion2D:
    """Schedule tensors (paper symbols), the forward process, the loss and the reverse sampler."""

    def __init__(self, T: int = 100, beta_1: float = 1e-4, beta_T: float = 0.1):
        self.T = T
        # Linear beta_t, t = 1..T at index t-1. Ending at 0.1 rather than the 0.2 of the images'
        # schedule rescaled to T = 100 keeps the data visible until t ~ 33, yet alpha_bar_T ~ 0.006.
        self.beta = torch.linspace(beta_1, beta_T, T)
        self.alpha = 1 - self.beta                                    # alpha_t = 1 - beta_t
        self.alpha_bar = torch.cumprod(self.alpha, 0)                 # alpha_bar_t = prod_{s<=t} alpha_s

    def q_step(self, x_prev, t):
        """One forward step: x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)."""
        return (1 - self.beta[t - 1]).sqrt() * x_prev + self.beta[t - 1].sqrt() * torch.randn_like(x_prev)

    def q_sample(self, x0, t, eps):
        """Closed form: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.  t (N,) in 1..T."""
        ab = self.alpha_bar[t - 1][:, None]
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def loss(self, model, x0):
        t = torch.randint(1, self.T + 1, (len(x0),))
        eps = torch.randn_like(x0)
        return F.mse_loss(model(self.q_sample(x0, t, eps), t - 1), eps)  # the network sees index t-1

    @torch.no_grad()
    def sample(self, model, n: int, generator=None) -> list[torch.Tensor]:
        """Reverse chain from x_T ~ N(0, I) with sigma_t^2 = beta_t. Returns [x_T, ..., x_0]."""
        x = torch.randn(n, 2, generator=generator)
        xs = [x]
        for t in range(self.T, 0, -1):
            eps = model(x, torch.full((n,), t - 1))
            x = (x - self.beta[t - 1] / (1 - self.alpha_bar[t - 1]).sqrt() * eps) / self.alpha[t - 1].sqrt()
            if t > 1:
                x = x + self.beta[t - 1].sqrt() * torch.randn(n, 2, generator=generator)
            xs.append(x)
        return xs


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """2 E|a - b| - E|a - a'| - E|b - b'|: zero iff the two distributions are equal."""
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


# ----------------------------------------------------------------------------- training


def train(cfg: Config, diffusion: Diffusion2D, x_train: torch.Tensor) -> tuple[MLP, list[float]]:
    model = MLP(cfg.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    losses = []
    for step in range(cfg.steps):
        x0 = x_train[torch.randint(0, len(x_train), (cfg.batch_size,))]
        loss = diffusion.loss(model, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
        losses.append(loss.item())
        if (step + 1) % max(1, cfg.steps // 5) == 0:
            print(f"step {step + 1:5d}/{cfg.steps}  loss {np.mean(losses[-200:]):.4f}")
    return model.eval(), losses


# ----------------------------------------------------------------------------- figures


def scatter_row(path: str, clouds: list[torch.Tensor], titles: list[str], suptitle: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(clouds), figsize=(3.2 * len(clouds), 3.3))
    for ax, x, title in zip(axes, clouds, titles):
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
        ax.set(xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), title=title, aspect="equal", xticks=[], yticks=[])
    fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reverse_gif(path: str, xs: list[torch.Tensor], T: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    frames = list(range(0, T + 1, max(1, T // 25))) + [T] * 8  # hold the last frame
    fig, ax = plt.subplots(figsize=(4, 4))
    dots = ax.scatter(xs[0][:, 0], xs[0][:, 1], s=2, alpha=0.5)
    ax.set(xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), aspect="equal", xticks=[], yticks=[])

    def draw(i):
        dots.set_offsets(xs[i].numpy())
        ax.set_title(f"reverse process, t = {T - i}")
        return (dots,)

    FuncAnimation(fig, draw, frames=frames, blit=False).save(path, writer=PillowWriter(fps=10), dpi=72)
    plt.close(fig)


def main(argv=None) -> dict:
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    common.check(cfg.T >= 4, f"--T must be >= 4, got {cfg.T}")
    common.check(cfg.steps >= 1 and cfg.batch_size >= 1, "--steps and --batch-size must be >= 1")
    common.seed_everything(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    x_train, x_test = make_points(cfg.data, cfg.n_train, rng), make_points(cfg.data, cfg.n_test, rng)
    diffusion = Diffusion2D(cfg.T, cfg.beta_1, cfg.beta_T)

    # Forward process, from the closed form; the step-by-step chain gives the same distribution.
    shown = [0, cfg.T // 3, 2 * cfg.T // 3, cfg.T]
    noisy = [x_test if t == 0 else diffusion.q_sample(x_test, torch.full((len(x_test),), t), torch.randn_like(x_test))
             for t in shown]
    scatter_row(os.path.join(cfg.out, "forward.png"), noisy, [f"t = {t}" for t in shown],
                "forward process q(x_t | x_0)")

    t0 = time.perf_counter()
    model, losses = train(cfg, diffusion, x_train)
    print(f"trained {cfg.steps} steps in {time.perf_counter() - t0:.1f}s")
    common.plot_curves(os.path.join(cfg.out, "loss.png"), {"train loss": common.smooth(losses, 100)},
                       title="DDPM loss on 2D points")
    with torch.no_grad():
        test_loss = np.mean([diffusion.loss(model, x_test).item() for _ in range(20)])
    print(f"held-out loss {test_loss:.4f}")

    xs = diffusion.sample(model, cfg.n_samples, generator=torch.Generator().manual_seed(cfg.seed))
    scatter_row(os.path.join(cfg.out, "reverse.png"), [xs[cfg.T - t] for t in reversed(shown)],
                [f"t = {t}" for t in reversed(shown)], "reverse process p(x_{t-1} | x_t), from noise")
    if cfg.gif:
        reverse_gif(os.path.join(cfg.out, "reverse.gif"), xs, cfg.T)
    ed_samples = energy_distance(xs[-1], x_test)
    ed_noise = energy_distance(xs[0], x_test)
    print(f"energy distance to held-out data: samples {ed_samples:.4f}, pure noise {ed_noise:.4f} "
          f"(two held-out halves: {energy_distance(x_test[::2], x_test[1::2]):.4f})")
    print(f"figures in {cfg.out}/")
    return {"test_loss": test_loss, "ed_samples": ed_samples, "ed_noise": ed_noise}


if __name__ == "__main__":
    main()
