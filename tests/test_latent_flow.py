"""Tests of latent_diffusion.py and rectified_flow.py (and their companions latent_figures.py and
flow_figures.py): smoke runs on the tiny MNIST of conftest.py (real idx files, CPU, a few steps), the
mathematics, and one-line errors for bad input."""
import functools
import os

import pytest
import torch

import checkpoints
import common
import plots
from conftest import digest
from tools import flow_figures
import latent_diffusion as ld
from tools import latent_figures
import rectified_flow as rf

LD_TINY = ["--no-download", "--vae-epochs", "1", "--vae-base", "8", "--unet-base", "8", "--unet-res", "1",
           "--T", "40", "--epochs", "1", "--batch-size", "32", "--n-samples", "2", "--ddim-steps", "2",
           "--device", "cpu"]
RF_TINY = ["--no-download", "--preset", "tiny", "--unet-base", "8", "--unet-res", "1", "--epochs", "1",
           "--reflow-epochs", "2", "--n-pairs", "8", "--pair-steps", "3", "--n-samples", "2", "--batch-size", "32",
           "--device", "cpu"]
STEPS = ["--steps", "1", "2"]                              # flow_figures.py: the Euler step counts compared


def one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert msg.startswith("error:") and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def skip_plots(monkeypatch):
    """Matplotlib costs ~1 s a plot here; runs after the first one of each script skip it."""
    monkeypatch.setattr(plots, "plot_curves", lambda *a, **k: None)


@pytest.fixture
def quick_eval(monkeypatch, tmp_path):
    """evaluate.Evaluator with a one-epoch classifier cached under tmp_path (for --eval)."""
    from tools import evaluate
    monkeypatch.setattr(evaluate, "Evaluator", functools.partial(
        evaluate.Evaluator, classifier_epochs=1, cache_dir=str(tmp_path / "eval_cache")))


@pytest.fixture(scope="module")
def ld_out(mnist_dir, tmp_path_factory):
    """A tiny latent_diffusion.py run: OUT/vae.pt and OUT/ckpt.pt."""
    out = str(tmp_path_factory.mktemp("ld"))
    ld.main(["--data-dir", mnist_dir, "--out", out] + LD_TINY)
    return out


# ----------------------------------------------------------------------------- latent_diffusion.py


def test_latent_diffusion_smoke_resume_sample_only(ld_out, mnist_dir, quick_eval, monkeypatch):
    for name in ("vae.pt", "ckpt.pt", "vae_reconstructions.png", "samples_epoch001.png"):
        assert os.path.isfile(os.path.join(ld_out, name)), name
    vae_state = torch.load(os.path.join(ld_out, "vae.pt"), weights_only=True)
    assert vae_state["kind"] == ld.VAE_KIND and vae_state["net"]["base"] == 8 and vae_state["scale"] > 0
    state = torch.load(os.path.join(ld_out, "ckpt.pt"), weights_only=True)
    assert state["kind"] == ld.UNET_KIND and state["net"]["channels"] == 4 and state["scale"] == vae_state["scale"]
    assert state["epoch"] == 1 and all(map(torch.isfinite, torch.tensor(state["losses"])))
    vae_mtime = os.path.getmtime(os.path.join(ld_out, "vae.pt"))
    skip_plots(monkeypatch)
    ld.main(["--data-dir", mnist_dir, "--out", ld_out] + LD_TINY + ["--resume", "--epochs", "2"])
    assert torch.load(os.path.join(ld_out, "ckpt.pt"), weights_only=True)["epoch"] == 2
    ld.main(["--data-dir", mnist_dir, "--out", ld_out] + LD_TINY + ["--sample-only"])
    assert os.path.isfile(os.path.join(ld_out, "samples.png"))
    res = latent_figures.main(["--data-dir", mnist_dir, "--out", ld_out] + LD_TINY + ["--sample-only", "--eval", "4"])
    assert os.path.getmtime(os.path.join(ld_out, "vae.pt")) == vae_mtime   # reused, never retrained
    assert "| DDPM | 40 |" in open(os.path.join(ld_out, "eval.md")).read()
    assert os.path.isfile(os.path.join(ld_out, "ddim_vs_ddpm.png")) and res["recon_mse"] > 0 and res["scale"] > 0


def test_vae_shapes_and_loss():
    for channels, size, side in ((1, 28, 7), (3, 32, 8)):
        vae = ld.VAE(channels, latent_channels=4, base=8)
        x = torch.rand(2, channels, size, size) * 2 - 1
        x_hat, mu, logvar = vae(x)
        assert x_hat.shape == x.shape and mu.shape == logvar.shape == (2, 4, side, side)
        assert vae.decode(mu).shape == x.shape and ld.encode_latents(vae, x, batch_size=1).shape == mu.shape
    loss, recon, kl = ld.vae_loss(x, x, torch.zeros_like(mu), torch.zeros_like(mu), kl_weight=1.0)
    assert loss == recon == kl == 0                        # q(z|x) = N(0, I) = the prior: KL = 0


def test_scale_factor_gives_unit_variance_test_latents(ld_out, mnist_dir):
    vae, scale = ld.load_vae(os.path.join(ld_out, "vae.pt"), "cpu")
    x_train, _ = common.load_images("mnist", mnist_dir, train=True, download=False)
    x_test, _ = common.load_images("mnist", mnist_dir, train=False, download=False)
    assert scale == pytest.approx(ld.latent_scale(ld.encode_latents(vae, x_train)), rel=1e-5)
    assert (ld.encode_latents(vae, x_test) * scale).std().item() == pytest.approx(1.0, abs=0.15)


def test_latent_diffusion_resume_is_the_uninterrupted_run(ld_out, mnist_dir, tmp_path):
    """2 epochs straight == 1 epoch + --resume --epochs 2: same batches (seed + epoch), RNG restored."""
    run = lambda out, *argv: ld.main(["--data-dir", mnist_dir, "--out", str(out), "--vae",  # noqa: E731
                                      os.path.join(ld_out, "vae.pt")] + LD_TINY + ["--batch-size", "16"] + list(argv))
    run(tmp_path / "straight", "--epochs", "2")
    run(tmp_path / "resumed", "--epochs", "1")
    run(tmp_path / "resumed", "--epochs", "2", "--resume")
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("straight", "resumed"))
    assert a["step"] == b["step"] == 8 and a["losses"] == b["losses"]
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    with pytest.raises(SystemExit) as e:                    # a changed network is refused, in one line
        run(tmp_path / "resumed", "--epochs", "3", "--resume", "--T", "50")
    one_line_error(e, "--T is 50", "40")


def test_ensure_vae_continues_an_interrupted_vae_exactly(mnist_dir, tmp_path):
    x, _ = common.load_images("mnist", mnist_dir, download=False)
    kw = dict(base=8, batch_size=32, seed=3)
    ld.ensure_vae(str(tmp_path / "straight.pt"), x, "cpu", epochs=2, **kw)
    ld.ensure_vae(str(tmp_path / "cut.pt"), x, "cpu", epochs=1, **kw)
    state = torch.load(tmp_path / "cut.pt", weights_only=True)
    del state["scale"]                                      # as if stopped before the scale factor was saved
    checkpoints.save(str(tmp_path / "cut.pt"), **state)
    before = digest(tmp_path / "cut.pt")
    with pytest.raises(SystemExit) as e:                    # never continued silently: --resume or --overwrite
        ld.ensure_vae(str(tmp_path / "cut.pt"), x, "cpu", epochs=2, **kw)
    one_line_error(e, "unfinished VAE", "--resume", "--overwrite")
    assert digest(tmp_path / "cut.pt") == before
    torch.manual_seed(123)                                  # whatever the process did before
    ld.ensure_vae(str(tmp_path / "cut.pt"), x, "cpu", epochs=2, resume=True, **kw)
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("straight.pt", "cut.pt"))
    assert a["epoch"] == b["epoch"] == 2 and a["scale"] == b["scale"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_latent_diffusion_sample_only_in_an_empty_folder_trains_nothing(mnist_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        ld.main(["--data-dir", mnist_dir, "--out", str(tmp_path)] + LD_TINY + ["--sample-only"])
    one_line_error(e, "--sample-only", "vae.pt", "not found")
    assert os.listdir(tmp_path) == []                       # no VAE was trained first


def test_another_scripts_checkpoint_as_vae_is_a_one_line_error(mnist_dir, ddpm_ckpt, ld_out, tmp_path):
    for out, argv in ((str(tmp_path), []), (ld_out, ["--sample-only"])):
        with pytest.raises(SystemExit) as e:
            ld.main(["--data-dir", mnist_dir, "--out", out, "--vae", ddpm_ckpt] + LD_TINY + argv)
        one_line_error(e, "ddpm_mnist.py UNet", "latent_diffusion.py VAE")
    assert os.listdir(tmp_path) == []                       # stopped before training anything
    with pytest.raises(SystemExit) as e:
        rf.main(["--data-dir", mnist_dir, "--out", str(tmp_path), "--space", "latent", "--vae", ddpm_ckpt] + RF_TINY)
    one_line_error(e, "ddpm_mnist.py UNet", "latent_diffusion.py VAE")


# ----------------------------------------------------------------------------- rectified_flow.py


def gaussian_velocity(m: float, s: float):
    """The exact marginal velocity E[x1 - x0 | x_t = x] for data x1 ~ N(m, s^2), noise x0 ~ N(0, 1):
    (x1 - x0, x_t) are jointly Gaussian, Cov(x1 - x0, x_t) = t s^2 - (1 - t), Var(x_t) = (1 - t)^2 + t^2 s^2."""
    def v(x, t):
        t = t.view(-1, *[1] * (x.dim() - 1))
        return m + (t * s ** 2 - (1 - t)) / ((1 - t) ** 2 + t ** 2 * s ** 2) * (x - t * m)
    return v


def test_euler_with_exact_velocity_reproduces_gaussian():
    m, s = 1.5, 0.5
    x0 = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x1 = rf.euler_sample(gaussian_velocity(m, s), x0, steps=200)
    assert x1.mean().item() == pytest.approx(m, abs=0.02) and x1.std().item() == pytest.approx(s, abs=0.02)
    one = rf.euler_sample(gaussian_velocity(m, s), x0, steps=1)  # one step lands on the mean
    assert torch.allclose(one, torch.full_like(one, m))


def test_straightness():
    x0, x1 = torch.randn(8, 1, 3, 3), torch.randn(8, 1, 3, 3)
    _, path = rf.euler_sample(lambda x, t: x1 - x0, x0, steps=10, return_path=True)
    assert path.shape == (11, 8, 1, 3, 3)
    assert max(rf.straightness(path)) < 1e-10               # a straight line at constant speed
    _, path = rf.euler_sample(gaussian_velocity(0.0, 0.2), x0, steps=50, return_path=True)
    assert min(rf.straightness(path)) > 1e-3                # Flow-1 paths bend


def test_rf_loss_is_zero_for_the_true_velocity():
    x0, x1 = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    assert rf.rf_loss(lambda x, t: x1 - x0, x1, x0).item() == 0   # x0 given: reflow's fixed pairs


def test_rectified_flow_pixel_pairs_made_once(mnist_dir, ld_out, tmp_path, monkeypatch, quick_eval):
    calls = []
    make_pairs = rf.make_pairs
    monkeypatch.setattr(rf, "make_pairs", lambda *a, **k: calls.append(1) or make_pairs(*a, **k))
    out = str(tmp_path)
    flow_figures.main(["--data-dir", mnist_dir, "--out", out] + RF_TINY + STEPS)   # trains, then the figures
    assert len(calls) == 1                                  # once, not once per Flow-2 epoch
    for name in ("flow1.pt", "flow2.pt", "pairs.pt", "steps_comparison.png", "steps_table.md",
                 "noise_vs_flow-1.png", "noise_vs_flow-2.png", "steps_error.png", "loss.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    flow2 = torch.load(os.path.join(out, "flow2.pt"), weights_only=True)
    assert flow2["epoch"] == 2 and all(map(torch.isfinite, torch.tensor(flow2["losses"])))
    pairs_mtime = os.path.getmtime(os.path.join(out, "pairs.pt"))
    skip_plots(monkeypatch)
    rf.main(["--data-dir", mnist_dir, "--out", out] + RF_TINY + ["--resume", "--reflow-epochs", "3"])
    assert len(calls) == 1 and os.path.getmtime(os.path.join(out, "pairs.pt")) == pairs_mtime
    assert torch.load(os.path.join(out, "flow2.pt"), weights_only=True)["epoch"] == 3
    assert os.path.isfile(os.path.join(out, "samples.png"))
    flow_figures.main(["--data-dir", mnist_dir, "--out", out] + RF_TINY + STEPS + ["--sample-only", "--eval", "4"])
    assert "| Flow-2 | 2 |" in open(os.path.join(out, "eval.md")).read()
    with pytest.raises(SystemExit) as e:                    # a pixel flow is not a latent one
        rf.main(["--data-dir", mnist_dir, "--out", out, "--sample-only", "--space", "latent",
                 "--vae", os.path.join(ld_out, "vae.pt")] + RF_TINY)
    one_line_error(e, "another space")


def test_pairs_cache_is_reused_only_when_it_holds_this_flow1s_pairs(tmp_path, monkeypatch):
    calls = []
    make_pairs = rf.make_pairs
    monkeypatch.setattr(rf, "make_pairs", lambda *a, **k: calls.append(1) or make_pairs(*a, **k))
    path, flow1 = str(tmp_path / "pairs.pt"), (lambda x, t: 1 - x)    # any velocity field will do
    get = lambda step=5, reuse=True: rf.get_pairs(path, flow1, step, 4, (1, 2, 2), 3, 0, "cpu", reuse)  # noqa: E731
    x0, x1 = get()
    assert len(calls) == 1 and x0.shape == x1.shape == (4, 1, 2, 2)
    assert torch.equal(get()[1], x1) and len(calls) == 1    # --resume, the same Flow-1: reused
    get(reuse=False)                                        # a fresh run (--overwrite): a new Flow-1, new pairs
    get(step=6)                                             # Flow-1 trained further: made again
    assert len(calls) == 3
    (tmp_path / "pairs.pt").write_bytes(b"not a checkpoint")  # a damaged file: made again
    assert torch.equal(get()[1], x1)
    checkpoints.save(path, kind="ddpm_mnist.py UNet", x0=x0)  # another script's file: made again
    assert torch.equal(get()[1], x1)
    assert len(calls) == 5


def test_rectified_flow_latent_reuses_the_vae(mnist_dir, ld_out, tmp_path, monkeypatch):
    skip_plots(monkeypatch)
    vae = os.path.join(ld_out, "vae.pt")                    # (trained when missing: see the ld_out run)
    mtime = os.path.getmtime(vae)
    rf.main(["--data-dir", mnist_dir, "--out", str(tmp_path), "--space", "latent", "--vae", vae] + RF_TINY)
    assert os.path.isfile(os.path.join(tmp_path, "samples.png"))
    assert os.path.getmtime(vae) == mtime


# ----------------------------------------------------------------------------- bad input


def test_vae_of_another_shape_is_a_one_line_error(mnist_dir, tmp_path):
    path = str(tmp_path / "rgb_vae.pt")
    vae = ld.VAE(channels=3, base=8)
    checkpoints.save(path, kind=ld.VAE_KIND, net=vae.config, model=vae.state_dict(), scale=1.0)
    with pytest.raises(SystemExit) as e:
        rf.main(["--data-dir", mnist_dir, "--out", str(tmp_path), "--space", "latent", "--vae", path] + RF_TINY)
    one_line_error(e, "3-channel", "--vae")


@pytest.mark.parametrize("script, argv, words", [
    (rf, ["--sample-only"], ["--sample-only", "flow1.pt", "not found"]),
    (rf, ["--resume"], ["no checkpoint", "drop --resume"]),
    (flow_figures, ["--steps", "0"], ["--steps"]),
    (flow_figures, ["--eval", "1"], ["--eval must be 0 (off) or >= 2"]),
    (rf, ["--n-pairs", "0"], ["--n-pairs"]),
    (rf, ["--sample-every", "0"], ["--sample-every must be >= 1"]),
    (rf, ["--lr", "-1"], ["--lr must be > 0"]),
])
def test_rectified_flow_bad_input(mnist_dir, tmp_path, script, argv, words):
    with pytest.raises(SystemExit) as e:
        script.main(["--data-dir", mnist_dir, "--out", str(tmp_path)] + RF_TINY + argv)
    one_line_error(e, *words)


@pytest.mark.parametrize("argv, words", [
    (["--sample-only"], ["--sample-only", "ckpt.pt", "not found"]),
    (["--ddim-steps", "50"], ["--ddim-steps"]),
    (["--batch-size", "0"], ["--batch-size must be >= 1"]),
    (["--kl-weight", "-1"], ["--kl-weight must be >= 0"]),
    (["--resume"], ["no checkpoint", "drop --resume"]),
])
def test_latent_diffusion_bad_input(mnist_dir, ld_out, tmp_path, argv, words):
    vae = ["--vae", os.path.join(ld_out, "vae.pt")]
    with pytest.raises(SystemExit) as e:
        ld.main(["--data-dir", mnist_dir, "--out", str(tmp_path)] + vae + LD_TINY + argv)
    one_line_error(e, *words)


def test_a_second_run_into_a_trained_out_stops_and_keeps_the_checkpoint(mnist_dir, ld_out, tmp_path):
    ckpt = os.path.join(ld_out, "ckpt.pt")
    before = open(ckpt, "rb").read()
    with pytest.raises(SystemExit) as e:
        ld.main(["--data-dir", mnist_dir, "--out", ld_out] + LD_TINY)
    one_line_error(e, "already holds a checkpoint", "--resume", "--overwrite")
    assert open(ckpt, "rb").read() == before


def test_latent_checkpoint_with_another_vae_is_a_one_line_error(mnist_dir, ld_out, tmp_path):
    state = torch.load(os.path.join(ld_out, "vae.pt"), weights_only=True)
    other = str(tmp_path / "other_vae.pt")
    checkpoints.save(other, **{**state, "scale": 2 * state["scale"]})
    with pytest.raises(SystemExit) as e:
        ld.main(["--data-dir", mnist_dir, "--out", ld_out, "--vae", other] + LD_TINY + ["--sample-only"])
    one_line_error(e, "another VAE", "--vae")
