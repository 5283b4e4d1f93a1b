"""Tests for deepcache.py, deepcache_sweep.py, controlnet_canny.py and controlnet_fidelity.py on the
tiny fixtures of conftest.py (CPU, seconds)."""
import os

import pytest
import torch

import controlnet_canny as cn
from tools import controlnet_fidelity as cf
import ddpm_mnist
import deepcache as dc
from tools import deepcache_sweep as ds
import rectified_flow as rf


@pytest.fixture(scope="module")
def base():
    """A tiny random UNet and a T = 50 process: the properties below hold for any weights, so no
    training is needed (the output layer, zero at init, is made random so eps depends on x)."""
    torch.manual_seed(0)
    unet = ddpm_mnist.UNet(28, 1, **ddpm_mnist.PRESETS["tiny"]).eval()
    for p in unet.out[-1].parameters():
        p.data.normal_(0, 0.05)
    return unet, ddpm_mnist.DDPM(50, "linear")


@pytest.fixture(scope="module")
def flow():
    """A tiny random rectified_flow.py VelocityUNet (t in [0, 1]; it embeds 1000 t)."""
    torch.manual_seed(1)
    net = rf.VelocityUNet(28, 1, **ddpm_mnist.PRESETS["tiny"]).eval()
    for p in net.out[-1].parameters():
        p.data.normal_(0, 0.05)
    return net


def ddim(ddpm):
    """The ddim base's sampler, sample(model, x_T, steps)."""
    return lambda model, x_T, steps: ddpm.ddim_sample(model, x_T.shape, steps, x_T=x_T)


def noise(n=4, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg.startswith("error:") and "\n" not in msg, msg
    return msg


def digest(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ----------------------------------------------------------------------------- DeepCache


def test_interval_1_is_the_plain_sampler(base):
    unet, ddpm = base
    x_T = noise()
    plain = ddpm.ddim_sample(unet, x_T.shape, 6, x_T=x_T)
    for branch in (1, 2):                       # the tiny UNet has 2 skip connections
        assert torch.equal(dc.cached_sample(ddim(ddpm), dc.DeepCache(unet, branch), x_T, 6, 1), plain)
    cached = dc.cached_sample(ddim(ddpm), dc.DeepCache(unet, 1), x_T, 6, 3)
    assert not torch.equal(cached, plain) and cached.isfinite().all()


def test_interval_1_is_the_plain_euler_sampler(flow):
    x0 = noise()
    plain = rf.euler_sample(flow, x0, 5)
    for branch in (1, 2):
        assert torch.equal(dc.cached_sample(rf.euler_sample, dc.DeepCache(flow, branch), x0, 5, 1), plain)
    cached = dc.cached_sample(rf.euler_sample, dc.DeepCache(flow, 1), x0, 5, 3)
    assert not torch.equal(cached, plain) and cached.isfinite().all()


def test_rf_full_step_embeds_1000_t(flow):
    """A full step of the wrapper is VelocityUNet.forward at the same t in [0, 1] (which embeds 1000 t)."""
    x, t = noise(), torch.tensor([0.0, 0.3, 0.7, 0.99])
    cache = dc.DeepCache(flow, 2)
    cache.reset([0])
    with torch.no_grad():
        assert torch.equal(cache(x, t), flow(x, t))
        assert not torch.equal(ddpm_mnist.UNet.forward(flow, x, t), flow(x, t))   # so the scale matters


@pytest.mark.parametrize("net", ["unet", "flow"])
def test_a_cached_step_at_the_same_input_is_the_full_step(base, flow, net):
    """Partial inference reruns only the skip branch D_1..D_m and U_m..U_1; at the x and t of the full
    step it sees the features it cached, so it must give the full UNet's output exactly, for every
    branch m (with 2 blocks a level, the odd m cut a level in the middle)."""
    torch.manual_seed(2)
    cls = ddpm_mnist.UNet if net == "unet" else rf.VelocityUNet
    model = cls(28, 1, base=16, mults=(1, 2, 2), num_res=2, dropout=0.0).eval()
    for p in model.out[-1].parameters():
        p.data.normal_(0, 0.05)
    x, t = noise(3), (torch.tensor([3, 20, 45]) if net == "unet" else torch.tensor([0.1, 0.5, 0.9]))
    with torch.no_grad():
        full = model(x, t)
        for m in range(1, 7):
            cache = dc.DeepCache(model, m)
            cache.reset([0])
            assert torch.equal(cache(x, t), full) and torch.equal(cache(x, t), full), m
            assert not torch.equal(cache(x + 0.1, t), model(x + 0.1, t)), m   # elsewhere it is an approximation


def test_cache_is_reset_between_runs(base):
    unet, ddpm = base
    cache = dc.DeepCache(unet, 1)
    dc.cached_sample(ddim(ddpm), cache, noise(seed=1), 6, 3)           # leaves features of other noise
    again = dc.cached_sample(ddim(ddpm), cache, noise(seed=2), 6, 3)
    fresh = dc.cached_sample(ddim(ddpm), dc.DeepCache(unet, 1), noise(seed=2), 6, 3)
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


DC_FAST = ["--device", "cpu", "--steps", "2", "--n-samples", "2"]
SWEEP_FAST = ["--device", "cpu", "--batch-size", "2", "--warmup", "0", "--repeats", "1"]


def test_deepcache_main(ddpm_ckpt, mnist_dir, tmp_path, capsys):
    out = str(tmp_path / "dc")
    res = dc.main(["--base-ckpt", ddpm_ckpt, "--data-dir", mnist_dir, "--no-download", "--out", out, *DC_FAST])
    assert os.path.isfile(os.path.join(out, "samples.png")) and os.path.isfile(os.path.join(out, "samples_plain.png"))
    assert "PSNR" in capsys.readouterr().out and res["ssim"] <= 1


def test_deepcache_sweep_main(ddpm_ckpt, mnist_dir, tmp_path):
    out = str(tmp_path / "dc")
    ds.main(["--base-ckpt", ddpm_ckpt, "--data-dir", mnist_dir, "--no-download", "--out", out, *SWEEP_FAST,
             "--sweep-steps", "2", "4", "--sweep-intervals", "1", "3"])
    for f in ("grid_steps2.png", "grid_steps4.png", "speedup.png", "quality.png", "tradeoff.png", "speed_quality.md"):
        assert os.path.isfile(os.path.join(out, f)), f
    table = open(os.path.join(out, "speed_quality.md")).read().splitlines()
    assert len(table) == 2 + 1 + 2 and "| 2 | 1 | 2 |" in table[2] and "inf" in table[2]   # 2 steps: no interval 3
    assert "| 4 | 3 | 2 |" in table[-1]                         # 4 steps, interval 3: 2 full steps


def test_default_base_is_ddpm_mnists(ddpm_ckpt, tmp_path, monkeypatch):
    """No --base-ckpt: ddpm_mnist.ensure_trained gets its default path (and trains it when missing)."""
    asked = []
    monkeypatch.setattr(ddpm_mnist, "ensure_trained", lambda path, device, **kw: asked.append((path, kw)) or ddpm_ckpt)
    dc.main(["--out", str(tmp_path), "--data-dir", "somewhere", *DC_FAST])
    assert asked == [(ddpm_mnist.DEFAULT_CKPT, dict(data_dir="somewhere", download=True))]


@pytest.fixture(scope="module")
def foreign_ckpt(tmp_path_factory) -> str:
    """A file of another script (a latent_diffusion.py VAE checkpoint, as far as its header goes)."""
    path = str(tmp_path_factory.mktemp("foreign") / "vae.pt")
    torch.save(dict(kind="latent_diffusion.py VAE", net={"base": 32}, config={}, model={}, ema={}), path)
    return path


@pytest.mark.parametrize("main, args, words", [
    (dc.main, ["--interval", "0"], "--interval must be >= 1"),
    (dc.main, ["--branch", "4"], "--branch 4 is not in this UNet"),
    (dc.main, ["--steps", "51"], "--steps must be <= T = 50"),
    (ds.main, ["--sweep-intervals", "1", "0"], "--sweep-intervals must be >= 1"),
    (ds.main, ["--eval", "1"], "--eval must be 0 (off) or >= 2"),
    (ds.main, ["--branch", "4"], "--branch 4 is not in this UNet"),
    (ds.main, ["--sweep-steps", "51"], "--sweep-steps must be <= T = 50"),
])
def test_deepcache_bad_input(ddpm_ckpt, tmp_path, main, args, words):
    with pytest.raises(SystemExit) as e:
        main(["--base-ckpt", ddpm_ckpt, "--out", str(tmp_path), "--device", "cpu", *args])
    assert words in one_line_error(e)


def flow_ckpt(path, net, space="pixel") -> str:
    """A rectified_flow.py checkpoint of `net` (the entries deepcache.py reads)."""
    torch.save(dict(kind=rf.KIND, net=net.config, config=dict(space=space, dataset="mnist"), model=net.state_dict(),
                    ema=net.state_dict(), scale=1.0), path)
    return str(path)


def test_deepcache_rf_main(flow, tmp_path, capsys):
    """The rf base end to end; the sweep leaves out the intervals longer than the run."""
    out, ckpt = str(tmp_path / "dc"), flow_ckpt(tmp_path / "flow2.pt", flow)
    dc.main(["--base", "rf", "--base-ckpt", ckpt, "--out", out, *DC_FAST])
    ds.main(["--base", "rf", "--base-ckpt", ckpt, "--out", out, *SWEEP_FAST, "--sweep-steps", "1", "3",
             "--sweep-intervals", "1", "2", "5"])
    assert "3 steps: intervals 5 left out" in capsys.readouterr().out
    for f in ("samples.png", "samples_plain.png", "grid_steps1.png", "grid_steps3.png", "speedup.png",
              "quality.png", "tradeoff.png", "speed_quality.md"):
        assert os.path.isfile(os.path.join(out, f)), f
    table = open(os.path.join(out, "speed_quality.md")).read().splitlines()[2:]
    assert [row.split("|")[1:3] for row in table] == [[" 1 ", " 1 "], [" 3 ", " 1 "], [" 3 ", " 2 "]]


def test_rf_base_must_be_a_pixel_space_flow(flow, ddpm_ckpt, tmp_path, monkeypatch):
    for path, words in ((flow_ckpt(tmp_path / "latent.pt", flow, "latent"), "is a latent-space flow"),
                        (ddpm_ckpt, "holds a ddpm_mnist.py UNet checkpoint, not a rectified_flow.py flow one")):
        with pytest.raises(SystemExit) as e:
            dc.main(["--base", "rf", "--base-ckpt", path, "--out", str(tmp_path / "o"), "--device", "cpu"])
        assert words in one_line_error(e)
    monkeypatch.chdir(tmp_path)                                 # no runs/ here: the default flow is missing
    with pytest.raises(SystemExit) as e:
        dc.main(["--base", "rf", "--device", "cpu"])
    msg = one_line_error(e)
    assert dc.DEFAULT_BASE["rf"] in msg and "python rectified_flow.py" in msg
    assert not [f for f in os.listdir(tmp_path / "runs/deepcache/rf") if f.endswith(".png")]


@pytest.mark.parametrize("main", [dc.main, ds.main, cn.main])
def test_missing_base_checkpoint(main, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--base-ckpt", str(tmp_path / "nope.pt"), "--out", str(tmp_path), "--device", "cpu"])
    assert "not found" in one_line_error(e)


@pytest.mark.parametrize("main", [dc.main, ds.main, cn.main])
def test_another_scripts_checkpoint_as_base(main, foreign_ckpt, mnist_dir, tmp_path):
    """Issue 15: a latent_diffusion.py file as the base gave "images" of latents; now one line."""
    with pytest.raises(SystemExit) as e:
        main(["--base-ckpt", foreign_ckpt, "--data-dir", mnist_dir, "--no-download", "--out", str(tmp_path),
              "--device", "cpu"])
    assert "latent_diffusion.py VAE" in one_line_error(e)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".png")]


def test_deepcache_eval(ddpm_ckpt, mnist_dir, tmp_path, monkeypatch):
    evaluate = pytest.importorskip("tools.evaluate")
    real = evaluate.Evaluator
    monkeypatch.setattr(evaluate, "Evaluator",
                        lambda *a, **k: real(*a, **k, cache_dir=str(tmp_path / "c"), classifier_epochs=1))
    out = str(tmp_path / "dc")
    ds.main(["--base-ckpt", ddpm_ckpt, "--data-dir", mnist_dir, "--no-download", "--out", out, *SWEEP_FAST,
             "--sweep-steps", "2", "--sweep-intervals", "1", "2", "--batch-size", "8", "--eval", "8"])
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


def test_the_encoder_copy_is_the_frozen_encoder(base):
    """The trainable copy holds the frozen UNet's encoder half, under the UNet's own parameter names,
    and starts at its weights; the copy is a separate tensor (training it leaves the UNet alone)."""
    unet, _ = base
    copy = cn.EncoderCopy(unet).state_dict()
    encoder = {k: v for k, v in unet.state_dict().items() if k.split(".")[0] in ("time_mlp", "inc", "downs", "mid")}
    assert copy.keys() == encoder.keys() and all(torch.equal(copy[k], v) for k, v in encoder.items())
    assert all(copy[k].data_ptr() != v.data_ptr() for k, v in encoder.items())


def test_only_the_control_branch_trains(base, tmp_path):
    unet, ddpm = base
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x = noise(4)
    c = cn.canny(x, 100, 200)
    cfg = cn.Config(epochs=2, batch_size=2, out=str(tmp_path))
    control, losses = cn.train(cfg, unet, ddpm, x, c, torch.device("cpu"))
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["kind"] == cn.KIND and state["net"] == unet.config
    assert state["model"]["zero_convs.0.weight"].abs().sum() > 0   # the zero_convs did learn
    assert control.zero_convs[0].weight.abs().sum() > 0           # and so did their EMA
    assert state["step"] == 4 and state["losses"] == losses and all(v == v and abs(v) < 1e3 for v in losses)
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
    assert cf.edge_f1(x, e1, 100, 200, 0)["f1"] == 1.0


@pytest.mark.parametrize("damage", [b"not a torch file", b"", "foreign"])
def test_a_corrupt_edge_cache_is_rebuilt(tmp_path, damage):
    x = noise(3)
    path = str(tmp_path / "edges.pt")
    if damage == "foreign":
        torch.save({"edges": torch.zeros(2)}, path)           # a readable file without the key
    else:
        with open(path, "wb") as f:
            f.write(damage)
    assert torch.equal(cn.edge_maps(x, 100, 200, path), cn.canny(x, 100, 200))
    assert torch.load(path, weights_only=True)["key"]["n"] == 3   # rewritten, readable again


CN_FAST = ["--device", "cpu", "--epochs", "1", "--batch-size", "32", "--ddim-steps", "2", "--n-digits", "2",
           "--samples-per-edge", "2"]


@pytest.fixture(scope="module")
def cn_run(ddpm_ckpt, mnist_dir, tmp_path_factory):
    """One 1-epoch ControlNet run: (argv without --out, its --out)."""
    out = str(tmp_path_factory.mktemp("cn"))
    args = ["--base-ckpt", ddpm_ckpt, "--data-dir", mnist_dir, "--no-download", *CN_FAST]
    cn.main(args + ["--out", out])
    return args, out


def test_controlnet_main(cn_run, ddpm_ckpt, mnist_dir):
    args, out = cn_run
    for f in ("control.png", "loss.png", "ckpt.pt", "edges_train_100_200.pt", "edges_test_100_200.pt"):
        assert os.path.isfile(os.path.join(out, f)), f
    before = digest(os.path.join(out, "ckpt.pt"))
    os.remove(os.path.join(out, "control.png"))
    cn.main(args + ["--out", out, "--sample-only"])
    assert os.path.isfile(os.path.join(out, "control.png")) and digest(os.path.join(out, "ckpt.pt")) == before
    scores = cf.main(["--out", out, "--base-ckpt", ddpm_ckpt, "--data-dir", mnist_dir, "--no-download", "--device",
                      "cpu", "--ddim-steps", "2", "--n-digits", "2", "--samples-per-edge", "2", "--n-eval", "4"])
    table = open(os.path.join(out, "edge_fidelity.md")).read()
    assert "| ControlNet |" in table and "| unconditional |" in table and "Canny 100/200" in table
    assert "| another real digit |" in table          # the baseline is measured, not quoted
    assert set(scores) == {"ControlNet", "unconditional", "another real digit"}
    assert digest(os.path.join(out, "ckpt.pt")) == before


def test_fidelity_scores_with_the_trained_thresholds(cn_run, ddpm_ckpt, mnist_dir, tmp_path):
    """controlnet_fidelity.py takes the Canny thresholds from the checkpoint, not from a flag."""
    _, out = cn_run
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    state["config"].update(low=50, high=150)                    # as if trained with --low 50 --high 150
    torch.save(state, tmp_path / "ckpt.pt")
    cf.main(["--out", str(tmp_path), "--base-ckpt", ddpm_ckpt, "--data-dir", mnist_dir, "--no-download", "--device",
             "cpu", "--ddim-steps", "2", "--n-digits", "1", "--samples-per-edge", "1", "--n-eval", "2"])
    assert "Canny 50/150" in open(tmp_path / "edge_fidelity.md").read()
    assert os.path.isfile(tmp_path / "edges_test_50_150.pt")


def test_fidelity_without_a_checkpoint_stops_at_once(ddpm_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(cn, "canny", lambda *a: pytest.fail("computed edges"))
    monkeypatch.setattr(ddpm_mnist, "ensure_trained", lambda *a, **k: pytest.fail("looked for a base"))
    with pytest.raises(SystemExit) as e:
        cf.main(["--out", str(tmp_path / "none"), "--base-ckpt", ddpm_ckpt, "--device", "cpu"])
    assert "python controlnet_canny.py --out" in one_line_error(e)


def test_controlnet_resume_is_the_uninterrupted_run(base, tmp_path):
    """2 epochs straight == 1 epoch + --resume --epochs 2: the same weights, EMA, steps and losses
    (the batches are seeded by seed + epoch, and the checkpoint carries the random-number state)."""
    unet, ddpm = base
    x = noise(4)
    c, device = cn.canny(x, 100, 200), torch.device("cpu")
    runs = {"straight": [dict(epochs=2)], "resumed": [dict(epochs=1), dict(epochs=2, resume=True)]}
    for name, stages in runs.items():
        torch.manual_seed(0)                                   # what main's seed_everything does
        for kw in stages:
            cn.train(cn.Config(batch_size=2, out=str(tmp_path / name), **kw), unet, ddpm, x, c, device)
    a, b = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True) for name in runs)
    assert a["step"] == b["step"] == 4 and a["losses"] == b["losses"]
    for k in ("model", "ema"):
        assert all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k


def test_controlnet_never_overwrites_by_mistake(cn_run, monkeypatch):
    """Issue 15: training into an --out with a checkpoint, without --resume, stops before any work."""
    args, out = cn_run
    before = digest(os.path.join(out, "ckpt.pt"))
    monkeypatch.setattr(ddpm_mnist, "load_trained", lambda *a: pytest.fail("loaded the base"))
    with pytest.raises(SystemExit) as e:
        cn.main(args + ["--out", out, "--epochs", "2"])
    assert "--resume" in one_line_error(e) and digest(os.path.join(out, "ckpt.pt")) == before


def test_controlnet_resume_keeps_the_thresholds(cn_run):
    args, out = cn_run
    before = digest(os.path.join(out, "ckpt.pt"))
    with pytest.raises(SystemExit) as e:
        cn.main(args + ["--out", out, "--epochs", "2", "--resume", "--low", "50"])
    assert "--low is 50 but" in one_line_error(e) and digest(os.path.join(out, "ckpt.pt")) == before


def test_sample_only_without_a_checkpoint_stops_at_once(ddpm_ckpt, mnist_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(cn, "canny", lambda *a: pytest.fail("computed edges"))
    monkeypatch.setattr(ddpm_mnist, "ensure_trained", lambda *a, **k: pytest.fail("looked for a base"))
    with pytest.raises(SystemExit) as e:
        cn.main(["--base-ckpt", ddpm_ckpt, "--data-dir", mnist_dir, "--out", str(tmp_path / "new"), "--sample-only"])
    assert "--sample-only" in one_line_error(e)


@pytest.mark.parametrize("args, words", [
    (["--low", "200", "--high", "100"], "--low < --high"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
    (["--resume"], "--resume: there is no checkpoint"),
])
def test_controlnet_bad_input(ddpm_ckpt, tmp_path, args, words):
    with pytest.raises(SystemExit) as e:
        cn.main(["--base-ckpt", ddpm_ckpt, "--out", str(tmp_path), "--device", "cpu", *args])
    assert words in one_line_error(e)
