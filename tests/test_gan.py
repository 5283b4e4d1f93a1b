"""gan_mnist.py: the players' shapes and losses, one step of the game, an exact resume, --sample-only,
the FD-against-time record (drawn and scored at the end by gan_figures.py), and one-line errors; on
conftest's tiny MNIST files."""
import json
import os

import pytest
import torch

from tools import evaluate
from tools import gan_figures
import gan_mnist
from conftest import one_line

TINY = ["--epochs", "2", "--batch-size", "16", "--width", "8", "--z-dim", "8", "--n-samples", "4", "--sample-every", "1",
        "--device", "cpu", "--no-download"]


def run(mnist_dir, out, *extra, script=gan_mnist):
    return script.main(["--data-dir", mnist_dir, "--out", str(out), *TINY, *extra])


def test_players_shapes_and_spectral_norm():
    torch.manual_seed(0)
    G, D = gan_mnist.Generator(z_dim=8, width=8), gan_mnist.Discriminator(width=8)
    x = gan_mnist.sample(G, 5)
    assert x.shape == (5, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert D(x).shape == (5,)
    normalised = [m for m in D.modules() if hasattr(m, "parametrizations")]
    assert len(normalised) == 4                              # every conv and the linear layer


def test_one_step_of_the_game_moves_both_players():
    torch.manual_seed(0)
    G, D = gan_mnist.Generator(z_dim=8, width=8), gan_mnist.Discriminator(width=8)
    x_real, z = torch.rand(16, 1, 28, 28) * 2 - 1, torch.randn(16, 8)
    before = [p.detach().clone() for p in (*G.parameters(), *D.parameters())]
    for loss_fn, params in ((lambda: gan_mnist.d_loss(D, x_real, G(z).detach()), D.parameters()),
                            (lambda: gan_mnist.g_loss(D, G(z)), G.parameters())):    # D's step, then G's
        opt, loss = torch.optim.Adam(params, lr=1e-3), loss_fn()
        assert torch.isfinite(loss) and loss > 0
        loss.backward()
        opt.step()
    after = [p.detach() for p in (*G.parameters(), *D.parameters())]
    assert all(not torch.equal(a, b) for a, b in zip(before, after) if a.numel() > 1 and a.abs().sum() > 0)


def test_resume_is_the_uninterrupted_run_and_sample_only_loads_it(mnist_dir, tmp_path):
    straight = run(mnist_dir, tmp_path / "straight")
    run(mnist_dir, tmp_path / "cut", "--epochs", "1")
    torch.manual_seed(123)                                   # whatever the process did in between
    run(mnist_dir, tmp_path / "cut", "--resume")
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("straight", "cut"))
    assert a["step"] == b["step"] == 8 and a["losses"] == b["losses"]
    for key in ("model", "ema", "disc"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for name in ("samples.png", "loss.png", "samples_epoch002.png"):
        assert (tmp_path / "cut" / name).stat().st_size > 50
    assert run(mnist_dir, tmp_path / "straight", "--sample-only")["train_seconds"] == straight["train_seconds"]


def test_fd_against_training_time(mnist_dir, tmp_path, monkeypatch):
    real = evaluate.Evaluator
    monkeypatch.setattr(evaluate, "Evaluator", lambda *a, **k: real(*a, **k, cache_dir=str(tmp_path / "c"),
                                                                    classifier_epochs=1))
    trained = run(mnist_dir, tmp_path, "--eval", "8", "--eval-every", "1")       # the loop scores every epoch
    assert not (tmp_path / "fd_vs_time.json").exists()                            # its figures: gan_figures.py
    res = run(mnist_dir, tmp_path, "--sample-only", "--eval", "8", script=gan_figures)
    curve = json.load(open(tmp_path / "fd_vs_time.json"))
    assert [epoch for _, epoch, _, _ in curve] == [1, 2] and curve[0][0] < curve[1][0]
    assert [list(r) for r in trained["fd_history"]] == curve and res["fd_history"] == trained["fd_history"]
    assert res["fd"] == pytest.approx(curve[-1][2]) and res["sample_seconds_1000"] > 0
    for name in ("fd_vs_time.png", "eval.md", "samples.png", "loss.png"):
        assert os.path.getsize(tmp_path / name) > 50, name


def test_the_companion_trains_as_the_lesson_does(mnist_dir, tmp_path):
    """gan_figures.py with gan_mnist.py's flags: the same checkpoint (the gallery's GAN runs go through it)."""
    run(mnist_dir, tmp_path / "lesson", "--epochs", "1")
    run(mnist_dir, tmp_path / "companion", "--epochs", "1", script=gan_figures)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("lesson", "companion"))
    assert a.keys() == b.keys() and a["losses"] == b["losses"]
    assert {k: v for k, v in a["config"].items() if k != "out"} == {k: v for k, v in b["config"].items() if k != "out"}
    for key in ("model", "ema", "disc"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


@pytest.mark.parametrize("extra, message", [
    (["--eval-every", "2"], "--eval-every needs --eval N"),
    (["--eval", "8"], "python -m tools.gan_figures --eval N"),
    (["--sample-only"], "not found"),
    (["--resume"], "no checkpoint"),
    (["--lr", "0"], "--lr must be > 0"),
])
def test_bad_input_is_one_line(extra, message, mnist_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        run(mnist_dir, tmp_path, *extra)
    assert message in one_line(e)
