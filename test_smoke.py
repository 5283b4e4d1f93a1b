"""Smoke runs of toy_2d.py and ddpm_mnist.py on tiny data, bad input, and the mathematics of DDPM/DDIM.

Scripts run in-process through their `main(argv)` (no subprocess: one torch import for the suite),
on the tiny datasets of conftest.py, written in the real file formats.
"""
import os

import pytest
import torch

import common
import ddpm_mnist
import toy_2d

TINY = ["--preset", "tiny", "--T", "20", "--batch-size", "16", "--n-samples", "4", "--ddim-steps", "10",
        "--device", "cpu", "--no-download"]


# ----------------------------------------------------------------------------- smoke runs


def test_toy_2d_runs(tmp_path):
    result = toy_2d.main(["--steps", "60", "--n-train", "2000", "--n-test", "400", "--n-samples", "300",
                 "--T", "20", "--out", str(tmp_path)])
    for name in ("forward.png", "reverse.png", "loss.png", "reverse.gif"):
        assert (tmp_path / name).stat().st_size > 1000, name
    assert result["ed_samples"] < result["ed_noise"]  # even 60 steps move the samples toward the data


def test_ddpm_mnist_train_resume_sample_only(mnist_dir, tmp_path):
    out = tmp_path / "run"
    args = TINY + ["--data-dir", mnist_dir, "--out", str(out)]
    ddpm_mnist.main(args + ["--epochs", "1"])
    for name in ("ckpt.pt", "loss.png", "loss_per_timestep.png", "ddpm_4x4.png", "ddpm_8x8.png",
                 "ddim10_4x4.png", "ddim10_8x8.png", "interpolation.png", "ddim_sweep.png",
                 "ddim_sweep_time.png", "samples_epoch001.png"):
        assert (out / name).stat().st_size > 100, name
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert set(state) >= {"model", "ema", "opt", "step", "config"}
    assert state["epoch"] == 1 and all(map(torch.isfinite, torch.tensor(state["losses"])))
    steps_per_epoch = state["step"]

    ddpm_mnist.main(args + ["--epochs", "2", "--resume"])
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 2 * steps_per_epoch
    assert len(state["losses"]) == 2 * steps_per_epoch

    (out / "ddpm_4x4.png").unlink()
    ddpm_mnist.main(args + ["--sample-only"])  # no training: the checkpoint must be unchanged
    assert (out / "ddpm_4x4.png").exists()
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2 * steps_per_epoch


def test_ddpm_on_image_folder(image_folder, tmp_path):
    ddpm_mnist.main(TINY + ["--dataset", image_folder, "--image-size", "16", "--epochs", "1",
                            "--out", str(tmp_path)])
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["unet"]["channels"] == 3 and state["unet"]["image_size"] == 16


def test_nan_loss_stops_training_without_writing_a_checkpoint(mnist_dir, tmp_path):
    with pytest.raises(SystemExit, match="loss became"):
        ddpm_mnist.main(TINY + ["--data-dir", mnist_dir, "--out", str(tmp_path), "--epochs", "1",
                                "--lr", "1e30", "--warmup-steps", "1"])
    assert not (tmp_path / "ckpt.pt").exists()


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--data-dir", "/nonexistent"], "could not be downloaded"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--ddim-steps", "21"], "--ddim-steps must be in 1..--T"),
    (["--eta", "-1"], "--eta must be >= 0"),
    (["--sample-only", "--ckpt", "/nonexistent/ckpt.pt"], "not found"),
])
def test_bad_input_is_one_line(extra, message, mnist_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        ddpm_mnist.main(TINY + ["--data-dir", mnist_dir, "--out", str(tmp_path), "--epochs", "1"] + extra)
    text = str(e.value)
    assert message in text and "\n" not in text and text.startswith("error:")


def test_mismatched_checkpoint_is_one_line(ddpm_ckpt, tmp_path):
    state = torch.load(ddpm_ckpt, weights_only=True)
    state["unet"]["base"] = 32  # the weights were trained with base 16
    common.save_checkpoint(str(tmp_path / "ckpt.pt"), **state)
    with pytest.raises(SystemExit, match="does not fit this network"):
        ddpm_mnist.load_trained(str(tmp_path / "ckpt.pt"), "cpu")


# ----------------------------------------------------------------------------- mathematics


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_schedules(name):
    beta = common.make_beta_schedule(name, 1000)
    alpha_bar = torch.cumprod(1 - beta, 0)
    assert beta.shape == (1000,) and (beta > 0).all() and (beta <= 0.999).all()
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()  # strictly decreasing
    assert alpha_bar[0] > 0.99 and alpha_bar[-1] < 1e-3


def test_closed_form_forward_matches_step_by_step():
    """q(x_t | x_0) in closed form has the mean and variance of t applications of q(x_t | x_{t-1})."""
    torch.manual_seed(0)
    ddpm = ddpm_mnist.DDPM(100, "cosine")
    x0 = torch.full((20000, 1, 1, 1), 1.5)
    x = x0.clone()
    for i in range(60):  # steps 0..59 (paper t = 1..60)
        x = ddpm.alpha[i].sqrt() * x + ddpm.beta[i].sqrt() * torch.randn_like(x)
    closed = ddpm.q_sample(x0, torch.full((20000,), 59), torch.randn_like(x0))
    assert x.mean().item() == pytest.approx(closed.mean().item(), abs=0.03)
    assert x.var().item() == pytest.approx(closed.var().item(), rel=0.05)
    assert closed.mean().item() == pytest.approx(1.5 * ddpm.alpha_bar[59].sqrt().item(), abs=0.03)


def gaussian_eps(ddpm, mu, s):
    """The exact (Bayes-optimal) noise predictor when x_0 ~ N(mu, s^2 I):
    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)."""
    def eps(x, t):
        ab = ddpm.alpha_bar[t][:, None, None, None]
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s ** 2 + 1 - ab)
    return eps


@pytest.mark.parametrize("sampler", ["ddpm-beta", "ddpm-posterior", "ddim-1000", "ddim-eta1"])
def test_exact_predictor_reproduces_the_gaussian(sampler):
    torch.manual_seed(0)
    ddpm = ddpm_mnist.DDPM(1000, "linear")
    mu, s, shape = 0.5, 0.3, (8000, 1, 1, 1)
    model = gaussian_eps(ddpm, mu, s)
    if sampler.startswith("ddpm"):
        x = ddpm.ddpm_sample(model, shape, sigma=sampler.split("-")[1])
    else:
        x = ddpm.ddim_sample(model, shape, steps=1000, eta=1.0 if sampler == "ddim-eta1" else 0.0)
    assert x.mean().item() == pytest.approx(mu, abs=0.02)
    assert x.std().item() == pytest.approx(s, rel=0.05)


def test_ddim_is_deterministic_and_lands_on_clean_data():
    ddpm = ddpm_mnist.DDPM(1000, "linear")
    model = gaussian_eps(ddpm, 0.5, 0.3)
    x_T = torch.randn(16, 1, 2, 2)
    a = ddpm.ddim_sample(model, x_T.shape, 20, eta=0.0, x_T=x_T)
    b = ddpm.ddim_sample(model, x_T.shape, 20, eta=0.0, x_T=x_T.clone())
    assert torch.equal(a, b)
    assert ddpm.ddim_timesteps(1) == [999] and ddpm.ddim_timesteps(1000) == list(range(999, -1, -1))
    taus = ddpm.ddim_timesteps(50)
    assert taus[0] == 999 and taus[-1] == 0 and len(set(taus)) == 50
    # one DDIM step from pure noise to alpha_bar_prev = 1 returns the predicted mean exactly
    one = ddpm.ddim_sample(model, (4000, 1, 1, 1), 1)
    assert one.mean().item() == pytest.approx(0.5, abs=0.01) and one.std().item() < 0.01
    with pytest.raises(SystemExit, match="DDIM steps must be in 1..1000"):
        ddpm.ddim_sample(model, x_T.shape, 0)


def test_same_seed_same_samples(ddpm_ckpt):
    model, ddpm, _ = ddpm_mnist.load_trained(ddpm_ckpt, "cpu")
    run = lambda seed: ddpm.ddpm_sample(model, (2, 1, 28, 28), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


def test_assignment_interface():
    torch.manual_seed(0)
    model = ddpm_mnist.DiffusionModel(image_size=28, channels=1)
    x, t = torch.randn(4, 1, 28, 28), torch.randint(0, 1000, (4,))
    assert model(x, t).shape == x.shape
    process = ddpm_mnist.DiffusionProcess(image_size=28, channels=1, noise_steps=1000,
                                          model=ddpm_mnist.UNet(28, 1, **ddpm_mnist.PRESETS["tiny"]))
    noisy, noise = process.add_noise(x, t)
    assert noisy.shape == noise.shape == x.shape
    ab = process.ddpm.alpha_bar[t][:, None, None, None]
    assert torch.allclose(noisy, ab.sqrt() * x + (1 - ab).sqrt() * noise, atol=1e-6)
    losses = [process.train_step(x.clamp(-1, 1)) for _ in range(3)]
    assert all(isinstance(v, float) and v == v for v in losses)


# ----------------------------------------------------------------------------- plumbing


def test_ema_averages_parameters_only():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = common.make_ema(net, decay=0.5, warmup=False)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net[1].running_mean.fill_(7.0)
    ema.update_parameters(net)  # first update copies, as in swa_utils
    with torch.no_grad():
        for p in net.parameters():
            p.add_(2.0)
    net[1].running_mean.fill_(3.0)
    ema.update_parameters(net)
    for p_ema, p in zip(ema.module.parameters(), net.parameters()):
        assert torch.allclose(p_ema, p - 1.0)  # 0.5 * (p - 2) + 0.5 * p
    assert (ema.module[1].running_mean == 3).all()  # buffers are copied from the model, never averaged


def test_atomic_checkpoint(tmp_path):
    path = str(tmp_path / "sub" / "c.pt")
    common.save_checkpoint(path, step=3, config={"a": 1})
    assert os.listdir(tmp_path / "sub") == ["c.pt"]  # no temporary file left behind
    assert common.load_checkpoint(path)["step"] == 3


def test_parse_config_flags():
    cfg = common.parse_config(ddpm_mnist.Config, ["--batch-size", "7", "--no-amp", "--schedule", "cosine"])
    assert (cfg.batch_size, cfg.amp, cfg.schedule) == (7, False, "cosine")
    with pytest.raises(SystemExit):
        common.parse_config(ddpm_mnist.Config, ["--schedule", "quadratic"])
