"""Fast sampling: one trained DDPM model under DDIM, DPM-Solver++(2M), Heun and DDPM, quality against
network calls.

The probability-flow ODE (Song et al., 2021). With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 -
alpha_bar_t) and the half log-SNR lambda_t = log(alpha_t / sigma_t) (it grows as t falls: -5.1 at
t = 999, +4.6 at t = 0 for the linear schedule), the ODE whose solutions carry the marginals
q(x_t) is exactly solved from s to t (lambda_s < lambda_t) by
    x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x0_theta(x_lambda, lambda) dlambda,
where x0_theta(x, t) = (x - sigma_t eps_theta(x, t)) / alpha_t is the network's estimate of the clean
image (the "data prediction" form of Lu et al., 2022). A solver approximates the integral; with
h = lambda_t - lambda_s:
- DDIM (Song et al., 2021) holds x0_theta constant over the step: the first-order solver,
      x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x0_theta(x_s)            1 call per step.
- DPM-Solver++(2M) (Lu et al., 2022) extrapolates x0_theta linearly in lambda from this step's and
  the previous step's estimates, r = h_prev / h:
      D = (1 + 1 / (2r)) x0_theta(x_s) - 1 / (2r) x0_theta(x_prev),   x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D
  second order for the price of one call per step. Two steps are DDIM's: the first (no previous
  estimate yet) and the last, into t = 0: on this grid it is by far the longest in lambda (at 80 steps
  lambda jumps from 3.3 to 4.6), and extrapolating x0_theta over it does more harm than good (the
  "lower order final" of common implementations).
- Heun (Karras et al., 2022) solves the same ODE in x~ = x / alpha and sigma~ = sigma / alpha = e^-lambda,
  where it reads dx~/dsigma~ = eps_theta(x, t): an Euler step to the next sigma~, then the trapezoid
  of the slopes at both ends; second order, 2 calls per step (the last step, to sigma~ = 0, is Euler).
- DDPM (Ho et al., 2020): the stochastic sampler through all T steps, the quality reference; at fewer
  steps, DDIM with eta = 1 (--stochastic) shows what fresh noise at every step costs.
Every solver runs on DDIM's grid of real timesteps, linspace(T-1, 0), then lands on clean data
(ddpm_mnist.py's convention), and calls the same network with x0_hat clipped to [-1, 1] (--clip, the
default of ddpm_mnist.py), so only the update rule differs. Cost is counted in network function
evaluations (NFE): NFE = steps for DDIM and 2M, 2 steps - 1 for Heun.

Run:
    python fast_sampling.py                    # base runs/ddpm_mnist/ckpt.pt (trained first if missing)
    python fast_sampling.py --base-ckpt runs/gallery/cpu/ddpm/ckpt.pt --nfe 5 10 20
It writes runs/fast_sampling/nfe{N}.png: for each NFE, one row per solver (in the order of --solvers, then
DDIM eta=1 with --stochastic), all from the same noise. fast_sampling_figures.py takes the same flags (and
--eval N, --no-reference), labels the rows, and scores each solver and NFE (FD-LeNet, classes found,
seconds) into fd_vs_nfe.png and nfe_table.md, beside the DDPM-T reference (N x T UNet calls).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

import common
import plots
import ddpm_mnist
from ddpm_mnist import DDPM


@dataclass
class Config:
    base_ckpt: str = field(default=ddpm_mnist.DEFAULT_CKPT, metadata={
        "help": "ddpm_mnist.py checkpoint to sample from (the default one is trained first when missing)"})
    nfe: tuple[int, ...] = field(default=(5, 10, 20, 50), metadata={"min": 2, "help": "network calls per sample"})
    solvers: tuple[str, ...] = field(default=("DDIM", "DPM-Solver++(2M)", "Heun"), metadata={
        "choices": ["DDIM", "DPM-Solver++(2M)", "Heun", "DDIM eta=1"], "help": "solvers to compare"})
    stochastic: bool = field(default=False, metadata={"help": "add DDIM with eta = 1 (fresh noise every step)"})
    clip: bool = field(default=True, metadata={"help": "clip x0_hat to [-1, 1] at every step (all solvers)"})
    n_samples: int = field(default=16, metadata={"min": 1, "help": "images per solver in the nfe{N}.png grids"})
    data_dir: str = field(default="data", metadata={"help": "root of the torchvision datasets"})
    download: bool = field(default=True, metadata={"help": "download MNIST when missing"})
    out: str = field(default="runs/fast_sampling", metadata={"help": "folder of the figures"})
    seed: int = field(default=0, metadata={"help": "the same seed gives the same noise and samples"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})


# ----------------------------------------------------------------------------- the method


def alpha_sigma(ddpm: DDPM, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) of the integer step t."""
    ab = ddpm.alpha_bar[t]
    return ab.sqrt(), (1 - ab).sqrt()


def steps_for(solver: str, nfe: int) -> int:
    """The number of steps that costs at most `nfe` network calls."""
    return (nfe + 1) // 2 if solver == "Heun" else nfe


@torch.no_grad()
def ddim(ddpm: DDPM, model, x_T, steps: int, generator=None):
    """The first-order solver: ddpm_mnist.py's DDIM (eta = 0), unchanged."""
    return ddpm.ddim_sample(model, x_T.shape, steps, x_T=x_T)


@torch.no_grad()
def ddim_eta1(ddpm: DDPM, model, x_T, steps: int, generator=None):
    """The stochastic contrast: DDIM with eta = 1 (DDPM-like noise at every step) at `steps` steps."""
    return ddpm.ddim_sample(model, x_T.shape, steps, eta=1.0, x_T=x_T, generator=generator)


@torch.no_grad()
def dpm_solver_2m(ddpm: DDPM, model, x_T, steps: int, generator=None):
    """DPM-Solver++(2M) on DDIM's timesteps, first order at the first step and at the last into t = 0;
    the last call's x0_theta is the sample (clean data)."""
    taus = ddpm.ddim_timesteps(steps)
    x, x0_prev, h_prev = x_T, None, None
    for i, s in enumerate(taus):
        a_s, sigma_s = alpha_sigma(ddpm, s)
        eps = model(x, torch.full((len(x),), s, device=x.device)).float()
        x0 = (x - sigma_s * eps) / a_s                                   # x0_theta(x_s)
        if i + 1 == len(taus):                                           # lambda = inf: clean data
            return x0
        a_t, sigma_t = alpha_sigma(ddpm, taus[i + 1])
        h = torch.log(a_t / sigma_t) - torch.log(a_s / sigma_s)          # lambda_t - lambda_s
        first_order = x0_prev is None or i + 2 == len(taus)
        D = x0 if first_order else x0 + h / (2 * h_prev) * (x0 - x0_prev)      # (1 + 1/2r) x0 - 1/2r x0_prev
        x = sigma_t / sigma_s * x - a_t * torch.expm1(-h) * D
        x0_prev, h_prev = x0, h


@torch.no_grad()
def heun(ddpm: DDPM, model, x_T, steps: int, generator=None):
    """Heun's second-order method in sigma~ = sigma / alpha, on DDIM's timesteps, then Euler to sigma~ = 0."""
    taus = ddpm.ddim_timesteps(steps)
    a, _ = alpha_sigma(ddpm, taus[0])
    x = x_T / a                                                          # x~ = x / alpha

    def slope(x, t):                                                     # eps_theta at x_t = alpha_t x~
        return model(alpha_sigma(ddpm, t)[0] * x, torch.full((len(x),), t, device=x.device)).float()
    for i, s in enumerate(taus):
        a_s, sigma_s = alpha_sigma(ddpm, s)
        d = slope(x, s)                                                  # dx~/dsigma~ = eps_theta(x, t)
        if i + 1 == len(taus):
            return x - sigma_s / a_s * d                                 # Euler to sigma~ = 0
        a_t, sigma_t = alpha_sigma(ddpm, taus[i + 1])
        dsigma = sigma_t / a_t - sigma_s / a_s
        d_next = slope(x + dsigma * d, taus[i + 1])                      # the slope at the Euler guess
        x = x + dsigma * (d + d_next) / 2


SOLVERS = {"DDIM": ddim, "DPM-Solver++(2M)": dpm_solver_2m, "Heun": heun, "DDIM eta=1": ddim_eta1}


# ----------------------------------------------------------------------------- the comparison


def load_base(cfg: Config, device):
    """ddpm_mnist.py's EMA UNet and process from --base-ckpt (the default one is trained first when missing).
    -> (model, ddpm, image shape (C, H, W))"""
    path = ddpm_mnist.ensure_trained(cfg.base_ckpt, device, data_dir=cfg.data_dir, download=cfg.download)
    model, ddpm, _ = ddpm_mnist.load_trained(path, device)
    common.check(max(steps_for(s, n) for s in cfg.solvers for n in cfg.nfe) <= ddpm.T,
                 f"--nfe asks for more steps than the base's T = {ddpm.T}; pass smaller counts")
    c = model.config
    return model, ddpm, (c["channels"], c["image_size"], c["image_size"])


def solvers_of(cfg: Config) -> list[str]:
    """--solvers, then DDIM eta=1 with --stochastic."""
    return list(cfg.solvers) + (["DDIM eta=1"] if cfg.stochastic and "DDIM eta=1" not in cfg.solvers else [])


def samples_per_nfe(cfg: Config, model, ddpm: DDPM, device, shape) -> dict[int, list[torch.Tensor]]:
    """For every --nfe, the samples of each solver from the same noise x_T (n_samples images):
    {nfe: [(n_samples, C, H, W) per solver]}."""
    eps = ddpm.eps_from(model, cfg.clip)
    x_T = torch.randn((cfg.n_samples, *shape), device=device, generator=common.generator(device, cfg.seed))
    return {nfe: [SOLVERS[s](ddpm, eps, x_T, steps_for(s, nfe), common.generator(device, cfg.seed, 1))
                  for s in solvers_of(cfg)] for nfe in cfg.nfe}


def calls(solver: str, nfe: int) -> int:
    """The network calls `solver` makes with steps_for(solver, nfe) steps (Heun: 2 per step, 1 for the last)."""
    steps = steps_for(solver, nfe)
    return 2 * steps - 1 if solver == "Heun" else steps


def save_strips(out: str, samples: dict[int, list[torch.Tensor]], solvers: list[str]) -> None:
    """OUT/nfe{N}.png for every N of samples_per_nfe: a row per solver, named with its steps and network calls."""
    for nfe, rows in samples.items():
        plots.save_labelled_grid(torch.cat(rows).clamp(-1, 1), os.path.join(out, f"nfe{nfe}.png"), len(rows[0]),
                                 [f"{s}\n{steps_for(s, nfe)} steps, NFE {calls(s, nfe)}" for s in solvers],
                                 f"at most {nfe} network calls per sample: the same noise in every column")


def main(argv=None) -> dict[int, list[torch.Tensor]]:
    """nfe{N}.png for every --nfe. -> samples_per_nfe's samples"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    common.prepare_out(cfg.out)
    model, ddpm, shape = load_base(cfg, device)
    samples = samples_per_nfe(cfg, model, ddpm, device, shape)
    save_strips(cfg.out, samples, solvers_of(cfg))
    print(f"figures in {cfg.out}/ (FD against NFE: fast_sampling_figures.py)")
    return samples


if __name__ == "__main__":
    main()
