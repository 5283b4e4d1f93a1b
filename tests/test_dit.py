"""Tests of dit_cifar.py and dit_figures.py: a CPU smoke run on a tiny image folder (then --resume, equal
to an uninterrupted run, and --sample-only, with the figures and --eval), adaLN-Zero at initialisation,
patchify/unpatchify, a 2-process torchrun run on the gloo backend, and one-line errors for bad input."""
import functools
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import checkpoints
import dit_cifar
from tools import dit_figures
import latent_diffusion
from dit_cifar import DiT, patchify, unpatchify
from latent_diffusion import VAE, load_vae


def tiny(out, *extra):
    """Flags of a run that takes seconds on CPU: DiT-T/2, a 16-channel VAE, 50 diffusion steps."""
    return ["--out", str(out), "--model", "DiT-T/2", "--vae-base", "16", "--vae-epochs", "1",
            "--epochs", "1", "--batch-size", "12", "--T", "50", "--ddim-steps", "2",
            "--no-download", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def torchrun(image_folder, tmp_path_factory):
    """`torchrun --nproc_per_node=2` of the script on CPU (gloo), started in the background (before
    `run`, so that the two overlap). Rank 0 trains the VAE while rank 1 waits at the barrier.
    -> (output folder, process, log file)."""
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           dit_cifar.__file__, "--dataset", image_folder, *tiny(out)]
    with open(out / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=os.path.dirname(dit_cifar.__file__), env={**os.environ, "OMP_NUM_THREADS": "1"})
    yield out, proc, out / "log.txt"
    if proc.poll() is None:                                            # the launcher and its workers
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def run(torchrun, image_folder, tmp_path_factory):
    """The output folder of one tiny training run through dit_figures.py: VAE, then one DiT epoch (dit_cifar.py's
    training), then the figures (`torchrun` is requested only to start it first)."""
    out = tmp_path_factory.mktemp("dit")
    dit_figures.main(["--dataset", image_folder, *tiny(out, "--n-per-class", "2")])
    return out


def one_line_error(argv) -> str:
    with pytest.raises(SystemExit) as e:
        dit_cifar.main(argv)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_smoke_resume_and_sample_only(run, image_folder, tmp_path, monkeypatch):
    names = ["vae.pt", "ckpt.pt", "vae_reconstructions.png", "loss.png", "samples_epoch001_w3.png",
             "cfg_w1.png", "cfg_w3.png", "cfg_w5.png", "cfg_w7.5.png"]
    assert all((run / n).is_file() for n in names), sorted(os.listdir(run))
    state = torch.load(run / "ckpt.pt", weights_only=True)
    assert {"kind", "net", "model", "ema", "opt", "step", "epoch", "config", "rng", "scale", "test_losses"} <= set(state)
    assert state["kind"] == "dit_cifar.py DiT" and state["net"]["depth"] == 2
    assert state["step"] == 3 and torch.isfinite(torch.tensor(state["losses"])).all()
    model, ddpm, _ = dit_cifar.load_trained(str(run / "ckpt.pt"), "cpu")
    vae, scale = load_vae(str(run / "vae.pt"), "cpu")
    x = [dit_cifar.sample(model, ddpm, vae, scale, torch.tensor([0, 1, 2]), 3.0, 2, seed=0) for _ in range(2)]
    assert x[0].shape == (3, 3, 32, 32) and torch.isfinite(x[0]).all() and torch.equal(x[0], x[1])

    # 1 epoch, then --resume to 2, gives the weights of 2 epochs straight (same batches, same RNG)
    dit_cifar.main(["--dataset", image_folder, *tiny(run, "--resume", "--epochs", "2")])
    state = torch.load(run / "ckpt.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (2, 6) and len(state["test_losses"]) == 2
    straight = tmp_path / "straight"
    dit_cifar.main(["--dataset", image_folder, *tiny(straight, "--vae", str(run / "vae.pt"), "--epochs", "2")])
    other = torch.load(straight / "ckpt.pt", weights_only=True)
    for key in "model", "ema":
        assert all(torch.equal(v, other[key][k]) for k, v in state[key].items()), key

    evaluate = pytest.importorskip("tools.evaluate")                        # a small, 1-epoch classifier
    monkeypatch.setitem(evaluate.NETS, "resnet", functools.partial(evaluate.ResNet, width=8))
    monkeypatch.setattr(evaluate, "Evaluator", functools.partial(evaluate.Evaluator, classifier_epochs=1, cache_dir=str(run)))
    dit_cifar.main(["--dataset", image_folder, *tiny(run, "--sample-only")])
    assert (run / "samples_w3.png").is_file()
    os.remove(run / "cfg_w3.png")
    dit_figures.main(["--dataset", image_folder, *tiny(run, "--sample-only", "--scales", "3", "--eval", "6")])
    assert (run / "cfg_w3.png").is_file() and (run / "eval.md").is_file() and (run / "eval.png").is_file()


def test_adaln_zero_blocks_start_as_identity_and_output_is_zero():
    torch.manual_seed(0)
    model = DiT(input_size=8, in_channels=4, num_classes=3, patch=2, hidden=32, depth=3, heads=2)
    x, c = torch.randn(5, 16, 32), torch.randn(5, 32)                  # tokens (N, T, D), condition (N, D)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    z, t, y = torch.randn(5, 4, 8, 8), torch.randint(0, 1000, (5,)), torch.tensor([0, 1, 2, 3, 3])
    eps = model(z, t, y)
    assert torch.equal(eps, torch.zeros_like(z))
    F.mse_loss(eps, torch.randn_like(z)).backward()                     # the zeros still learn
    assert model.final.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_patchify_then_unpatchify_is_identity(p):
    z = torch.randn(3, 4, 8, 8)
    tokens = patchify(z, p)
    assert tokens.shape == (3, (8 // p) ** 2, p * p * 4)
    assert torch.equal(tokens[0, 0], z[0, :, :p, :p].permute(1, 2, 0).flatten())     # top-left patch
    assert torch.equal(tokens[0, -1], z[0, :, -p:, -p:].permute(1, 2, 0).flatten())  # bottom-right
    assert torch.equal(unpatchify(tokens, p, 4), z)


def test_torchrun_two_processes_on_gloo_stay_in_sync(torchrun):
    out, proc, log = torchrun
    proc.wait(timeout=180)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert "the parameters are identical on all 2 ranks" in text
    assert text.count("DiT-T/2: ") == 1 and text.count("  test ") == 1   # rank 0 logs alone
    assert (out / "vae.pt").is_file() and (out / "samples_epoch001_w3.png").is_file()
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["step"] == 3                                          # 36 images, 2 ranks x 6 per step


def test_bad_input_is_one_line(run, image_folder, tmp_path):
    assert "unknown model 'DiT-XXL/2'" in one_line_error(tiny(tmp_path, "--model", "DiT-XXL/2"))
    msg = one_line_error(["--dataset", image_folder, *tiny(tmp_path, "--vae", str(run / "vae.pt"),
                                                              "--model", "DiT-T/3")])
    assert "patch size 3 does not divide the latent size 8" in msg
    other = VAE(channels=3, latent_channels=2, base=16)                 # latents (2, 8, 8), not (4, 8, 8)
    checkpoints.save(str(tmp_path / "vae2.pt"), kind=latent_diffusion.VAE_KIND, net=other.config,
                     model=other.state_dict(), scale=1.0)
    before = (run / "ckpt.pt").read_bytes()
    for flag in "--sample-only", "--resume":
        msg = one_line_error(["--dataset", image_folder, *tiny(run, flag, "--epochs", "3", "--vae", str(tmp_path / "vae2.pt"))])
        assert "(4, 8, 8)" in msg and "(2, 8, 8)" in msg and "--vae" in msg
    msg = one_line_error(["--dataset", image_folder, *tiny(run)])          # no --resume: never replaced
    assert "--resume" in msg and "--overwrite" in msg
    msg = one_line_error(["--dataset", image_folder, *tiny(run, "--resume", "--epochs", "3", "--model", "DiT-T/4")])
    assert "--model is DiT-T/4" in msg
    assert (run / "ckpt.pt").read_bytes() == before
    msg = one_line_error(["--dataset", image_folder, *tiny(tmp_path / "new", "--sample-only")])
    assert "not found" in msg and not (tmp_path / "new" / "vae.pt").exists()   # stopped before any VAE
    msg = one_line_error(["--dataset", image_folder, *tiny(tmp_path, "--ckpt", str(run / "vae.pt"), "--sample-only")])
    assert "latent_diffusion.py VAE checkpoint, not a dit_cifar.py DiT one" in msg


NAN_ON_RANK_1 = """
import os, sys
sys.path.insert(0, {repo!r})
import ddpm_mnist, dit_cifar
loss, calls = ddpm_mnist.DDPM.loss, [0]

def nan_on_rank_1(self, model, x0):   # rank 1 only, at the last step of the first epoch
    calls[0] += 1
    value = loss(self, model, x0)
    return value * float("nan") if os.environ["RANK"] == "1" and calls[0] == 3 else value

ddpm_mnist.DDPM.loss = nan_on_rank_1
dit_cifar.main(sys.argv[1:])
"""


def test_a_nan_on_one_rank_stops_every_rank_in_one_line(image_folder, tmp_path):
    """Rank 0 computed its last loss before the all-reduced NaN gradient arrived: without a verdict
    shared by the ranks it would save NaN weights and wait for rank 1 in the next epoch."""
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1.format(repo=os.path.dirname(dit_cifar.__file__)))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script),
           "--dataset", image_folder, *tiny(out, "--epochs", "2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=os.path.dirname(dit_cifar.__file__),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-4000:]
    assert text.count("error: loss became nan at step 3, before any checkpoint was written") == 2, text[-4000:]
    assert not (out / "ckpt.pt").exists()              # nothing saved from the poisoned step
