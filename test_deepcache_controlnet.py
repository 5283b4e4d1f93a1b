"""Tests for deepcache.py and controlnet_canny.py on the tiny fixtures of conftest.py (CPU, seconds)."""
import os

import pytest
import torch

import common
import controlnet_canny as cn
import ddpm_mnist
import deepcache as dc


@pytest.fixture(scope="module")
def base(ddpm_ckpt):
    unet, ddpm, _ = ddpm_mnist.load_trained(ddpm_ckpt, "cpu")
    for p in unet.out[-1].parameters():         # a 1-epoch UNet outputs ~0: make eps depend on x
        p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    return unet, ddpm


def noise(n=4, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg.startswith("error:") and "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- DeepCache


def test_interval_1_is_the_plain_sampler(base):
    unet, ddpm = base
    x_T = noise()
    plain = ddpm.ddim_sample(unet, x_T.shape, 6, x_T=x_T)
    for branch in (1, 2):                       # the tiny UNet has 2 skip connections
        assert torch.equal(dc.cached_sample(ddpm, dc.DeepCache(unet, branch), x_T, 6, 1), plain)
    cached = dc.cached_sample(ddpm, dc.DeepCache(unet, 1), x_T, 6, 3)
    assert not torch.equal(cached, plain) and cached.isfinite().all()


def test_cache_is_reset_between_runs(base):
    unet, ddpm = base
    cache = dc.DeepCache(unet, 1)
    dc.cached_sample(ddpm, cache, noise(seed=1), 6, 3)           # leaves features of other noise
    again = dc.cached_sample(ddpm, cache, noise(seed=2), 6, 3)
    fresh = dc.cached_sample(ddpm, dc.DeepCache(unet, 1), noise(seed=2), 6, 3)
    assert torch.equal(again, fresh)
    stale = ddpm.ddim_sample(cache, (4, 1, 28, 28), 6, x_T=noise(seed=2))  # no reset: stale cache
    assert not torch.equal(stale, fresh)


def test_full_step_schedules():
    for S, N in ((10, 1), (10, 3), (50, 5), (100, 20), (10, 20)):
        u, v = dc.full_steps(S, N), dc.full_steps(S, N, "nonuniform")
        assert len(u) == len(v) and u[0] == v[0] == 0 and v[-1] < S
        gaps = [b - a for a, b in zip(v, v[1:])]
        assert all(g >= 1 for g in gaps) and gaps == sorted(gaps)  # denser near the start
    assert dc.full_steps(10, 1) == list(range(10))


def test_flops_fraction_shrinks_with_a_shallower_branch(base):
    unet, _ = base
    f1, f2 = (dc.flops_fraction(dc.DeepCache(unet, b), (2, 1, 28, 28), "cpu") for b in (1, 2))
    assert 0 < f1 < f2 < 1


def test_deepcache_main(ddpm_ckpt, mnist_dir, tmp_path):
    out = str(tmp_path / "dc")
    dc.main(["--base-ckpt", ddpm_ckpt, "--data-dir", mnist_dir, "--no-download", "--out", out,
             "--device", "cpu", "--steps", "2", "--n-samples", "2", "--sweep-steps", "2", "4",
             "--sweep-intervals", "1", "3", "--batch-size", "2", "--warmup", "0", "--repeats", "1"])
    for f in ("samples.png", "samples_plain.png", "intervals.png", "speedup.png", "quality.png",
              "tradeoff.png", "speed_quality.md"):
        assert os.path.isfile(os.path.join(out, f)), f
    table = open(os.path.join(out, "speed_quality.md")).read().splitlines()
    assert len(table) == 2 + 2 * 2 and "| 2 | 1 | 2 |" in table[2] and "inf" in table[2]
    assert "| 4 | 3 | 2 |" in table[-1]                         # 4 steps, interval 3: 2 full steps


@pytest.mark.parametrize("args, words", [
    (["--interval", "0"], "--interval must be >= 1"),
    (["--branch", "3"], "--branch 3 is not in this UNet"),
    (["--sweep-steps", "51"], "sampling steps must be in 1..T (50)"),
])
def test_deepcache_bad_input(ddpm_ckpt, tmp_path, args, words):
    with pytest.raises(SystemExit) as e:
        dc.main(["--base-ckpt", ddpm_ckpt, "--out", str(tmp_path), "--device", "cpu", *args])
    assert words in one_line_error(e)


@pytest.mark.parametrize("main", [dc.main, cn.main])
def test_missing_base_checkpoint(main, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--base-ckpt", str(tmp_path / "nope.pt"), "--out", str(tmp_path), "--device", "cpu"])
    assert "not found" in one_line_error(e)


def test_deepcache_eval(ddpm_ckpt, mnist_dir, tmp_path, monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    real = evaluate.Evaluator
    monkeypatch.setattr(evaluate, "Evaluator", lambda *a, **k: real(*a, **k, cache_dir=str(tmp_path / "c"), classifier_epochs=1))
    out = str(tmp_path / "dc")
    dc.main(["--base-ckpt", ddpm_ckpt, "--data-dir", mnist_dir, "--no-download", "--out", out,
             "--device", "cpu", "--steps", "2", "--n-samples", "2", "--sweep-steps", "2",
             "--sweep-intervals", "1", "2", "--batch-size", "8", "--warmup", "0", "--repeats", "1", "--eval", "8"])
    assert "FD" in open(os.path.join(out, "speed_quality.md")).read()


# ----------------------------------------------------------------------------- ControlNet


def test_controlnet_starts_as_the_frozen_unet(base):
    unet, _ = base
    model = cn.ControlledUNet(unet, cn.ControlNet(unet))
    x, t = noise(), torch.tensor([0, 10, 30, 49])
    c = (torch.rand(4, 1, 28, 28) > 0.8).float()
    with torch.no_grad():
        assert torch.equal(model(x, t, c), unet(x, t))        # every zero_conv outputs exactly 0
    assert all(not p.requires_grad for p in model.unet.parameters())


def test_only_the_control_branch_trains(base, tmp_path):
    unet, ddpm = base
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    model = cn.ControlledUNet(unet, cn.ControlNet(unet))
    x = noise(16)
    c = cn.canny(x, 100, 200)
    cfg = cn.Config(epochs=2, batch_size=8, out=str(tmp_path))
    cn.train(cfg, model, ddpm, x, c, torch.device("cpu"))
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())
    assert model.control.zero_convs[0].weight.abs().sum() > 0   # the zero_convs did learn
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == 4 and all(map(lambda v: v == v and abs(v) < 1e3, state["losses"]))
    assert not any(k.startswith("unet.") for k in state["model"])  # only the control branch is saved


def test_edge_maps_are_computed_once(tmp_path, monkeypatch):
    x = noise(6) * 0 - 1
    x[:, :, 8:20, 10:18] = 1                                   # a bright square: 4 edges
    calls = []
    canny = cn.canny
    monkeypatch.setattr(cn, "canny", lambda *a: calls.append(1) or canny(*a))
    path = str(tmp_path / "edges.pt")
    e1 = cn.edge_maps(x, 100, 200, path)
    e2 = cn.edge_maps(x, 100, 200, path)
    assert len(calls) == 1 and torch.equal(e1, e2) and set(e1.unique().tolist()) == {0.0, 1.0}
    cn.edge_maps(x[:3], 100, 200, path)                        # other images: recomputed
    assert len(calls) == 2
    assert cn.edge_f1(x, e1, 100, 200, 0)["f1"] == 1.0


def test_controlnet_main(ddpm_ckpt, mnist_dir, tmp_path):
    out = str(tmp_path / "cn")
    args = ["--base-ckpt", ddpm_ckpt, "--data-dir", mnist_dir, "--no-download", "--out", out,
            "--device", "cpu", "--epochs", "1", "--batch-size", "32", "--ddim-steps", "3",
            "--n-digits", "2", "--samples-per-edge", "2", "--n-eval", "8"]
    cn.main(args)
    for f in ("control.png", "loss.png", "edge_fidelity.md", "ckpt.pt", "edges_train_100_200.pt", "edges_test_100_200.pt"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert "| ControlNet |" in open(os.path.join(out, "edge_fidelity.md")).read()
    cn.main(args + ["--sample-only"])


def test_controlnet_bad_thresholds(ddpm_ckpt, tmp_path):
    with pytest.raises(SystemExit) as e:
        cn.main(["--base-ckpt", ddpm_ckpt, "--low", "200", "--high", "100", "--out", str(tmp_path)])
    assert "--low < --high" in one_line_error(e)


def test_default_base_is_trained_when_missing(tmp_path):
    trained = []
    path = common.checkpoint_or_train("", str(tmp_path / "ckpt.pt"), lambda: trained.append(1))
    assert path == str(tmp_path / "ckpt.pt") and trained == [1]
