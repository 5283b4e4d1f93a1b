"""Tests of cfg.py (classifier-free guidance) and classifier_guidance.py, and of their sweeps
(cfg_sweep.py, classifier_guidance_sweep.py): smoke runs on the tiny MNIST fixture, resume = the
uninterrupted run, the guidance mathematics, one batched forward pass per CFG step, the class tokens
as an argument of the blocks, and bad input (nothing overwritten)."""
import dataclasses
import functools
import math
import os
import shutil

import pytest
import torch

import cfg as cfg_mod
from tools import cfg_sweep
import classifier_guidance as cg
from tools import classifier_guidance_sweep as cg_sweep
import ddpm_mnist
from ddpm_mnist import DDPM

CPU = ["--device", "cpu", "--no-download", "--seed", "0"]


def tiny_cfg_args(mnist_dir, out, *extra):
    """cfg.py (and cfg_sweep.py) on 8x8 digits (--image-size 8), 2 optimizer steps per epoch, 3 DDIM steps."""
    return ["--data-dir", mnist_dir, "--out", str(out), "--image-size", "8", "--preset", "tiny", "--T", "30",
            "--epochs", "1", "--batch-size", "32", "--n-per-class", "2", "--ddim-steps", "3",
            "--scales", "0", "1", "3", "--classes", "0", "1", "2", *CPU, *extra]


def tiny_cg_args(mnist_dir, out, base, *extra):
    """classifier_guidance.py (and its sweep) on the 28x28 base of conftest's ddpm_ckpt (T = 50), DDIM
    only: the guided DDPM sampler (50 steps with a classifier gradient each) is tested at 8x8 below."""
    return ["--data-dir", mnist_dir, "--out", str(out), "--base-ckpt", base, "--preset", "tiny", "--epochs", "1",
            "--batch-size", "32", "--n-per-class", "2", "--ddim-steps", "3", "--scales", "0", "2",
            "--samplers", "ddim", "--classes", "0", "1", "--scale", "2", *CPU, *extra]


@pytest.fixture(scope="module")
def cfg_run(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cfg")
    cfg_mod.main(tiny_cfg_args(mnist_dir, out))
    shutil.copy(out / "ckpt.pt", out.parent / f"{out.name}_epoch1.pt")  # for the resume test, whatever runs first
    return out, cfg_sweep.main(tiny_cfg_args(mnist_dir, out))


@pytest.fixture(scope="module")
def cg_run(mnist_dir, ddpm_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("cg")
    cg.main(tiny_cg_args(mnist_dir, out, ddpm_ckpt))
    return out, cg_sweep.main(tiny_cg_args(mnist_dir, out, ddpm_ckpt))["rows"]


def perturbed(model):
    """Zero-initialised output layers make eps = 0 everywhere; perturb every weight so that the
    conditional and unconditional predictions differ."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_cond_unet(cond):
    return perturbed(cfg_mod.CondUNet(10, cond, planes=2, tokens=2, cond_dim=8, image_size=8, channels=1,
                                      base=8, mults=(1, 2), num_res=1, dropout=0.0))


def one_line_exit(excinfo):
    msg = str(excinfo.value)
    assert msg.startswith("error:") and "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- cfg.py


def test_cfg_smoke_resume_and_sample_only(cfg_run, mnist_dir):
    out, rows = cfg_run
    for name in ("ckpt.pt", "loss.png", "samples_epoch001_w3.png", "cfg_w0.png", "cfg_w1.png", "cfg_w3.png",
                 "tradeoff.png", "tradeoff.md"):
        assert os.path.isfile(out / name), name
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["kind"] == "cfg.py CondUNet" and state["net"]["num_classes"] == 10
    assert state["step"] == 2 and all(math.isfinite(v) for v in state["losses"])
    assert [r[0] for r in rows] == [0, 1, 3] and all(math.isfinite(r[1]) and r[1] > 0 for r in rows)
    model, ddpm = cfg_mod.main(tiny_cfg_args(mnist_dir, out, "--epochs", "2", "--resume"))
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["step"] == 4
    # the same EMA weights and seed give the same samples, whether trained now or loaded
    c = cfg_mod.Config(data_dir=mnist_dir, download=False, out=str(out), image_size=8, channels=1, scales=(0.0, 3.0),
                       classes=(0, 1, 2), n_per_class=2, ddim_steps=3)
    assert cfg_sweep.sweep(c, model, ddpm, "cpu") == cfg_sweep.main(tiny_cfg_args(mnist_dir, out, "--scales", "0", "3"))


def test_cfg_resume_is_the_uninterrupted_run(cfg_run, mnist_dir, tmp_path):
    """1 epoch, then --resume --epochs 2 (the fixture's run, continued) == 2 epochs straight:
    the same batches (seed + epoch), and the RNG state (t, eps, dropped labels, dropout) restored."""
    out, _ = cfg_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(out.parent / f"{out.name}_epoch1.pt", resumed / "ckpt.pt")
    one = torch.load(resumed / "ckpt.pt", weights_only=True)
    assert one["epoch"] == 1
    cfg_mod.main(tiny_cfg_args(mnist_dir, resumed, "--epochs", "2", "--resume", "--scales", "1"))
    cfg_mod.main(tiny_cfg_args(mnist_dir, tmp_path / "straight", "--epochs", "2", "--scales", "1"))
    a = torch.load(resumed / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 and a["losses"] == b["losses"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert not torch.equal(one["model"]["inc.weight"], a["model"]["inc.weight"])  # it did train on


@pytest.mark.parametrize("cond", ["input", "xattn"])
def test_guided_eps_w1_is_conditional_w0_unconditional(cond):
    model = tiny_cond_unet(cond)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 7, 9]), torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        eps_cond, eps_uncond = model(x, t, y), model(x, t, torch.full_like(y, model.null))
        assert not torch.allclose(eps_cond, eps_uncond, atol=1e-4)  # the label matters
        assert torch.allclose(cfg_mod.guided_eps(model, y, 1.0)(x, t), eps_cond, atol=1e-5)
        assert torch.allclose(cfg_mod.guided_eps(model, y, 0.0)(x, t), eps_uncond, atol=1e-5)
        w = 3.0
        assert torch.allclose(cfg_mod.guided_eps(model, y, w)(x, t), eps_uncond + w * (eps_cond - eps_uncond), atol=1e-5)
    # both ways of conditioning train: the loss reaches the label embedding
    loss = cfg_mod.loss(DDPM(10, "cosine"), model.train(), x, y, 0.1, model.null)
    loss.backward()
    emb = model.label_maps if cond == "input" else model.label_tokens
    assert torch.isfinite(loss) and emb.weight.grad.abs().sum() > 0


def test_drop_labels_rate():
    y = torch.randint(0, 10, (100_000,))
    for p in (0.0, 0.1, 0.5):
        y_tilde = cfg_mod.drop_labels(y, p, null=10)
        dropped = y_tilde == 10
        assert abs(dropped.float().mean().item() - p) < 0.01
        assert torch.equal(y_tilde[~dropped], y[~dropped])  # kept labels are untouched


def test_cfg_one_batched_forward_per_step():
    model = tiny_cond_unet("xattn")
    calls = []

    class Counting(torch.nn.Module):
        null, config = model.null, model.config

        def forward(self, x, t, y):
            calls.append(len(x))
            return model(x, t, y)

    ddpm, y = DDPM(10, "cosine"), torch.tensor([1, 2, 3])
    cfg_mod.sample(Counting(), ddpm, y, 3.0, "ddim", steps=4)
    assert calls == [6] * 4          # one call per step, over the doubled batch [cond, uncond]
    calls.clear()
    cfg_mod.sample(Counting(), ddpm, y, 3.0, "ddpm")
    assert calls == [6] * 10


def test_cfg_bad_input(cfg_run, mnist_dir):
    out, _ = cfg_run
    model = tiny_cond_unet("input")
    with pytest.raises(SystemExit) as e:
        cfg_mod.sample(model, DDPM(10, "cosine"), torch.tensor([1, 10]), 1.0, steps=2)
    assert "0..9" in one_line_exit(e)
    with pytest.raises(SystemExit) as e:
        cfg_mod.sample(model, DDPM(10, "cosine"), torch.tensor([1, 2]), "three", steps=2)
    one_line_exit(e)
    with pytest.raises(SystemExit) as e:
        cfg_sweep.main(tiny_cfg_args(mnist_dir, out, "--classes", "3", "12"))
    assert "0..9" in one_line_exit(e)
    with pytest.raises(SystemExit) as e:
        cfg_sweep.main(tiny_cfg_args(mnist_dir, out, "--scales", "1", "nan"))
    one_line_exit(e)
    with pytest.raises(SystemExit) as e:  # cfg.py trains; a trained run is sampled by cfg_sweep.py
        cfg_mod.main(tiny_cfg_args(mnist_dir, out, "--sample-only"))
    assert "python -m tools.cfg_sweep" in one_line_exit(e)
    with pytest.raises(SystemExit) as e:  # a value that is not a number: one line naming flag and value
        cfg_mod.main(tiny_cfg_args(mnist_dir, out, "--scales", "abc"))
    assert "invalid float value: 'abc'" in one_line_exit(e)


# ----------------------------------------------------------------------------- classifier_guidance.py


def test_cg_smoke_and_sample_only(cg_run, mnist_dir, ddpm_ckpt):
    out, rows = cg_run
    for name in ("ckpt.pt", "loss.png", "samples_epoch001_s2.png", "accuracy_per_t.png", "guided_ddim_s0.png", "guided_ddim_s2.png",
                 "accuracy_vs_scale.png", "accuracy_vs_scale.md"):
        assert os.path.isfile(out / name), name
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["kind"] == "classifier_guidance.py classifier" and state["net"]["num_classes"] == 10
    assert state["step"] == 2 and all(math.isfinite(v) for v in state["losses"])
    assert [r[:2] for r in rows] == [["ddim", 0], ["ddim", 2]]  # (guided DDPM: see the maths test below)
    assert all(math.isfinite(r[2]) and r[2] > 0 for r in rows)
    # the sweep loads the classifier: the same samples for the same scale, nothing trained
    again = cg_sweep.main(tiny_cg_args(mnist_dir, out, ddpm_ckpt, "--scales", "2"))
    assert again["rows"] == rows[1:] and torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    with pytest.raises(SystemExit) as e:  # classifier_guidance.py trains; the sweep samples
        cg.main(tiny_cg_args(mnist_dir, out, ddpm_ckpt, "--sample-only"))
    assert "python -m tools.classifier_guidance_sweep" in one_line_exit(e)


def tiny_classifier():
    return perturbed(cg.NoisyClassifier(10, image_size=8, channels=1, base=8, mults=(1, 2), num_res=1, dropout=0.0))


def test_classifier_gradient_and_guidance_maths():
    clf, ddpm = tiny_classifier(), DDPM(10, "cosine")
    model = lambda x, t: 0.1 * x  # noqa: E731 (any noise predictor)
    model.config = dict(channels=1, image_size=8)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 9]), torch.tensor([2, 5, 7])
    g = cg.log_prob_grad(clf, x, t, y)
    assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    s, ab = 2.0, ddpm.alpha_bar[t].view(-1, 1, 1, 1)
    e = model(x, t)
    assert torch.equal(cg.guided_eps(model, clf, ddpm, y, 0.0)(x, t), e)               # scale 0: no shift at all
    assert torch.allclose(cg.guided_eps(model, clf, ddpm, y, s)(x, t), e - s * (1 - ab).sqrt() * g, atol=1e-6)
    # DDPM: the mean ddpm_sample forms from the guided eps is mu + s Sigma_t grad
    bc = lambda v: v[t].view(-1, 1, 1, 1)  # noqa: E731
    mu = lambda eps: (x - bc(ddpm.beta) / (1 - ab).sqrt() * eps) / bc(ddpm.alpha).sqrt()  # noqa: E731
    for sigma, var in (("beta", ddpm.beta), ("posterior", ddpm.posterior_var)):
        shifted = mu(cg.guided_eps(model, clf, ddpm, y, s, "ddpm", sigma)(x, t))
        assert torch.allclose(shifted, mu(e) + s * bc(var) * g, atol=1e-5)
    # guided sampling at scale 0 is unguided sampling from the same noise
    x_T = torch.randn(3, 1, 8, 8)
    for sampler in ("ddim", "ddpm"):
        guided = cg.sample(model, clf, ddpm, y, 0.0, sampler, steps=4, eta=0.5, clip=False, x_T=x_T,
                           generator=torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(1)
        plain = (ddpm.ddim_sample(model, x_T.shape, 4, 0.5, x_T=x_T, generator=g) if sampler == "ddim"
                 else ddpm.ddpm_sample(model, x_T.shape, x_T=x_T, generator=g))
        assert torch.equal(guided, plain.clamp(-1, 1))
        assert torch.isfinite(cg.sample(model, clf, ddpm, y, 2.0, sampler, steps=4, x_T=x_T)).all()


def test_clip_x0_changes_only_predictions_outside_the_data_range():
    ddpm, t = DDPM(10, "cosine"), torch.tensor([1, 5, 9])
    x0, eps = torch.rand(3, 1, 4, 4) * 1.8 - 0.9, torch.randn(3, 1, 4, 4)
    x_t, ab = ddpm.q_sample(x0, t, eps), ddpm.alpha_bar[t].view(-1, 1, 1, 1)
    assert torch.allclose(ddpm_mnist.clip_x0(lambda x, t: eps, ddpm.alpha_bar)(x_t, t), eps, atol=1e-4)
    wild = ddpm_mnist.clip_x0(lambda x, t: -20 * eps, ddpm.alpha_bar)(x_t, t)
    x0_hat = (x_t - (1 - ab).sqrt() * wild) / ab.sqrt()
    assert x0_hat.abs().max() <= 1 + 1e-3 and not torch.allclose(wild, -20 * eps)


def test_cg_bad_input(cg_run, mnist_dir, ddpm_ckpt, tmp_path):
    out, _ = cg_run
    with pytest.raises(SystemExit) as e:
        cg.main(tiny_cg_args(mnist_dir, tmp_path, str(tmp_path / "missing.pt")))
    assert "not found" in one_line_exit(e)
    with pytest.raises(SystemExit) as e:
        cg_sweep.main(tiny_cg_args(mnist_dir, out, ddpm_ckpt, "--classes", "-1"))
    one_line_exit(e)
    with pytest.raises(SystemExit) as e:
        cg.sample(lambda x, t: x, tiny_classifier(), DDPM(10, "cosine"), torch.tensor([10]), 1.0)
    assert "0..9" in one_line_exit(e)
    with pytest.raises(SystemExit) as e:
        cg_sweep.main(tiny_cg_args(mnist_dir, out, ddpm_ckpt, "--scales", "inf"))
    one_line_exit(e)
    with pytest.raises(SystemExit) as e:
        cg.main(tiny_cg_args(mnist_dir, out, ddpm_ckpt, "--scales", "x"))
    assert "invalid float value: 'x'" in one_line_exit(e)


def test_cg_trains_the_missing_default_base(mnist_dir, tmp_path, monkeypatch):
    """The sweep with no classifier stops at once, before training a base model; a training run
    without --base-ckpt trains the missing runs/ddpm_mnist/ckpt.pt first (here: with tiny settings)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ddpm_mnist, "Config", functools.partial(
        ddpm_mnist.Config, preset="tiny", T=30, epochs=1, batch_size=32, n_samples=2, ddim_steps=2))
    args = tiny_cg_args(mnist_dir, tmp_path / "cg", "")
    args.remove("--base-ckpt"), args.remove("")
    with pytest.raises(SystemExit) as e:
        cg_sweep.main(args + ["--image-size", "8"])
    assert "not found" in one_line_exit(e)
    assert not os.path.exists(tmp_path / ddpm_mnist.DEFAULT_CKPT)  # nothing was trained
    cg.main(args + ["--image-size", "8", "--scales", "1"])
    assert torch.load(tmp_path / ddpm_mnist.DEFAULT_CKPT, weights_only=True)["net"]["image_size"] == 8
    assert torch.load(tmp_path / "cg" / "ckpt.pt", weights_only=True)["net"]["image_size"] == 8


def test_cg_base_mismatch_stops_before_training(cg_run, mnist_dir, ddpm_ckpt, image_folder, tmp_path):
    """Every check against the base runs before the classifier trains: the checkpoint stays as it was."""
    out, _ = cg_run
    before = (out / "ckpt.pt").read_bytes()
    other = torch.load(ddpm_ckpt, weights_only=True)    # the same UNet, on a schedule of 40 steps
    other["config"]["T"] = 40
    torch.save(other, tmp_path / "t40.pt")
    cases = [(cg, ["--image-size", "16", "--overwrite"], "makes 28x28 images"),
             (cg, ["--image-size", "16", "--resume"], "makes 28x28 images"),
             (cg, ["--dataset", image_folder, "--overwrite"], "the data has 3 channel(s)"),
             (cg, ["--base-ckpt", str(tmp_path / "t40.pt"), "--resume", "--epochs", "2"], "learned the schedule (50"),
             (cg_sweep, ["--base-ckpt", str(tmp_path / "t40.pt")], "learned the schedule (50"),
             (cg_sweep, ["--ckpt", ddpm_ckpt], "holds a ddpm_mnist.py UNet checkpoint"),
             (cg, ["--epochs", "2"], "already holds a checkpoint")]
    for script, extra, message in cases:
        with pytest.raises(SystemExit) as e:
            script.main(tiny_cg_args(mnist_dir, out, ddpm_ckpt, *extra))
        assert message in one_line_exit(e), extra
        assert (out / "ckpt.pt").read_bytes() == before, extra


# ----------------------------------------------------------------------------- the class tokens, an argument


def unet_part(state_dict):
    """The weights of a CondUNet (xattn) that ddpm_mnist's UNet has too, under the UNet's names."""
    return {k.replace(".block.", "."): v for k, v in state_dict.items()
            if ".xattn." not in k and not k.startswith("label_tokens")}


def test_xattn_unet_is_the_plain_unet_plus_cross_attention():
    """With the zero-initialised output projections of the cross-attention, CondUNet (xattn) is
    ddpm_mnist's UNet exactly, whatever the label; once they are non-zero the label matters."""
    kw = dict(image_size=8, channels=1, base=8, mults=(1, 2), num_res=1, dropout=0.0)
    model = cfg_mod.CondUNet(10, "xattn", tokens=2, cond_dim=8, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".xattn.proj." not in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    plain = ddpm_mnist.UNet(**kw)
    plain.load_state_dict(unet_part(model.state_dict()))  # strict: the same UNet parameters, nothing else
    model.eval(), plain.eval()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        for y in (torch.tensor([0, 3, 5, 9]), torch.full((4,), 10)):
            assert torch.equal(model(x, t, y), plain(x, t))
        for name, p in model.named_parameters():
            if ".xattn.proj." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        eps = model(x, t, torch.tensor([0, 3, 5, 9]))
        assert not torch.allclose(eps, model(x, t, torch.full((4,), 10)), atol=1e-4)
        assert not torch.allclose(eps, plain(x, t), atol=1e-4)
    assert not any(hasattr(m, "tokens") for m in model.modules())  # no per-call state kept on a module


def test_cross_attention_is_softmax_qk_v():
    """h + proj(softmax(q k^T / sqrt(d)) v) per head, written out with einsum."""
    torch.manual_seed(0)
    attn = cfg_mod.CrossAttention(8, cond_dim=6, heads=2)
    torch.nn.init.normal_(attn.proj.weight, std=0.3)
    h, tokens = torch.randn(3, 8, 4, 4), torch.randn(3, 5, 6)
    q = attn.q(attn.norm(h)).reshape(3, 2, 4, 16)                     # (N, heads, d, HW)
    k, v = attn.kv(tokens).reshape(3, 5, 2, 2, 4).unbind(2)           # (N, L, heads, d) each
    w = torch.softmax(torch.einsum("nhdp,nlhd->nhpl", q, k) / 2.0, dim=-1)  # sqrt(d) = 2
    a = torch.einsum("nhpl,nlhd->nhdp", w, v).reshape(3, 8, 4, 4)
    with torch.no_grad():
        assert torch.allclose(attn(h, tokens), h + attn.proj(a), atol=1e-5)


# ----------------------------------------------------------------------------- with evaluate.py


@pytest.fixture(scope="module")
def evaluator(mnist_dir, tmp_path_factory):
    evaluate = pytest.importorskip("tools.evaluate")
    return evaluate.Evaluator("mnist", mnist_dir, download=False, device="cpu",
                              cache_dir=str(tmp_path_factory.mktemp("eval")), classifier_epochs=1)


def test_accuracy_columns_with_evaluator(cg_run, mnist_dir, ddpm_ckpt, evaluator, tmp_path):
    c = cfg_mod.Config(data_dir=mnist_dir, download=False, out=str(tmp_path), scales=(0.0, 2.0), classes=(1, 2),
                       n_per_class=2, ddim_steps=2, eval=3)
    model = perturbed(cfg_mod.CondUNet(10, "input", planes=2, image_size=28, channels=1, base=8, mults=(1, 2),
                                       num_res=1, dropout=0.0))
    rows = cfg_sweep.sweep(c, model, DDPM(10, "cosine"), "cpu", evaluator)
    assert all(len(r) == 4 and 0 <= r[2] <= 1 and math.isfinite(r[3]) for r in rows)
    assert "class accuracy" in (tmp_path / "tradeoff.md").read_text() and (tmp_path / "tradeoff.png").is_file()
    out, _ = cg_run
    c = cg.Config(data_dir=mnist_dir, download=False, out=str(out), scales=(0.0, 2.0), samplers=("ddim",),
                  classes=(1, 2), n_per_class=2, ddim_steps=2, eval=3)
    model, ddpm, base = cg.load_base(cg.Config(base_ckpt=ddpm_ckpt), "cpu")
    c = dataclasses.replace(c, out=str(tmp_path))
    rows = cg_sweep.sweep(c, model, cg_sweep.load_classifier(str(out / "ckpt.pt"), base, "cpu"), ddpm, "cpu",
                          evaluator)["rows"]
    assert all(len(r) == 6 and 0 <= r[3] <= 1 and 0 <= r[4] <= 1 for r in rows)
