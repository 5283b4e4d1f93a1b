"""Faults and details of randomness: independent noise streams in every figure sampler."""
import pytest
import torch

import cfg as cfg_mod
from tools import cfg_sweep
import classifier_guidance as cg
from tools import classifier_guidance_sweep as cg_sweep
from tools import ddpm_figures
from tools import latent_figures
from ddpm_mnist import DDPM

CPU = ["--device", "cpu", "--no-download"]


@pytest.fixture
def first_noise(monkeypatch):
    """Records, for every DDPM/DDIM run started from a given x_T, x_T and the first noise z the
    sampler draws. One generator seeded twice the same way would make the two equal."""
    runs, current = [], {}
    noise, samplers = DDPM._noise, {name: getattr(DDPM, name) for name in ("ddpm_sample", "ddim_sample")}

    def spy_noise(self, shape, generator, device):
        z = noise(self, shape, generator, device)
        if "x_T" in current and "z" not in current:
            current["z"] = z.clone()
        return z

    def spy(name):
        def run(self, model, shape, *args, x_T=None, **kwargs):
            current.clear()
            if x_T is not None:
                current["x_T"] = x_T.clone()
            out = samplers[name](self, model, shape, *args, x_T=x_T, **kwargs)
            if "z" in current:
                runs.append((current["x_T"], current["z"]))
            return out
        return run

    monkeypatch.setattr(DDPM, "_noise", spy_noise)
    for name in samplers:
        monkeypatch.setattr(DDPM, name, spy(name))
    return runs


def assert_independent(runs):
    assert runs, "no stochastic run from a given x_T was recorded"
    for x_T, z in runs:
        assert not torch.equal(x_T.flatten()[:z.numel()], z.flatten()[:x_T.numel()]), "the first z equals x_T"


def test_ddpm_mnist_figures_draw_z_apart_from_x_T(first_noise, mnist_dir, ddpm_ckpt, tmp_path):
    ddpm_figures.main(["--sample-only", "--ckpt", ddpm_ckpt, "--out", str(tmp_path), "--n-samples", "4",
                       "--ddim-steps", "3", "--eta", "1", "--sweep-steps", "2", "--data-dir", mnist_dir, *CPU])
    assert_independent(first_noise)


def test_guided_and_latent_figures_draw_z_apart_from_x_T(first_noise, mnist_dir, ddpm_ckpt, tmp_path):
    data = ["--data-dir", mnist_dir, *CPU]
    cfg_args = ["--out", str(tmp_path / "cfg"), "--image-size", "8", "--preset", "tiny", "--T", "20", "--epochs", "1",
                "--batch-size", "32", "--sampler", "ddpm", "--ddim-steps", "2", "--scales", "2", "--classes", "0", "1",
                "--n-per-class", "2", *data]
    cfg_mod.main(cfg_args)
    cfg_sweep.main(cfg_args)                                  # the figures: the sweeps of the trained runs
    cg_args = ["--out", str(tmp_path / "cg"), "--base-ckpt", ddpm_ckpt, "--preset", "tiny", "--epochs", "1",
               "--batch-size", "32", "--samplers", "ddpm", "--ddim-steps", "2", "--scales", "1", "--classes", "0",
               "--n-per-class", "2", *data]
    cg.main(cg_args)
    cg_sweep.main(cg_args)
    latent_figures.main(["--out", str(tmp_path / "ld"), "--vae-epochs", "1", "--vae-base", "8", "--unet-base", "8",
                         "--unet-res", "1", "--T", "10", "--epochs", "1", "--batch-size", "32", "--n-samples", "2",
                         "--ddim-steps", "2", *data])
    assert_independent(first_noise)
    assert len(first_noise) == 3      # the figures of cfg (DDPM), classifier guidance (DDPM) and latent DDPM
