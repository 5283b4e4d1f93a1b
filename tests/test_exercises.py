"""The course-exercise flags (ddpm_figures.py, issue 13) run end to end at tiny sizes: a 4-level UNet
on padded 32x32 digits, the concatenated time embedding with x0-prediction and a clipped cosine
schedule, the MLP on images (--arch mlp), --resume refusing a changed process or network, ddpm_mnist.py
refusing to load such a run, and compare_runs.py's figure.
(The mathematics behind them, e.g. x0/v-prediction reproducing the exact Gaussian, is in test_smoke.py.)"""
import json

import pytest
import torch

from tools import compare_runs
from conftest import digest, one_line
from tools import ddpm_figures
import ddpm_mnist

FAST = ["--preset", "tiny", "--T", "20", "--batch-size", "16", "--n-samples", "4", "--ddim-steps", "2",
        "--no-ddpm-grid", "--sweep-steps", "0", "--device", "cpu", "--no-download", "--epochs", "1"]
EXERCISE = ["--time-embed", "concat", "--predict", "x0", "--schedule", "cosine", "--cosine-clip", "0.95"]


@pytest.fixture(scope="module")
def exercise_run(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("exercise")
    ddpm_figures.main(FAST + EXERCISE + ["--data-dir", mnist_dir, "--out", str(out)])
    return out


def test_four_levels_on_padded_digits(mnist_dir, tmp_path):
    argv = FAST + ["--data-dir", mnist_dir, "--out", str(tmp_path), "--base", "8", "--mults", "1", "2", "2", "2"]
    with pytest.raises(SystemExit) as e:  # 28 is not divisible by 2^3: said before any training
        ddpm_figures.main(argv)
    assert "use fewer levels, or --pad-to 32" in one_line(e)
    ddpm_figures.main(argv + ["--pad-to", "32", "--overwrite"])
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["net"]["image_size"] == 32 and state["net"]["mults"] == (1, 2, 2, 2) and state["net"]["base"] == 8
    model, _, _ = ddpm_figures.load_trained(str(tmp_path / "ckpt.pt"), "cpu")  # rebuilt from "net"
    assert len(model.downs) == 4 and model(torch.randn(1, 1, 32, 32), torch.tensor([3])).shape == (1, 1, 32, 32)
    with pytest.raises(SystemExit) as e:  # the scripts that build on a base feed it 28x28 digits
        ddpm_mnist.load_trained(str(tmp_path / "ckpt.pt"), "cpu")
    assert "--pad-to 32" in one_line(e)
    (tmp_path / "per_timestep.json").unlink()
    ddpm_figures.main(argv + ["--sample-only"])  # --pad-to comes from the checkpoint
    assert json.loads((tmp_path / "per_timestep.json").read_text())["net"]["image_size"] == 32
    x = ddpm_figures.pad(ddpm_mnist.load_data(ddpm_mnist.Config(data_dir=mnist_dir, download=False), "cpu")[0], 32)
    assert x.shape[-1] == 32 and (x[..., :2, :] == -1).all() and (x[..., -2:, :] == -1).all()  # black border


def test_mlp_on_images_trains_and_reloads(mnist_dir, tmp_path):
    """--arch mlp: the toy's kind of network over flattened pixels, the UNet's question answered by a run."""
    argv = FAST + ["--data-dir", mnist_dir, "--out", str(tmp_path), "--arch", "mlp", "--mlp-hidden", "32"]
    ddpm_figures.main(argv)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["net"] == dict(arch="mlp", image_size=28, channels=1, hidden=32, t_dim=128)
    model, _, _ = ddpm_figures.load_trained(str(tmp_path / "ckpt.pt"), "cpu")
    assert isinstance(model, ddpm_figures.PixelMLP) and model(torch.randn(2, 1, 28, 28), torch.tensor([0, 9])).shape \
        == (2, 1, 28, 28)
    with pytest.raises(SystemExit) as e:  # the lessons that build on a base need its UNet
        ddpm_mnist.load_trained(str(tmp_path / "ckpt.pt"), "cpu")
    assert "--arch mlp" in one_line(e)
    ddpm_figures.main(argv + ["--sample-only"])  # --arch comes from the checkpoint


def test_the_test_loss_is_the_networks_not_the_clipped_samplers(mnist_dir, tmp_path):
    """An untrained UNet predicts eps = 0 (its last conv starts at zero): its test eps-MSE is E[eps^2] = 1.
    The samplers' predictor clips the x0_hat that eps implies, which would report far less."""
    argv = FAST + ["--data-dir", mnist_dir, "--out", str(tmp_path), "--lr", "1e-12"]   # the weights stay put
    results = ddpm_figures.main(argv)
    assert results["test_loss"] == pytest.approx(1.0, abs=0.05)


def test_concat_x0_cosine_clip_run(exercise_run):
    state = torch.load(exercise_run / "ckpt.pt", weights_only=True)
    assert state["net"]["time_embed"] == "concat" and state["config"]["predict"] == "x0"
    assert all(map(torch.isfinite, torch.tensor(state["losses"])))
    model, ddpm, _ = ddpm_figures.load_trained(str(exercise_run / "ckpt.pt"), "cpu")
    assert ddpm.predict == "x0" and ddpm.beta.max().item() == pytest.approx(0.95)
    assert all(isinstance(b, ddpm_figures.ConcatResBlock) for level in model.downs for b in level.blocks)
    record = json.loads((exercise_run / "per_timestep.json").read_text())
    assert len(record["alpha_bar"]) == 20 and len(record["t"]) == len(record["loss"]) == len(record["logsnr"])
    assert record["logsnr"] == sorted(record["logsnr"], reverse=True)  # t up: noisier
    with pytest.raises(SystemExit) as e:
        ddpm_mnist.load_trained(str(exercise_run / "ckpt.pt"), "cpu")
    assert "--predict x0" in one_line(e)


@pytest.mark.parametrize("change, message", [
    (["--predict", "eps"], "--predict is eps but"),
    (["--time-embed", "add"], "--time-embed is add but"),
    (["--cosine-clip", "0.99"], "--cosine-clip is 0.99 but"),
    (["--base", "32"], "--base is 32 but"),
])
def test_resume_refuses_a_changed_exercise_flag(change, message, exercise_run, mnist_dir, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(exercise_run, out)
    before = digest(out / "ckpt.pt")
    argv = FAST + EXERCISE + ["--data-dir", mnist_dir, "--out", str(out), "--epochs", "2", "--resume"]
    with pytest.raises(SystemExit) as e:
        ddpm_figures.main(argv + change)
    assert message in one_line(e) and digest(out / "ckpt.pt") == before


@pytest.mark.parametrize("extra, message", [
    (["--cosine-clip", "1.5"], "--cosine-clip must be in (0, 0.999]"),
    (["--cosine-clip", "0.9"], "--cosine-clip applies to --schedule cosine only"),
    (["--pad-to", "20"], "--pad-to 20 is smaller than the images (28x28)"),
    (["--predict", "score"], "invalid choice"),
])
def test_exercise_flags_bad_input_is_one_line(extra, message, mnist_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        ddpm_figures.main(FAST + ["--data-dir", mnist_dir, "--out", str(tmp_path)] + extra)
    assert message in one_line(e)
    assert not (tmp_path / "ckpt.pt").exists()


def test_compare_runs_writes_its_figure(exercise_run, ddpm_ckpt, tmp_path):
    base = str(tmp_path.parent / "missing")
    with pytest.raises(SystemExit) as e:
        compare_runs.main(["--runs", str(exercise_run), base, "--out", str(tmp_path)])
    assert "per_timestep.json' not found" in one_line(e)
    import os
    runs = compare_runs.main(["--runs", str(exercise_run), os.path.dirname(ddpm_ckpt), "--labels", "x0", "eps",
                              "--out", str(tmp_path)])
    assert set(runs) == {"x0", "eps"}
    assert (tmp_path / "compare.png").stat().st_size > 1000 and "x0" in (tmp_path / "compare.md").read_text()
