"""Smoke runs of the scripts on tiny data; ddpm_mnist.py's checkpoints, resume and bad input; the
mathematics of DDPM/DDIM and of ddpm_figures.py's exercise options; the graded interface (diffusion.py);
the plumbing of common.py.

Scripts run in-process through their `main(argv)` (no subprocess: one torch import for the suite),
on the tiny datasets of conftest.py, written in the real file formats.
"""
import importlib
import dataclasses
import os
import shutil
import textwrap

import pytest
import torch

import checkpoints
import common
from conftest import digest, one_line
from tools import ddpm_figures
import ddpm_mnist
import diffusion
import toy_2d

TINY = ["--preset", "tiny", "--T", "20", "--batch-size", "16", "--n-samples", "4", "--ddim-steps", "2",
        "--device", "cpu", "--no-download"]
FAST = TINY                       # ddpm_mnist.py: training, its DDIM grids and loss curve


# ----------------------------------------------------------------------------- smoke runs of every script

MNIST = ["--data-dir", "{mnist}", "--no-download", "--device", "cpu"]
SMOKE = {  # script: (argv at tiny sizes, files it must write into --out)
    "toy_2d": (["--steps", "60", "--n-train", "2000", "--n-test", "400", "--n-samples", "300", "--T", "20"],
               ["samples.png", "loss.png"]),
    "tools.toy_figures": (["--steps", "60", "--n-train", "2000", "--n-test", "400", "--n-samples", "300", "--T", "20"],
                    ["forward.png", "closed_form_vs_chain.png", "reverse.png", "samples.png", "loss.png", "reverse.gif"]),
    "ddpm_mnist": (MNIST + TINY[:-3] + ["--epochs", "1"], ["ckpt.pt", "loss.png", "samples_epoch001.png"]),
    "tools.ddpm_figures": (MNIST + TINY[:-3] + ["--epochs", "1", "--sweep-steps", "2", "5"],
                     ["ckpt.pt", "loss.png", "loss_per_timestep.png", "ddpm_4x4.png", "ddpm_8x8.png", "ddim2_4x4.png",
                      "ddim2_8x8.png", "interpolation.png", "ddim_sweep.png", "ddim_sweep_time.png",
                      "samples_epoch001.png", "stochastic_vs_deterministic.png", "ddim_sweep.md", "per_timestep.json"]),
    "latent_diffusion": (MNIST + ["--vae-epochs", "1", "--vae-base", "8", "--unet-base", "8", "--unet-res", "1", "--T", "20",
                                  "--epochs", "1", "--batch-size", "32", "--n-samples", "2", "--ddim-steps", "2"],
                         ["vae.pt", "ckpt.pt", "vae_reconstructions.png", "samples_epoch001.png"]),
    "tools.latent_figures": (MNIST + ["--vae-epochs", "1", "--vae-base", "8", "--unet-base", "8", "--unet-res", "1", "--T", "20",
                                "--epochs", "1", "--batch-size", "32", "--n-samples", "2", "--ddim-steps", "2"],
                       ["vae.pt", "ckpt.pt", "vae_reconstructions.png", "ddim_vs_ddpm.png", "samples_epoch001.png",
                        "loss.png"]),
    "rectified_flow": (MNIST + ["--preset", "tiny", "--epochs", "1", "--reflow-epochs", "1", "--n-pairs", "8",
                                "--pair-steps", "2", "--n-samples", "2", "--batch-size", "32"],
                       ["flow1.pt", "flow2.pt", "pairs.pt", "samples.png"]),
    "tools.flow_figures": (MNIST + ["--preset", "tiny", "--epochs", "1", "--reflow-epochs", "1", "--n-pairs", "8",
                              "--pair-steps", "2", "--steps", "1", "2", "--n-samples", "2", "--batch-size", "32"],
                     ["flow1.pt", "flow2.pt", "pairs.pt", "loss.png", "noise_vs_flow-1.png", "noise_vs_flow-2.png",
                      "steps_comparison.png", "steps_error.png", "steps_table.md"]),
    "cfg": (MNIST + ["--image-size", "8", "--preset", "tiny", "--T", "30", "--epochs", "1", "--batch-size", "32",
                     "--n-per-class", "2", "--ddim-steps", "3", "--scales", "0", "3", "--classes", "0", "1", "2"],
            ["ckpt.pt", "loss.png", "samples_epoch001_w3.png"]),   # its grids per w: cfg_sweep.py (test_guidance)
    "classifier_guidance": (MNIST + ["--base-ckpt", "{ddpm}", "--preset", "tiny", "--epochs", "1", "--batch-size", "32",
                                     "--n-per-class", "2", "--ddim-steps", "3", "--scale", "2", "--scales", "0", "2",
                                     "--samplers", "ddim", "--classes", "0", "1"],
                            ["ckpt.pt", "loss.png", "samples_epoch001_s2.png"]),   # the sweep: test_guidance
    "deepcache": (MNIST + ["--base-ckpt", "{ddpm}", "--steps", "2", "--n-samples", "2"],
                  ["samples.png", "samples_plain.png"]),
    "tools.deepcache_sweep": (MNIST + ["--base-ckpt", "{ddpm}", "--batch-size", "2", "--warmup", "0", "--repeats", "1",
                                 "--sweep-steps", "2", "--sweep-intervals", "1", "2"],
                        ["grid_steps2.png", "speedup.png", "quality.png", "tradeoff.png", "speed_quality.md"]),
    "controlnet_canny": (MNIST + ["--base-ckpt", "{ddpm}", "--epochs", "1", "--batch-size", "32", "--ddim-steps", "2",
                                  "--n-digits", "2", "--samples-per-edge", "2"],
                         ["ckpt.pt", "control.png", "loss.png"]),   # edge_fidelity.md: controlnet_fidelity.py (its tests)
    "dit_cifar": (["--dataset", "{folder}", "--model", "DiT-T/2", "--vae-base", "16", "--vae-epochs", "1", "--epochs", "1",
                   "--batch-size", "12", "--T", "50", "--ddim-steps", "2", "--no-download", "--device", "cpu"],
                  ["vae.pt", "ckpt.pt", "samples_epoch001_w3.png"]),   # its figures: dit_figures.py (test_dit)
}


@pytest.mark.parametrize("script", list(SMOKE))
def test_every_script_runs_end_to_end(script, mnist_dir, image_folder, ddpm_ckpt, tmp_path, request):
    """Each lesson trains for a few steps at tiny sizes and writes every figure it promises.
    (ddpm_mnist.py's run is the `one_epoch` fixture below, which its checkpoint tests share.)"""
    argv, files = SMOKE[script]
    if script == "ddpm_mnist":
        out = request.getfixturevalue("one_epoch")
    else:
        out = tmp_path
        result = importlib.import_module(script).main([a.format(mnist=mnist_dir, folder=image_folder, ddpm=ddpm_ckpt)
                                          for a in argv] + ["--out", str(out)])
    for name in files:
        assert (out / name).stat().st_size > 50, name
    if script in ("toy_2d", "tools.toy_figures"):
        assert result["ed_samples"] < result["ed_noise"]  # even 60 steps move the samples toward the data


def test_toy_2d_counts_t_from_zero():
    torch.manual_seed(0)
    d = toy_2d.Diffusion2D(10, 1e-4, 0.1)
    assert d.alpha_bar[0].item() == pytest.approx(1 - 1e-4)  # step 0 adds the first beta (--beta-1)
    x = torch.full((20000, 2), 1.5)
    for t in range(6):                                        # steps 0..5, one at a time ...
        x = d.q_step(x, t)
    assert x.mean().item() == pytest.approx(1.5 * d.alpha_bar[5].sqrt().item(), abs=0.02)  # ... = q(x_5 | x_0)
    assert x.var().item() == pytest.approx(1 - d.alpha_bar[5].item(), rel=0.05)
    seen = []
    xs = d.sample(lambda x, t: seen.append(t[0].item()) or torch.zeros_like(x), 2)
    assert seen == list(range(9, -1, -1)) and len(xs) == 11  # the network sees t = T-1..0, as in training


def test_ddpm_on_image_folder(image_folder, tmp_path):
    ddpm_mnist.main(FAST + ["--dataset", image_folder, "--image-size", "16", "--epochs", "1",
                            "--out", str(tmp_path)])
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["net"]["channels"] == 3 and state["net"]["image_size"] == 16


# ----------------------------------------------------------------------------- ddpm_mnist.py: checkpoints, resume


@pytest.fixture(scope="module")
def one_epoch(mnist_dir, tmp_path_factory):
    """A finished 1-epoch tiny run with every figure; tests copy it before touching it."""
    out = tmp_path_factory.mktemp("one_epoch")
    ddpm_mnist.main([a.format(mnist=mnist_dir) for a in SMOKE["ddpm_mnist"][0]] + ["--out", str(out)])
    return out


def copy_run(src, tmp_path):
    shutil.copytree(src, tmp_path / "run")
    return tmp_path / "run"


def test_ddpm_mnist_writes_its_figures_and_checkpoint(one_epoch):
    for name in SMOKE["ddpm_mnist"][1]:
        assert (one_epoch / name).stat().st_size > 100, name
    assert not (one_epoch / "per_timestep.json").exists()     # the measurements are ddpm_figures.py's
    state = torch.load(one_epoch / "ckpt.pt", weights_only=True)
    assert set(state) >= {"kind", "net", "config", "model", "ema", "opt", "step", "epoch", "losses", "rng"}
    assert state["kind"] == "ddpm_mnist.py UNet" and state["net"]["base"] == 16
    assert state["epoch"] == 1 and state["step"] == 4 == len(state["losses"])  # 64 images, batch 16
    assert all(map(torch.isfinite, torch.tensor(state["losses"])))


def test_resume_reproduces_an_uninterrupted_run(one_epoch, mnist_dir, tmp_path):
    straight, resumed = tmp_path / "straight", copy_run(one_epoch, tmp_path)
    ddpm_mnist.main(FAST + ["--data-dir", mnist_dir, "--out", str(straight), "--epochs", "2"])
    ddpm_mnist.main(FAST + ["--data-dir", mnist_dir, "--out", str(resumed), "--epochs", "2", "--resume"])
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (straight, resumed))
    assert a["step"] == b["step"] == 8 and a["losses"] == b["losses"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_sample_only_leaves_the_checkpoint_alone(one_epoch, mnist_dir, tmp_path):
    out = copy_run(one_epoch, tmp_path)
    before = digest(out / "ckpt.pt")
    ddpm_mnist.main(FAST + ["--data-dir", mnist_dir, "--out", str(out), "--sample-only"])
    assert (out / "samples.png").exists() and digest(out / "ckpt.pt") == before


def test_training_never_replaces_a_checkpoint_by_mistake(one_epoch, mnist_dir, tmp_path):
    out = copy_run(one_epoch, tmp_path)
    before = digest(out / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        ddpm_mnist.main(FAST + ["--data-dir", mnist_dir, "--out", str(out), "--epochs", "1"])
    assert "already holds a checkpoint" in one_line(e) and "--resume" in str(e.value)
    assert digest(out / "ckpt.pt") == before
    ddpm_mnist.main(FAST + ["--data-dir", mnist_dir, "--out", str(out), "--epochs", "1", "--overwrite", "--seed", "1"])
    assert digest(out / "ckpt.pt") != before  # only when asked to


@pytest.mark.parametrize("extra, message", [
    (["--T", "30"], "--T is 30 but"),
    (["--schedule", "cosine"], "--schedule is cosine but"),
    (["--preset", "mnist"], "--preset is mnist but"),
    (["--lr", "1e30", "--warmup-steps", "1"], "still holds the last good epoch"),  # NaN: nothing saved
])
def test_resume_refuses_what_would_change_the_run(extra, message, one_epoch, mnist_dir, tmp_path):
    out = copy_run(one_epoch, tmp_path)
    before = digest(out / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        ddpm_mnist.main(FAST + ["--data-dir", mnist_dir, "--out", str(out), "--epochs", "2", "--resume"] + extra)
    assert message in one_line(e)
    assert digest(out / "ckpt.pt") == before


def test_resume_takes_the_new_lr(one_epoch, mnist_dir, tmp_path):
    out = copy_run(one_epoch, tmp_path)
    ddpm_mnist.main(FAST + ["--data-dir", mnist_dir, "--out", str(out), "--epochs", "2", "--resume", "--lr", "1e-5"])
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["opt"]["param_groups"][0]["lr"] == pytest.approx(1e-5)  # warm-up is over: the new lr itself
    assert state["config"]["lr"] == 1e-5 and state["epoch"] == 2


def test_nan_loss_stops_training_without_writing_a_checkpoint(mnist_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        ddpm_mnist.main(FAST + ["--data-dir", mnist_dir, "--out", str(tmp_path), "--epochs", "1",
                                "--lr", "1e30", "--warmup-steps", "1"])
    assert "before any checkpoint was written" in one_line(e)
    assert not (tmp_path / "ckpt.pt").exists()


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--data-dir", "/nonexistent"], "could not be downloaded"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--sample-every", "0"], "--sample-every must be >= 1, got 0"),
    (["--lr=-1e-3"], "--lr must be > 0"),
    (["--ddim-steps", "21"], "--ddim-steps must be in 1..--T"),
    (["--eta", "-1"], "--eta must be >= 0"),
    (["--resume"], "no checkpoint"),
    (["--sample-only", "--ckpt", "/nonexistent/ckpt.pt"], "not found"),
])
def test_bad_input_is_one_line(extra, message, mnist_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        ddpm_mnist.main(FAST + ["--data-dir", mnist_dir, "--out", str(tmp_path), "--epochs", "1"] + extra)
    assert message in one_line(e)


def test_mismatched_checkpoint_is_one_line(ddpm_ckpt, tmp_path):
    state = torch.load(ddpm_ckpt, weights_only=True)
    state["net"]["base"] = 32  # the weights were trained with base 16
    checkpoints.save(str(tmp_path / "ckpt.pt"), **state)
    with pytest.raises(SystemExit) as e:
        ddpm_mnist.load_trained(str(tmp_path / "ckpt.pt"), "cpu")
    assert "do not fit the network" in one_line(e) and len(str(e.value)) < 400


def test_another_scripts_checkpoint_is_named(ddpm_ckpt, tmp_path):
    state = torch.load(ddpm_ckpt, weights_only=True)
    checkpoints.save(str(tmp_path / "vae.pt"), **(state | {"kind": "latent_diffusion.py VAE"}))
    checkpoints.save(str(tmp_path / "bare.pt"), model=state["model"], kind="ddpm_mnist.py UNet")
    with pytest.raises(SystemExit, match="holds a latent_diffusion.py VAE checkpoint, not a ddpm_mnist.py UNet one"):
        ddpm_mnist.load_trained(str(tmp_path / "vae.pt"), "cpu")
    with pytest.raises(SystemExit, match="lacks net, ema, config"):
        ddpm_mnist.load_trained(str(tmp_path / "bare.pt"), "cpu")
    with pytest.raises(SystemExit, match="--base-ckpt '.*' not found"):
        ddpm_mnist.ensure_trained(str(tmp_path / "missing.pt"), "cpu")
    assert ddpm_mnist.ensure_trained(ddpm_ckpt, "cpu") == ddpm_ckpt


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
    model, _, _ = ddpm_mnist.load_trained(ddpm_ckpt, "cpu")
    ddpm = ddpm_mnist.DDPM(5)  # a short chain: the generator, not T, is under test
    run = lambda seed: ddpm.ddpm_sample(model, (2, 1, 28, 28), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


def test_assignment_interface():
    torch.manual_seed(0)
    model = diffusion.DiffusionModel(image_size=28, channels=1)
    x, t = torch.randn(4, 1, 28, 28), torch.randint(0, 1000, (4,))
    assert model(x, t).shape == x.shape
    process = diffusion.DiffusionProcess(image_size=28, channels=1, noise_steps=1000, device="cpu",
                                         model=diffusion.DiffusionModel(28, 1, preset="tiny"))
    noisy, noise = process.add_noise(x, t)
    assert noisy.shape == noise.shape == x.shape and noisy.device == process.device
    ab = process.ddpm.alpha_bar[t][:, None, None, None]
    assert torch.allclose(noisy, ab.sqrt() * x + (1 - ab).sqrt() * noise, atol=1e-6)
    losses = [process.train_step(x.clamp(-1, 1)) for _ in range(3)]
    assert all(isinstance(v, float) and v == v for v in losses)
    assert process.model.training
    assert process.sample(2, steps=3).shape == (2, 1, 28, 28) and process.model.training  # mode restored
    process.model.eval()
    process.sample(2, steps=2)
    assert not process.model.training
    with pytest.raises(SystemExit, match="unknown --device"):
        diffusion.DiffusionProcess(device="tpu")


def test_the_docstring_example_trains(mnist_dir, tmp_path, monkeypatch):
    """diffusion.py's example, run as written, on the tiny MNIST of conftest.py with a tiny UNet."""
    code = textwrap.dedent(diffusion.__doc__.split("Example")[1].split(":\n", 1)[1])
    code = code.replace('"data"', repr(mnist_dir)).replace("range(10)", "range(2)")
    code = code.replace("sample(16, steps=50)", "sample(4, steps=2)")
    assert code.count(repr(mnist_dir)) == 1 and "range(2)" in code and "sample(4, steps=2)" in code
    monkeypatch.setitem(ddpm_mnist.PRESETS, "mnist", ddpm_mnist.PRESETS["tiny"])
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "diffusion.py docstring", "exec"), {})
    assert (tmp_path / "samples.png").stat().st_size > 100


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
    checkpoints.save(path, step=3, config={"a": 1})
    assert os.listdir(tmp_path / "sub") == ["c.pt"]  # no temporary file left behind
    assert checkpoints.load(path)["step"] == 3


def test_parse_config_flags():
    cfg = common.parse_config(ddpm_mnist.Config, ["--batch-size", "7", "--no-amp", "--schedule", "cosine"])
    assert (cfg.batch_size, cfg.amp, cfg.schedule) == (7, False, "cosine")
    with pytest.raises(SystemExit):
        common.parse_config(ddpm_mnist.Config, ["--schedule", "quadratic"])


def test_parse_config_positional_fields():
    @dataclasses.dataclass
    class Positional:
        runs: tuple[str, ...] = dataclasses.field(default=(), metadata={"positional": True})
        out: str = "x"
    assert common.parse_config(Positional, ["a", "b", "--out", "y"]) == Positional(("a", "b"), "y")
    with pytest.raises(SystemExit):                    # a tuple takes one or more values
        common.parse_config(Positional, [])


# ----------------------------------------------------------------------------- course exercises (issue 13)
# Runs of the new flags are in test_exercises.py; here the mathematics they rest on.


def as_prediction(ddpm, eps_fn, predict):
    """An eps-predictor rewritten as the x0- or v-predicting network that implies it (given x_t)."""
    def net(x, t):
        ab, eps = ddpm.alpha_bar[t][:, None, None, None], eps_fn(x, t)
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        return x0 if predict == "x0" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
    return net


@pytest.mark.parametrize("predict, sampler", [("x0", "ddpm"), ("v", "ddim")])
def test_x0_and_v_prediction_reproduce_the_gaussian(predict, sampler):
    """The exact Gaussian predictor expressed as x0 or v; eps_from turns it back for the unchanged samplers."""
    torch.manual_seed(0)
    ddpm = ddpm_figures.PredictDDPM(1000, "linear", predict=predict)
    mu, s, shape = 0.5, 0.3, (8000, 1, 1, 1)
    model = ddpm.eps_from(as_prediction(ddpm, gaussian_eps(ddpm, mu, s), predict))
    x = ddpm.ddpm_sample(model, shape) if sampler == "ddpm" else ddpm.ddim_sample(model, shape, steps=100)
    assert x.mean().item() == pytest.approx(mu, abs=0.02)
    assert x.std().item() == pytest.approx(s, rel=0.05)


def test_x0_and_v_losses_reweight_the_eps_loss():
    """Same estimator, other loss weight: x0-MSE = eps-MSE (1 - ab)/ab, v-MSE = eps-MSE / ab (T = 1: t = 0)."""
    x0 = torch.randn(64, 1, 4, 4)
    losses = {}
    for predict in ("eps", "x0", "v"):
        ddpm = ddpm_figures.PredictDDPM(1, "linear", predict=predict)
        eps_net = lambda x, t: 0.5 * x  # noqa: E731 (any predictor: the identity holds for each)
        net = eps_net if predict == "eps" else as_prediction(ddpm, eps_net, predict)
        torch.manual_seed(0)
        losses[predict] = ddpm.loss(net, x0).item()
    ab = ddpm.alpha_bar[0].item()
    assert losses["x0"] == pytest.approx(losses["eps"] * (1 - ab) / ab, rel=1e-4)
    assert losses["v"] == pytest.approx(losses["eps"] / ab, rel=1e-4)


def test_cosine_clip():
    default, clipped = ddpm_mnist.DDPM(1000, "cosine"), ddpm_mnist.DDPM(1000, "cosine", cosine_clip=0.95)
    assert default.beta.max().item() == pytest.approx(0.999) and clipped.beta.max().item() == pytest.approx(0.95)
    low = default.beta < 0.95
    assert torch.equal(default.beta[low], clipped.beta[low]) and (~low).sum() > 0  # only the last steps change
    assert clipped.alpha_bar[-1] > default.alpha_bar[-1]
    assert torch.equal(ddpm_mnist.DDPM(1000, "linear", cosine_clip=0.95).beta, ddpm_mnist.DDPM(1000).beta)


def test_concat_time_embedding_reaches_every_block():
    torch.manual_seed(0)
    net = ddpm_figures.make_unet("concat", image_size=8, channels=1, base=8, mults=(1, 2), num_res=1).eval()
    blocks = [b for b in net.modules() if isinstance(b, ddpm_mnist.ResBlock)]
    assert len(blocks) == 6 and net.config["time_embed"] == "concat"
    assert all(isinstance(b, ddpm_figures.ConcatResBlock) and b.conv1.in_channels == b.norm1.num_channels + 32
               for b in blocks)
    torch.nn.init.normal_(net.out[-1].weight)  # the zero-initialised output layer would hide t
    x = torch.randn(2, 1, 8, 8)
    assert not torch.allclose(net(x, torch.tensor([0, 0])), net(x, torch.tensor([500, 500])))
