"""fast_sampling.py: with the exact noise predictor of Gaussian data every solver converges to the exact
solution of the probability-flow ODE, at its order; and the lesson and fast_sampling_figures.py run end to
end at tiny sizes."""
import os

import pytest
import torch

import ddpm_mnist
import fast_sampling as fs
from tools import fast_sampling_figures

MU, S = 0.5, 0.3


def gaussian_eps(ddpm):
    """E[eps | x_t] for x_0 ~ N(MU, S^2): sqrt(1 - ab) (x_t - sqrt(ab) MU) / (ab S^2 + 1 - ab)."""
    def eps(x, t):
        ab = ddpm.alpha_bar[t][:, None, None, None]
        return (1 - ab).sqrt() * (x - ab.sqrt() * MU) / (ab * S ** 2 + 1 - ab)
    return eps


def exact_solution(ddpm, x_T):
    """The ODE keeps the standardised coordinate u = (x_t - alpha_t MU) / std(x_t); at clean data x = MU + S u."""
    a, sigma = fs.alpha_sigma(ddpm, ddpm.T - 1)
    return MU + S * (x_T - a * MU) / (a ** 2 * S ** 2 + sigma ** 2).sqrt()


def errors(solver, steps):
    ddpm = ddpm_mnist.DDPM(1000, "linear")
    x_T = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    exact = exact_solution(ddpm, x_T)
    return [(fs.SOLVERS[solver](ddpm, gaussian_eps(ddpm), x_T, n) - exact).pow(2).mean().sqrt().item() for n in steps]


@pytest.mark.parametrize("solver, steps, lo, hi", [
    ("DDIM", (20, 40, 80), 1.7, 2.3),                     # first order: half the step, half the error
    ("Heun", (10, 20, 40), 3.5, 6.0),                     # second order: a quarter
    ("DPM-Solver++(2M)", (10, 20, 40), 2.5, 6.0),         # second order (its last step is first order)
])
def test_solvers_converge_at_their_order(solver, steps, lo, hi):
    e = errors(solver, steps)
    assert e[0] > e[1] > e[2] and e[2] < 0.02, e
    assert all(lo < a / b < hi for a, b in zip(e, e[1:])), e


def test_second_order_solvers_beat_ddim_at_the_same_calls():
    """At about 80 network calls: DDIM 80 steps, 2M 80 steps, Heun 40 steps (79 calls)."""
    ddim, = errors("DDIM", (80,))
    assert errors("DPM-Solver++(2M)", (80,))[0] < ddim / 5 and errors("Heun", (40,))[0] < ddim / 5


def test_the_lesson_runs_and_scores(ddpm_ckpt, mnist_dir, tmp_path, monkeypatch):
    from tools import evaluate
    real = evaluate.Evaluator
    monkeypatch.setattr(evaluate, "Evaluator", lambda *a, **k: real(*a, **k, cache_dir=str(tmp_path / "c"),
                                                                    classifier_epochs=1))
    argv = ["--base-ckpt", ddpm_ckpt, "--data-dir", mnist_dir, "--no-download", "--device", "cpu", "--out",
            str(tmp_path), "--nfe", "2", "4", "--n-samples", "2", "--stochastic"]
    samples = fs.main(argv)                                # the lesson: one row per solver, the same noise
    assert list(samples) == [2, 4] and [x.shape for x in samples[2]] == [(2, 1, 28, 28)] * 4
    assert os.path.getsize(tmp_path / "nfe2.png") > 50 and not (tmp_path / "nfe_table.md").exists()
    rows = fast_sampling_figures.main(argv + ["--eval", "4"])
    assert [(r["sampler"], r["nfe"]) for r in rows] == [(s, n) for s in ("DDIM", "DPM-Solver++(2M)", "Heun", "DDIM eta=1")
                                                         for n in (2, 4)] + [("DDPM", 50)]
    for name in ("nfe2.png", "nfe4.png", "fd_vs_nfe.png", "nfe_table.md"):
        assert os.path.getsize(tmp_path / name) > 50, name
