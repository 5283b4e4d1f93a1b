"""toy_2d.py's options: the time input of the MLP, the closed form against the chain; toy_figures.py's
forward panels, the variance of the forward process and its figures around toy_2d.py's training."""
import pytest
import torch

import toy_2d
from tools import toy_figures


@pytest.mark.parametrize("time_input", ["embed", "raw", "none"])
def test_time_inputs_train_and_sample(time_input):
    torch.manual_seed(0)
    cfg = toy_2d.Config(T=10, steps=30, batch_size=64, hidden=16, time_input=time_input)
    diffusion = toy_2d.Diffusion2D(cfg.T, cfg.beta_1, cfg.beta_T)
    x = toy_2d.make_points("moons", 500, __import__("numpy").random.default_rng(0))
    model, losses = toy_2d.train(cfg, diffusion, x)
    assert len(losses) == 30 and all(l == l for l in losses)                # finite (NaN != NaN)
    n_in = model.net[0].in_features
    assert n_in == {"embed": 2 + model.t_dim, "raw": 3, "none": 2}[time_input]
    xs = diffusion.sample(model, 50, generator=torch.Generator().manual_seed(0))
    assert len(xs) == cfg.T + 1 and xs[-1].shape == (50, 2) and torch.isfinite(xs[-1]).all()


def test_raw_t_is_scaled_and_none_ignores_t():
    torch.manual_seed(0)
    x = torch.randn(8, 2)
    raw = toy_2d.MLP(16, "raw", T=100)
    seen = []
    raw.net[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    raw(x, torch.full((8,), 50))
    assert torch.allclose(seen[0][:, 2], torch.full((8,), 0.5))           # the network sees t / T
    assert not torch.allclose(raw(x, torch.zeros(8, dtype=torch.long)), raw(x, torch.full((8,), 99)))
    none = toy_2d.MLP(16, "none", T=100)
    assert torch.equal(none(x, torch.zeros(8, dtype=torch.long)), none(x, torch.full((8,), 99)))


def test_closed_form_and_chain_agree_in_distribution():
    d = toy_2d.Diffusion2D(10, 1e-4, 0.1)
    x0 = torch.full((20000, 2), 1.5)
    x0[::2] = -0.5                                             # two point masses: mean 0.5, var 1 per coordinate
    pairs = toy_2d.closed_form_vs_chain(d, x0, [3, 9], torch.Generator().manual_seed(0))
    for t, (closed, chain, again) in zip([3, 9], pairs):
        ab = d.alpha_bar[t]
        # steps 0..t (t + 1 of them) give q(x_t | x_0): one step fewer or more misses these by > 0.02
        assert chain.mean().item() == pytest.approx(0.5 * ab.sqrt().item(), abs=0.01)
        assert chain[1::2].mean().item() == pytest.approx(1.5 * ab.sqrt().item(), abs=0.01)
        assert chain[1::2].var().item() == pytest.approx(1 - ab.item(), rel=0.05)
        assert closed[1::2].var().item() == pytest.approx(chain[1::2].var().item(), rel=0.05)
        floor = toy_2d.energy_distance(closed[:2000], again[:2000])          # two closed-form draws
        assert toy_2d.energy_distance(closed[:2000], chain[:2000]) < 3 * floor + 0.01


def test_forward_panels_dissolve_gradually():
    d = toy_2d.Diffusion2D()                                   # the defaults: T = 100, beta 1e-4 .. 0.1
    ts = toy_figures.forward_steps(d.alpha_bar)
    ab = d.alpha_bar[ts]
    assert ts == sorted(ts) and len(set(ts)) == len(ts) == 6 and ts[-1] == 99
    assert (ab[1:] < ab[:-1]).all()                            # increasing t, decreasing alpha_bar_t
    assert ab[0] > 0.99 and ab[-1] < 0.01                      # from barely noised to pure noise
    gaps = -(ab / (1 - ab)).log().diff()                       # log-SNR falls by about the same amount per panel
    assert gaps.max() < 1.5 * gaps.min()
    assert ts[0] < 100 // 3                                    # the old first panel (t = 33) was already ᾱ = 0.58


def test_variance_preserving_against_the_simplified_process(tmp_path):
    """The report question's figure: Var(x_t) stays 1 under the variance-preserving chain and grows to
    Var(x_0) + sum beta under x_t = x_{t-1} + sqrt(beta_t) eps; measured on samples, as the closed forms say."""
    d = toy_2d.Diffusion2D()
    x0 = toy_2d.make_points("swiss_roll", 20000, __import__("numpy").random.default_rng(0))   # Var 1 per coordinate
    vp, ve = toy_figures.variance_figure(str(tmp_path / "v.png"), d, x0, torch.Generator().manual_seed(0))
    assert all(v == pytest.approx(1, rel=0.03) for v in vp)
    assert ve == pytest.approx((1 + d.beta.cumsum(0)).tolist(), rel=0.03) and ve[-1] > 5
    assert (tmp_path / "v.png").stat().st_size > 50


def test_main_writes_the_new_figures(tmp_path):
    result = toy_figures.main(["--steps", "20", "--n-train", "500", "--n-test", "200", "--n-samples", "100",
                               "--T", "10", "--time-input", "raw", "--no-gif", "--out", str(tmp_path)])
    for name in ["forward.png", "closed_form_vs_chain.png", "toy_2d_variance.png", "reverse.png", "samples.png",
                 "loss.png"]:
        assert (tmp_path / name).stat().st_size > 50, name
    assert len(result["ed_chain"]) == len(result["ed_chain_floor"]) >= 2


def test_course_panels_are_the_asked_steps(tmp_path):
    """--panels course: t = 0, 33, 66, 99 of T = 100, evenly spaced in t (the assignment's figure)."""
    assert toy_figures.course_steps(100) == [0, 33, 66, 99] and toy_figures.course_steps(10) == [0, 3, 6, 9]
    toy_figures.main(["--steps", "5", "--n-train", "300", "--n-test", "100", "--n-samples", "50", "--no-gif",
                      "--panels", "course", "--out", str(tmp_path)])
    assert (tmp_path / "forward.png").stat().st_size > 50
