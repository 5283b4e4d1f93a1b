"""Kill a training run at any moment (SIGKILL: no handler runs) and lose at most the running epoch:
the checkpoint on disk stays loadable, the resumed run leaves no temporary file, and `--resume`
ends with the weights of an uninterrupted run of the same seed (torch.equal on every tensor).
Killed mid-epoch, mid-checkpoint-write and mid-figure, for ddpm_mnist.py and for a script that
builds on its model (controlnet_canny.py)."""
import importlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import ddpm_mnist

REPO = os.path.dirname(os.path.abspath(ddpm_mnist.__file__))
KILLED = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)                       # as the tests in this process: the same arithmetic
import plots, {script}
where = sys.argv[1]
if where == "save":                            # the 2nd checkpoint write: half a file, then killed
    real, n = torch.save, [0]
    def save(obj, f, *a, **k):
        n[0] += str(f).endswith("ckpt.pt.tmp")
        if n[0] == 2:
            open(f, "wb").write(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, f, *a, **k)
    torch.save = save
elif where == "figure":                        # the first progress grid (or any figure)
    plots.save_grid = plots.save_figure = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
{script}.main(sys.argv[2:])
"""
DDPM = ["--preset", "tiny", "--T", "20", "--batch-size", "16", "--n-samples", "2", "--ddim-steps", "2",
        "--sample-every", "2", "--epochs", "12"]
CONTROL = ["--epochs", "6", "--batch-size", "16", "--ddim-steps", "2", "--n-digits", "1", "--samples-per-edge", "1"]


def args(script, mnist_dir, out, base):
    extra = DDPM if script == "ddpm_mnist" else CONTROL + ["--base-ckpt", base]
    return extra + ["--data-dir", mnist_dir, "--no-download", "--device", "cpu", "--out", str(out)]


def kill_a_run(script, where, argv, tmp_path) -> None:
    """Start `script` in a new process and SIGKILL it: at `where` ("save", "figure"), or (where
    "epoch") at a random moment after its first checkpoint."""
    path = tmp_path / "killed.py"
    path.write_text(KILLED.format(repo=REPO, script=script))
    proc = subprocess.Popen([sys.executable, str(path), where, *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if where == "epoch":
        ckpt = os.path.join(argv[argv.index("--out") + 1], "ckpt.pt")
        while not os.path.exists(ckpt) and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(random.Random(os.getpid()).uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]


def weights(path):
    state = torch.load(path, weights_only=True)
    return state["model"], state["ema"]


@pytest.fixture(scope="module")
def uninterrupted(mnist_dir, ddpm_ckpt, tmp_path_factory):
    """The weights of each script's run, never stopped."""
    runs = {}
    for script in ("ddpm_mnist", "controlnet_canny"):
        out = tmp_path_factory.mktemp(script)
        importlib.import_module(script).main(args(script, mnist_dir, out, ddpm_ckpt))
        runs[script] = weights(out / "ckpt.pt")
    return runs


@pytest.mark.parametrize("script, where", [("ddpm_mnist", "epoch"), ("ddpm_mnist", "save"), ("ddpm_mnist", "figure"),
                                           ("controlnet_canny", "save")])
def test_a_killed_run_resumes_to_the_uninterrupted_weights(script, where, uninterrupted, mnist_dir, ddpm_ckpt,
                                                           tmp_path):
    out = tmp_path / "run"
    argv = args(script, mnist_dir, out, ddpm_ckpt)
    kill_a_run(script, where, argv, tmp_path)
    if where == "save":
        assert (out / "ckpt.pt.tmp").read_bytes() == b"half a checkpoint"   # killed mid-write
    state = torch.load(out / "ckpt.pt", weights_only=True)        # the last whole checkpoint
    assert state["epoch"] >= 1 and state["kind"] == importlib.import_module(script).KIND
    importlib.import_module(script).main(argv + ["--resume"])
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    for mine, theirs in zip(weights(out / "ckpt.pt"), uninterrupted[script]):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
