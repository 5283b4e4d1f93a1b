"""DDPM on 2D points: the whole method where every step can be plotted (runs on a CPU in seconds).

Data x_0 is a 2D point cloud (Swiss roll, spiral or two moons). A linear beta schedule of T = 100
steps (beta from 1e-4 to 0.1) adds Gaussian noise step by step,
    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I),
and, because Gaussians compose, in closed form from the data,
    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),   alpha_bar_t = prod_{s<=t} (1 - beta_s).
An MLP eps_theta(x_t, t) learns to predict the added noise (loss ||eps - eps_theta||^2, the mean over
the two coordinates), and sampling runs the chain backwards from pure noise N(0, I):
    x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) + sqrt(beta_t) z.
Time convention, as in every script of this codebase: t is an integer step 0..T-1 and index t of
every array holds beta_t. The paper counts t = 1..T, so our step t is its step t + 1 (the data is
x_0 in both): step 0 already adds noise, step T-1 ends at pure noise, and the last reverse step
(t = 0) returns the sample without adding noise.

The network sees t in one of three ways (--time-input): "embed", a sinusoidal embedding of t (the
default); "raw", the scalar t / T concatenated to the point; "none", no t at all, the ablation: the
network must then guess the noise level from x_t alone, and one x_t is reached from many noise levels.

Run:  python toy_2d.py                 # Swiss roll into runs/toy_2d/ (about 40 s on one CPU core)
      python toy_2d.py --data moons
      python toy_2d.py --time-input none --out runs/toy_2d_none
It writes loss.png and samples.png and prints the held-out loss and the energy distance of the samples
(and of pure noise) to held-out data, beside its floor. Every step plotted: toy_figures.py takes the same
flags (and --panels, --no-gif) and adds forward.png, closed_form_vs_chain.png, toy_2d_variance.png,
reverse.png and reverse.gif.
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
import plots


@dataclass
class Config:
    data: str = field(default="swiss_roll", metadata={"choices": ["swiss_roll", "spiral", "moons"]})
    n_train: int = field(default=20000, metadata={"min": 1})
    n_test: int = field(default=2000, metadata={"help": "held-out points (loss and energy distance)", "min": 4})
    T: int = field(default=100, metadata={"help": "number of diffusion steps", "min": 4})
    beta_1: float = field(default=1e-4, metadata={"help": "beta of step 0 (the paper's beta_1)"})
    beta_T: float = field(default=0.1, metadata={"help": "beta of step T-1 (the paper's beta_T)"})
    steps: int = field(default=4000, metadata={"help": "training steps", "min": 1})
    batch_size: int = field(default=512, metadata={"min": 1})
    lr: float = field(default=4e-3, metadata={"help": "AdamW learning rate, decayed to 0 by a cosine"})
    hidden: int = field(default=128, metadata={"help": "width of the MLP's hidden layers", "min": 1})
    time_input: str = field(default="embed", metadata={
        "choices": ["embed", "raw", "none"],
        "help": "how the MLP sees t: sinusoidal embedding, the scalar t / T, or not at all (ablation)"})
    n_samples: int = field(default=2000, metadata={"min": 2})
    out: str = "runs/toy_2d"
    seed: int = 0


def check_config(cfg: Config) -> None:
    common.check(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    common.check(0 < cfg.beta_1 <= cfg.beta_T < 1,
                 f"need 0 < --beta-1 <= --beta-T < 1, got {cfg.beta_1} and {cfg.beta_T}")


# ----------------------------------------------------------------------------- the method


class Diffusion2D:
    """Schedule tensors (paper symbols), the forward process, the loss and the reverse sampler."""

    def __init__(self, T: int = 100, beta_1: float = 1e-4, beta_T: float = 0.1):
        self.T = T
        # Linear beta_t, t = 0..T-1. Ending at 0.1 rather than the 0.2 of the images' schedule
        # rescaled to T = 100 dissolves the data more slowly, yet alpha_bar_{T-1} ~ 0.006.
        self.beta = torch.linspace(beta_1, beta_T, T)
        self.alpha = 1 - self.beta                                    # alpha_t = 1 - beta_t
        self.alpha_bar = torch.cumprod(self.alpha, 0)                 # alpha_bar_t = prod_{s<=t} alpha_s

    def q_step(self, x_prev, t: int, generator=None):
        """Forward step t: x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)."""
        z = torch.randn(x_prev.shape, generator=generator)
        return (1 - self.beta[t]).sqrt() * x_prev + self.beta[t].sqrt() * z

    def q_sample(self, x0, t, eps):
        """Closed form: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.  t (N,) in 0..T-1."""
        ab = self.alpha_bar[t][:, None]
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def loss(self, model, x0):
        """Algorithm 1: t ~ U{0..T-1}, eps ~ N(0, I), || eps - eps_theta(x_t, t) ||^2."""
        t = torch.randint(0, self.T, (len(x0),))
        eps = torch.randn_like(x0)
        return F.mse_loss(model(self.q_sample(x0, t, eps), t), eps)

    @torch.no_grad()
    def sample(self, model, n: int, generator=None) -> list[torch.Tensor]:
        """Algorithm 2, sigma_t^2 = beta_t, from x_{T-1} ~ N(0, I) down to a sample.
        Returns the T + 1 states [x_{T-1}, x_{T-2}, ..., x_0, sample]: state k has noise level T-1-k."""
        x = torch.randn(n, 2, generator=generator)
        xs = [x]
        for t in range(self.T - 1, -1, -1):
            eps = model(x, torch.full((n,), t))
            x = (x - self.beta[t] / (1 - self.alpha_bar[t]).sqrt() * eps) / self.alpha[t].sqrt()
            if t > 0:
                x = x + self.beta[t].sqrt() * torch.randn(n, 2, generator=generator)
            xs.append(x)
        return xs


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """2 E|a - b| - E|a - a'| - E|b - b'|: zero iff the two distributions are equal."""
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def closed_form_vs_chain(diffusion: Diffusion2D, x0: torch.Tensor, ts: list[int], generator):
    """For each t: x_t from the closed form q(x_t | x_0), x_t from t + 1 applications of q_step
    (steps 0..t), and a second closed-form draw; -> list of (closed, chain, closed_again)."""
    out, x, done = [], x0, -1
    for t in sorted(ts):
        for s in range(done + 1, t + 1):
            x = diffusion.q_step(x, s, generator)
        done = t
        closed = [diffusion.q_sample(x0, torch.full((len(x0),), t), torch.randn(x0.shape, generator=generator))
                  for _ in range(2)]
        out.append((closed[0], x, closed[1]))
    return out


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
    """eps_theta(x_t, t): the point concatenated with t, 3 hidden layers. time_input says how t enters:
    "embed" a sinusoidal embedding (t_dim numbers), "raw" the one number t / T (scaled to [0, 1): a raw
    t of up to T - 1 would dwarf the unit-scale coordinates), "none" not at all (the ablation)."""

    def __init__(self, hidden: int = 128, time_input: str = "embed", T: int = 100, t_dim: int = 32):
        super().__init__()
        self.time_input, self.T, self.t_dim = time_input, T, t_dim
        n_t = {"embed": t_dim, "raw": 1, "none": 0}[time_input]
        self.net = nn.Sequential(nn.Linear(2 + n_t, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x, t):                        # x (N, 2), t (N,) integer -> eps (N, 2)
        if self.time_input == "embed":
            x = torch.cat([x, common.timestep_embedding(t, self.t_dim)], dim=1)    # (N, 2 + t_dim)
        elif self.time_input == "raw":
            x = torch.cat([x, t[:, None].float() / self.T], dim=1)                # (N, 3)
        return self.net(x)


# ----------------------------------------------------------------------------- training


def train(cfg: Config, diffusion: Diffusion2D, x_train: torch.Tensor) -> tuple[MLP, list[float]]:
    """AdamW with a cosine decay of the learning rate; a fresh random batch every step."""
    t0 = time.perf_counter()
    model = MLP(cfg.hidden, cfg.time_input, cfg.T)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    losses = []
    for step in common.progress(range(cfg.steps), "training"):
        x0 = x_train[torch.randint(0, len(x_train), (cfg.batch_size,))]
        loss = diffusion.loss(model, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
        losses.append(loss.item())
        if (step + 1) % max(1, cfg.steps // 5) == 0:
            print(f"step {step + 1:5d}/{cfg.steps}  loss {np.mean(losses[-200:]):.4f}")
    print(f"trained {cfg.steps} steps in {time.perf_counter() - t0:.1f}s")
    return model.eval(), losses


# ----------------------------------------------------------------------------- results


def judge(cfg: Config, diffusion: Diffusion2D, model: MLP, losses: list[float], x_test) -> tuple[dict, list]:
    """The held-out loss; n_samples samples and their energy distance to held-out data, beside pure noise's
    and two held-out halves' (the floor); loss.png and samples.png. -> (those numbers, the reverse chain)"""
    with torch.no_grad():
        test_loss = np.mean([diffusion.loss(model, x_test).item() for _ in range(20)])
    print(f"held-out loss {test_loss:.4f}")
    plots.plot_curves(os.path.join(cfg.out, "loss.png"), {"train loss": plots.smooth(losses, 100)},
                      title="DDPM loss on 2D points, against training step")
    xs = diffusion.sample(model, cfg.n_samples, generator=torch.Generator().manual_seed(cfg.seed))
    ed_samples, ed_noise = energy_distance(xs[-1], x_test), energy_distance(xs[0], x_test)
    ed_floor = energy_distance(x_test[::2], x_test[1::2])
    print(f"energy distance to held-out data: samples {ed_samples:.4f}, pure noise {ed_noise:.4f} "
          f"(two held-out halves: {ed_floor:.4f})")
    fig, ax = plots.figure(figsize=(3, 3.4))
    ax.scatter(xs[-1][:, 0], xs[-1][:, 1], s=1, alpha=0.4)
    ax.set(xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), aspect="equal", xticks=[], yticks=[])
    ax.set_title(f"held-out loss {test_loss:.3f}\nenergy distance {ed_samples:.4f}", fontsize=9)
    fig.suptitle(f"samples of --time-input {cfg.time_input}")
    plots.save_figure(fig, os.path.join(cfg.out, "samples.png"), dpi=90, grid=False, legend=0)
    return dict(test_loss=test_loss, ed_samples=ed_samples, ed_noise=ed_noise, ed_floor=ed_floor), xs


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    """Train, then the held-out loss, samples.png and loss.png. -> judge's numbers"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    common.prepare_out(cfg.out)
    common.seed_everything(cfg.seed)
    torch.set_num_threads(1)  # a tiny MLP: more CPU threads mostly wait on each other (and on other programs)
    rng = np.random.default_rng(cfg.seed)
    x_train, x_test = make_points(cfg.data, cfg.n_train, rng), make_points(cfg.data, cfg.n_test, rng)
    diffusion = Diffusion2D(cfg.T, cfg.beta_1, cfg.beta_T)
    model, losses = train(cfg, diffusion, x_train)
    results, _ = judge(cfg, diffusion, model, losses, x_test)
    print(f"figures in {cfg.out}/")
    return results


if __name__ == "__main__":
    main()
