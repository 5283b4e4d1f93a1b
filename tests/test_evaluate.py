"""Tests of evaluate.py on tiny data: the Frechet distance behaves like a distance, the classifier
is trained once and then reused (a damaged cache is rebuilt, another --classifier-epochs trains
another), the command line works, warns about [0, 1] images and fails in one line on bad samples,
and `ddpm_figures.py --eval N` writes its table."""
import os
import shutil

import pytest
import torch

import checkpoints
import common
from tools import evaluate


@pytest.fixture(scope="module")
def ev(mnist_dir, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("fd_cache"))
    return evaluate.Evaluator("mnist", mnist_dir, download=False, cache_dir=cache, classifier_epochs=3)


@pytest.fixture(scope="module")
def real_train(mnist_dir):
    return common.load_images("mnist", mnist_dir, train=True, download=False)  # disjoint from the test split


def test_distance_of_a_set_to_itself_is_zero(ev):
    scale = ev.fd(torch.zeros_like(ev.x_test).uniform_(-1, 1))   # noise: a clearly bad set
    assert abs(ev.fd(ev.x_test)) < 1e-6 * scale
    assert ev.name == "FD-LeNet" and ev.shape == (1, 28, 28)


def test_shifted_and_blurred_sets_score_worse_than_real(ev, real_train):
    x, _ = real_train
    real = ev.fd(x)
    assert ev.fd(evaluate.blur(x, 1.5)) > real
    assert ev.fd(torch.roll(x, shifts=(5, 5), dims=(2, 3))) > real
    cal = ev.calibration()
    assert set(cal) == {"real halves", "train vs test", "blurred (sigma 1 px)"}
    assert cal["real halves"] < cal["blurred (sigma 1 px)"]


def test_distance_is_symmetric(ev, real_train):
    x, _ = real_train
    a, b = x[:40], evaluate.blur(x[20:])
    ab, ba = ev.fd_between(a, b), ev.fd_between(b, a)
    assert ab > 0 and abs(ab - ba) < 1e-4 * ab


def test_accuracy_and_histogram(ev, real_train):
    x, y = real_train
    hist = ev.histogram(x)
    assert len(hist) == 10 and sum(hist) == len(x)
    assert 0.0 <= ev.accuracy(x, y) <= 1.0
    with pytest.raises(SystemExit, match="one label per image"):
        ev.accuracy(x, y[:3])


def test_cached_classifier_is_reused(ev, mnist_dir, monkeypatch):
    mtime = os.path.getmtime(ev.path)
    monkeypatch.setattr(evaluate, "train_classifier", lambda *a, **k: pytest.fail("retrained"))
    again = evaluate.Evaluator("mnist", mnist_dir, download=False, cache_dir=os.path.dirname(ev.path), classifier_epochs=3)
    assert os.path.getmtime(ev.path) == mtime and again.path == ev.path
    assert again.fd(ev.x_test[:16]) == pytest.approx(ev.fd(ev.x_test[:16]), rel=1e-6)
    assert torch.load(ev.path, weights_only=True)["kind"] == "evaluate.py classifier"


def test_other_epochs_train_another_classifier_and_a_bad_cache_is_rebuilt(ev, mnist_dir, tmp_path, capsys):
    cache = str(tmp_path)
    one = evaluate.Evaluator("mnist", mnist_dir, download=False, cache_dir=cache, classifier_epochs=1)
    assert one.path != ev.path and one.path.endswith("_e1.pt")
    for bad in "garbage", "foreign":
        if bad == "garbage":
            open(one.path, "wb").write(b"not a checkpoint")
        else:
            checkpoints.save(one.path, kind="latent_diffusion.py VAE", net={}, model={}, scale=1.0)
        capsys.readouterr()
        again = evaluate.Evaluator("mnist", mnist_dir, download=False, cache_dir=cache, classifier_epochs=1)
        assert "training a new one" in capsys.readouterr().out
        assert torch.load(again.path, weights_only=True)["kind"] == "evaluate.py classifier"


def test_cache_key_is_a_safe_name_that_follows_the_data():
    x = torch.zeros(2, 3, 4, 4)
    key = evaluate.cache_key("/my data/cats & dogs/", x)
    assert key.startswith("cats___dogs_") and len(key) == len("cats___dogs_") + 8
    assert evaluate.cache_key("MNIST", x).startswith("mnist_")
    assert evaluate.cache_key("mnist", x) != evaluate.cache_key("mnist", x + 1)   # another copy of the data


def test_augment_keeps_shape_and_resnet_runs():
    x, y = torch.rand(8, 3, 32, 32) * 2 - 1, torch.arange(8) % 3     # RGB: the CIFAR-10 path
    g = torch.Generator().manual_seed(0)
    assert evaluate.augment(x, 4, True, g).shape == x.shape
    assert torch.equal(evaluate.augment(x, 0, False, g), x)
    net = evaluate.ResNet(num_classes=3, width=8)
    evaluate.train_classifier(net, x, y, epochs=1, device=torch.device("cpu"))
    assert net.features(x[:2]).shape == (2, net.num_features)


def test_cli_scores_a_samples_file(ev, mnist_dir, tmp_path, capsys):
    path = str(tmp_path / "samples.pt")
    torch.save({"x": ev.x_test[:20], "y": ev.y_test[:20]}, path)
    flags = ["--dataset", "mnist", "--data-dir", mnist_dir, "--no-download",
             "--cache-dir", os.path.dirname(ev.path), "--device", "cpu"]
    evaluate.main([path, *flags])
    out = capsys.readouterr().out
    assert "FD-LeNet" in out and "accuracy" in out and "real halves" in out

    torch.save(torch.zeros(4, 28, 28), path)                      # no channel axis
    with pytest.raises(SystemExit, match=r"\(N, C, H, W\)"):
        evaluate.main([path, *flags])
    torch.save(torch.zeros(4, 3, 28, 28), path)                   # RGB against MNIST
    with pytest.raises(SystemExit, match="to match mnist"):
        evaluate.main([path, *flags])
    for argv, msg in [([str(tmp_path / "missing.pt"), *flags], "not found"), (flags, "give the samples file")]:
        with pytest.raises(SystemExit, match=msg) as e:
            evaluate.main(argv)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("samples, message", [
    (torch.zeros(0, 1, 28, 28), "empty tensor"),
    (torch.zeros(0), "empty tensor"),
    ({"x": torch.full((4, 1, 28, 28), float("nan"))}, "the samples contain NaN (4 of 4 images): the sampler diverged"),
    (torch.full((4, 1, 28, 28), 3.0), "must lie in [-1, 1]"),
    ({"x": torch.zeros(4, 1, 28, 28), "y": torch.tensor([0.0, 1.0, 2.0, 3.0])}, "must be integer class ids"),
    ({"x": torch.zeros(4, 1, 28, 28), "y": torch.tensor([0, 1, 2, 12])}, "class ids 0..9 of mnist, got values in 0..12"),
    ({"x": torch.zeros(4, 1, 28, 28), "y": torch.tensor([-1, 1, 2, 3])}, "class ids 0..9"),
])
def test_bad_samples_are_one_line(ev, mnist_dir, tmp_path, samples, message):
    path = str(tmp_path / "samples.pt")
    torch.save(samples, path)
    with pytest.raises(SystemExit) as e:
        evaluate.main([path, "--dataset", "mnist", "--data-dir", mnist_dir, "--no-download", "--classifier-epochs", "3",
                       "--cache-dir", os.path.dirname(ev.path), "--device", "cpu", "--no-calibrate"])
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value) and message in str(e.value), str(e.value)


def test_images_in_0_1_get_a_warning_not_an_error(ev, capsys):
    x = (ev.x_test[:8] + 1) / 2                                       # [0, 1]: the usual mistake
    ev._warned = False
    ev.fd(x)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("warning: ") and "[-1, 1]" in out
    ev.fd(ev.x_test[:8])                                                # in [-1, 1]: no warning
    assert "warning" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="labels must be integer class ids"):
        ev.accuracy(ev.x_test[:4], [0.5, 1.0, 2.0, 3.0])
    with pytest.raises(SystemExit, match="NaN or inf .1 of 2 images.: the sampler diverged"):
        ev.fd(torch.stack([ev.x_test[0], torch.full_like(ev.x_test[0], float("inf"))]))


def test_within_class_diversity():
    x = torch.tensor([[0.0], [3.0], [10.0], [10.0], [7.0]])[:, :, None, None]  # (5, 1, 1, 1)
    y = torch.tensor([0, 0, 1, 1, 2])                                    # class 2 has one image: skipped
    assert evaluate.within_class_diversity(x, y) == pytest.approx((3.0 + 0.0) / 2)
    with pytest.raises(SystemExit, match="at least two images"):
        evaluate.within_class_diversity(x[:1], y[:1])


def test_ddpm_eval_writes_table(ev, mnist_dir, tmp_path, monkeypatch):
    import ddpm_mnist

    monkeypatch.setitem(ddpm_mnist.PRESETS, "tiny", dict(base=8, mults=(1, 2, 2), num_res=1))  # attention at 7x7
    monkeypatch.chdir(tmp_path)                                   # its classifier cache: ./checkpoints
    os.makedirs("checkpoints")
    shutil.copy(ev.path, os.path.join("checkpoints", os.path.basename(ev.path).replace("_e3", "")))  # as the default
    out = str(tmp_path / "run")
    from tools import ddpm_figures                                           # --eval: a measurement of ddpm_figures.py
    ddpm_figures.main(["--data-dir", mnist_dir, "--no-download", "--out", out, "--preset", "tiny",
                       "--T", "10", "--schedule", "cosine", "--epochs", "1", "--batch-size", "16",
                       "--n-samples", "2", "--ddim-steps", "10", "--device", "cpu", "--eval", "4"])
    table = open(os.path.join(out, "eval.md")).read()                # T = 10: the sweep is DDIM 10 only
    assert "| DDPM | 10 |" in table and "| DDIM | 10 |" in table and "FD-LeNet" in table
    assert "real halves" in table and len(table.splitlines()) == 6    # header, rule, 2 rows, blank, note


def test_the_classifier_is_the_same_whatever_ran_before_and_leaves_the_callers_rng(mnist_dir, tmp_path):
    """The metric's classifier is seeded on its own: two processes that reach it from different random
    states train the same one (so FD values compare across scripts and machines' first runs), and the
    caller's random stream is untouched (a GAN that builds its evaluator before training trains the
    same whether the cache existed or not)."""
    weights = []
    for i in range(2):
        torch.manual_seed(i)                    # the caller's state differs between the two runs
        before = torch.get_rng_state()
        ev = evaluate.Evaluator("mnist", mnist_dir, download=False, cache_dir=str(tmp_path / str(i)),
                                classifier_epochs=1)
        assert torch.equal(torch.get_rng_state(), before), "training the classifier moved the caller's RNG"
        weights.append(ev.classifier.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_reference_table(ev, mnist_dir, capsys):
    refs = ev.references()
    assert len(refs) == 6 and all(v >= 0 for v in refs.values())
    assert refs["uniform noise"] > refs["real training images"]
    assert refs["test images blurred, sigma 1 px"] > refs["test images blurred, sigma 0.5 px"]
    evaluate.main(["--references", "--dataset", "mnist", "--data-dir", mnist_dir, "--no-download",
                   "--cache-dir", os.path.dirname(ev.path), "--classifier-epochs", "3", "--device", "cpu"])
    assert "| uniform noise |" in capsys.readouterr().out


def test_rgb_data_on_a_cpu_get_the_small_cnn_in_its_own_cache(image_folder, tmp_path):
    """Without a GPU, RGB images are scored by the CNN that trains in minutes (FD-CNN), cached apart from
    the ResNet-9 of the same data; asking for the ResNet explicitly still gives the ResNet."""
    cnn = evaluate.Evaluator(image_folder, device="cpu", cache_dir=str(tmp_path), classifier_epochs=1)
    assert cnn.name == "FD-CNN" and cnn.classifier.config["arch"] == "cnn" and cnn.path.endswith("_cnn_e1.pt")
    x = cnn.x_test
    assert cnn.fd(x[: len(x) // 2]) >= 0 and 0 <= cnn.accuracy(x, cnn.y_test) <= 1
    resnet = evaluate.Evaluator(image_folder, device="cpu", cache_dir=str(tmp_path), classifier_epochs=1, arch="resnet")
    assert resnet.name == "FD-ResNet" and resnet.path != cnn.path and os.path.isfile(cnn.path)
