"""Bad input, table-driven: every case must stop with ONE line starting "error:" (no traceback),
before any training, and leave a checkpoint that was already there byte for byte unchanged.

Each case is (script, argv, expected words of the message, the checkpoint that must not change).
Scripts run in-process through their `main(argv)`; placeholders in argv name fixture files:
    {mnist}    a tiny MNIST root (conftest.py)          {folder}   a tiny image folder
    {ddpm}     a trained ddpm_mnist.py checkpoint       {ddpm_out} the folder holding it as ckpt.pt
    {tmp}      a fresh empty folder                     {file}     an existing plain file
    {foreign}  a latent_diffusion.py VAE checkpoint     {keyless}  a dict with none of our keys
    {garbage}  a file of random bytes named .pt         {broken}   an image folder with a truncated JPEG
    {empty}, {nan}, {float_labels}, {label12}: sample files for evaluate.py with what their names say
"""
import importlib
import shutil

import numpy as np
import pytest
import torch

import checkpoints
from conftest import digest

MNIST = ["--data-dir", "{mnist}", "--no-download", "--device", "cpu"]
TINY = MNIST + ["--preset", "tiny", "--T", "20", "--epochs", "1", "--batch-size", "16"]
DD = TINY + ["--ddim-steps", "10", "--out", "{tmp}"]
DR = MNIST + ["--preset", "tiny", "--T", "50", "--epochs", "2", "--batch-size", "16", "--ddim-steps", "10",
              "--out", "{ddpm_out}", "--resume"]

CFG = MNIST + ["--preset", "tiny", "--image-size", "8", "--T", "30", "--epochs", "1", "--batch-size", "32",
               "--ddim-steps", "3", "--n-per-class", "2", "--out", "{tmp}"]
CG = MNIST + ["--base-ckpt", "{ddpm}", "--preset", "tiny", "--epochs", "1", "--batch-size", "32", "--ddim-steps", "3",
              "--n-per-class", "2", "--samplers", "ddim", "--out", "{tmp}"]
LD = MNIST + ["--vae-epochs", "1", "--vae-base", "8", "--unet-base", "8", "--unet-res", "1", "--T", "40", "--epochs", "1",
              "--batch-size", "16", "--n-samples", "2", "--ddim-steps", "2"]
RF = MNIST + ["--preset", "tiny", "--unet-base", "8", "--unet-res", "1", "--epochs", "1", "--reflow-epochs", "1",
              "--n-pairs", "8", "--pair-steps", "2", "--n-samples", "2", "--batch-size", "16"]
DC = MNIST + ["--base-ckpt", "{ddpm}", "--out", "{tmp}"]
CN = MNIST + ["--base-ckpt", "{ddpm}"]
DIT = ["--dataset", "{folder}", "--model", "DiT-T/2", "--vae-base", "16", "--vae-epochs", "1", "--epochs", "1",
       "--batch-size", "12", "--T", "50", "--ddim-steps", "2", "--no-download", "--device", "cpu"]
EV = ["--dataset", "mnist", "--data-dir", "{mnist}", "--no-download", "--device", "cpu", "--cache-dir", "{tmp}",
      "--classifier-epochs", "1", "--no-calibrate"]

CASES = [
    # ----------------------------------------------------------------------------- cfg.py
    ("cfg", CFG + ["--batch-size", "0"], "--batch-size must be >= 1, got 0", None),
    ("cfg", CFG + ["--lr", "-0.1"], "--lr must be > 0", None),
    ("cfg", CFG + ["--sample-every", "0"], "--sample-every must be >= 1", None),
    ("cfg", CFG + ["--cond", "crossattn"], "invalid choice: 'crossattn'", None),
    ("cfg", CFG + ["--scales", "1", "nan"], "must be finite numbers", None),
    ("cfg", CFG + ["--p-uncond", "1"], "--p-uncond must be < 1", None),
    ("cfg", CFG + ["--p-uncond", "0"], "--p-uncond 0 never shows the network the null class", None),
    ("cfg", CFG + ["--ddim-steps", "31"], "--ddim-steps must be at most --T (30)", None),
    ("cfg", CFG + ["--ckpt", "{ddpm}"], "already holds a checkpoint", "{ddpm}"),
    ("cfg", CFG + ["--ckpt", "{ddpm}", "--resume"], "holds a ddpm_mnist.py UNet checkpoint, not a cfg.py CondUNet one", "{ddpm}"),
    ("cfg", CFG + ["--sample-only"], "cfg.py trains; sample a trained run with `python -m tools.cfg_sweep`", None),
    ("tools.cfg_sweep", CFG, "not found", None),
    ("cfg", CFG + ["--out", "{file}"], "is a file; pass a folder", "{file}"),
    ("cfg", CFG + ["--classes", "0", "10"], "--classes must be in 0..9", None),
    # ----------------------------------------------------------------------------- classifier_guidance.py
    ("classifier_guidance", CG + ["--batch-size", "0"], "--batch-size must be >= 1, got 0", None),
    ("classifier_guidance", CG + ["--scales", "1", "inf"], "must be finite numbers", None),
    ("classifier_guidance", CG + ["--image-size", "16"], "--image-size is 16 but the base model", None),
    ("classifier_guidance", CG + ["--ckpt", "{ddpm}", "--overwrite", "--image-size", "16"],
     "--image-size is 16 but the base model", "{ddpm}"),
    ("classifier_guidance", CG + ["--ckpt", "{ddpm}"], "already holds a checkpoint", "{ddpm}"),
    ("tools.classifier_guidance_sweep", CG + ["--ckpt", "{ddpm}"], "not a classifier_guidance.py classifier one", "{ddpm}"),
    ("classifier_guidance", CG + ["--base-ckpt", "{foreign}"], "holds a latent_diffusion.py VAE checkpoint", None),
    ("classifier_guidance", CG + ["--dataset", "{folder}"], "the data has 3 channel(s), the base model", None),
    # ----------------------------------------------------------------------------- latent_diffusion.py
    ("latent_diffusion", LD + ["--out", "{tmp}", "--sample-every", "0"], "--sample-every must be >= 1, got 0", None),
    ("latent_diffusion", LD + ["--out", "{tmp}", "--kl-weight", "-1"], "--kl-weight must be >= 0", None),
    ("latent_diffusion", LD + ["--out", "{tmp}", "--sample-only"], "not found; train first (drop --sample-only)", None),
    ("latent_diffusion", LD + ["--out", "{ddpm_out}"], "already holds a checkpoint; pass --resume", "{ddpm}"),
    ("latent_diffusion", LD + ["--out", "{ddpm_out}", "--resume"],
     "holds a ddpm_mnist.py UNet checkpoint, not a latent_diffusion.py latent UNet one", "{ddpm}"),
    ("latent_diffusion", LD + ["--out", "{tmp}", "--vae", "{ddpm}"],
     "holds a ddpm_mnist.py UNet checkpoint, not a latent_diffusion.py VAE one", "{ddpm}"),
    ("latent_diffusion", LD + ["--out", "{tmp}", "--vae", "{garbage}"], "cannot read checkpoint", "{garbage}"),
    ("latent_diffusion", LD + ["--out", "{tmp}", "--vae", "{keyless}"], "holds no checkpoint of this codebase", "{keyless}"),
    ("latent_diffusion", LD + ["--out", "{tmp}", "--dataset", "{broken}"], "cannot read the images", None),
    # ----------------------------------------------------------------------------- rectified_flow.py
    ("rectified_flow", RF + ["--out", "{tmp}", "--sample-every", "0"], "--sample-every must be >= 1, got 0", None),
    ("tools.flow_figures", RF + ["--out", "{tmp}", "--steps", "1", "0"], "--steps must be >= 1, got 0", None),
    ("rectified_flow", RF + ["--out", "{tmp}", "--sample-only"], "not found; train first (drop --sample-only)", None),
    ("rectified_flow", RF + ["--out", "{tmp}", "--resume"], "no checkpoint", None),
    ("rectified_flow", RF + ["--out", "{tmp}", "--space", "latent", "--vae", "{ddpm}"],
     "holds a ddpm_mnist.py UNet checkpoint, not a latent_diffusion.py VAE one", "{ddpm}"),
    # ----------------------------------------------------------------------------- deepcache.py
    ("deepcache", DC + ["--base-ckpt", "{foreign}"], "holds a latent_diffusion.py VAE checkpoint, not a ddpm_mnist.py UNet one", None),
    ("deepcache", DC + ["--base-ckpt", "{garbage}"], "cannot read checkpoint", None),
    ("deepcache", DC + ["--base-ckpt", "{tmp}/nope.pt"], "not found", None),
    ("deepcache", DC + ["--interval", "0"], "--interval must be >= 1", None),
    ("deepcache", DC + ["--branch", "4"], "--branch 4 is not in this UNet", None),
    ("deepcache", DC + ["--steps", "51"], "must be <= T = 50", None),
    ("tools.deepcache_sweep", DC + ["--sweep-steps", "10", "51"], "must be <= T = 50", None),
    ("tools.deepcache_sweep", DC + ["--repeats", "0"], "--repeats must be >= 1", None),
    ("deepcache", DC + ["--device", "foo"], "unknown --device", None),
    ("deepcache", DC + ["--base", "rf", "--base-ckpt", "{ddpm}"],
     "holds a ddpm_mnist.py UNet checkpoint, not a rectified_flow.py flow one", None),
    ("deepcache", DC + ["--base", "rf", "--base-ckpt", "{tmp}/nope.pt"], "python rectified_flow.py", None),
    ("deepcache", DC + ["--base", "rf", "--base-ckpt", "{garbage}"], "cannot read checkpoint", None),
    # ----------------------------------------------------------------------------- controlnet_canny.py
    ("controlnet_canny", CN + ["--out", "{tmp}", "--batch-size", "0"], "--batch-size must be >= 1", None),
    ("controlnet_canny", CN + ["--out", "{tmp}", "--low", "200", "--high", "100"], "--low < --high", None),
    ("controlnet_canny", CN + ["--out", "{file}"], "is a file", None),
    ("controlnet_canny", CN + ["--out", "{ddpm_out}"], "already holds a checkpoint; pass --resume", "{ddpm}"),
    ("controlnet_canny", CN + ["--out", "{ddpm_out}", "--sample-only"],
     "holds a ddpm_mnist.py UNet checkpoint, not a controlnet_canny.py ControlNet one", "{ddpm}"),
    ("controlnet_canny", CN + ["--out", "{tmp}", "--resume"], "--resume: there is no checkpoint", None),
    ("tools.controlnet_fidelity", CN + ["--out", "{tmp}"], "there is no ControlNet checkpoint", None),
    ("tools.controlnet_fidelity", CN + ["--out", "{ddpm_out}"],
     "holds a ddpm_mnist.py UNet checkpoint, not a controlnet_canny.py ControlNet one", "{ddpm}"),
    # ----------------------------------------------------------------------------- dit_cifar.py
    ("dit_cifar", DIT + ["--out", "{tmp}", "--model", "DiT-XXL/2"], "unknown model 'DiT-XXL/2'", None),
    ("dit_cifar", DIT + ["--out", "{tmp}", "--model", "DiT-T/3"], "patch size 3 does not divide the latent size 8", None),
    ("dit_cifar", DIT + ["--out", "{tmp}", "--batch-size", "0"], "--batch-size must be >= 1, got 0", None),
    ("dit_cifar", DIT + ["--out", "{tmp}", "--sample-only"], "not found", None),
    ("dit_cifar", DIT + ["--out", "{ddpm_out}"], "already holds a checkpoint; pass --resume", "{ddpm}"),
    ("dit_cifar", DIT + ["--out", "{tmp}", "--sample-only", "--ckpt", "{foreign}"],
     "holds a latent_diffusion.py VAE checkpoint, not a dit_cifar.py DiT one", "{foreign}"),
    ("dit_cifar", DIT + ["--out", "{ddpm_out}", "--resume", "--vae", "{ddpm}"], "not a latent_diffusion.py VAE one", "{ddpm}"),
    # ----------------------------------------------------------------------------- evaluate.py
    ("tools.evaluate", ["{empty}"] + EV, "holds an empty tensor", None),
    ("tools.evaluate", ["{nan}"] + EV, "the samples contain NaN (4 of 4 images): the sampler diverged", None),
    ("tools.evaluate", ["{float_labels}"] + EV, "must be integer class ids", None),
    ("tools.evaluate", ["{label12}"] + EV, "labels must be class ids 0..9 of mnist, got values in 0..12", None),
    ("tools.evaluate", ["{keyless}"] + EV, "holds no image tensor", None),
    ("tools.evaluate", ["{nan}"] + EV + ["--batch-size", "0"], "--batch-size must be >= 1, got 0", None),
    # ----------------------------------------------------------------------------- ddpm_mnist.py
    ("ddpm_mnist", DD + ["--batch-size", "0"], "--batch-size must be >= 1, got 0", None),
    ("ddpm_mnist", DD + ["--sample-every", "0"], "--sample-every must be >= 1, got 0", None),
    ("ddpm_mnist", DD + ["--lr=-0.001"], "--lr must be > 0, got -0.001", None),
    ("ddpm_mnist", DD + ["--ddim-steps", "21"], "--ddim-steps must be in 1..--T (20), got 21", None),
    ("ddpm_mnist", DD + ["--dataset", "imagenet"], "unknown dataset 'imagenet'", None),
    ("ddpm_mnist", DD + ["--dataset", "{broken}"], "cannot read the images", None),
    ("ddpm_mnist", DD + ["--resume"], "--resume: there is no checkpoint", None),
    ("ddpm_mnist", DD + ["--sample-only", "--ckpt", "{foreign}"],
     "holds a latent_diffusion.py VAE checkpoint, not a ddpm_mnist.py UNet one", "{foreign}"),
    ("ddpm_mnist", DD + ["--sample-only", "--ckpt", "{garbage}"], "cannot read checkpoint", None),
    ("ddpm_mnist", DD + ["--resume", "--ckpt", "{keyless}"], "holds no checkpoint of this codebase", "{keyless}"),
    ("ddpm_mnist", DD + ["--out", "{file}"], "is a file; pass a folder", None),
    ("ddpm_mnist", DD + ["--out", "{ddpm_out}"], "already holds a checkpoint; pass --resume", "{ddpm}"),
    ("ddpm_mnist", DR + ["--T", "30"], "--T is 30 but", "{ddpm}"),
    ("ddpm_mnist", DR + ["--schedule", "cosine"], "--schedule is cosine but", "{ddpm}"),
    ("ddpm_mnist", DD + ["--schedule", "cosine", "--cosine-clip", "1.5"], "--cosine-clip must be in (0, 0.999]", None),
    ("ddpm_mnist", DD + ["--cosine-clip", "0.9"], "--cosine-clip applies to --schedule cosine only", None),
    ("tools.ddpm_figures", DD + ["--pad-to", "20"], "--pad-to 20 is smaller than the images (28x28)", None),
    ("ddpm_mnist", DD + ["--base", "8", "--mults", "1", "2", "2", "2"], "use fewer levels, or --pad-to 32", None),
    # ----------------------------------------------------------------------------- compare_runs.py
    ("tools.compare_runs", ["--runs", "{tmp}"], "--runs needs two or more run folders", None),
    ("tools.compare_runs", ["--runs", "{tmp}/a", "{tmp}/missing"], "per_timestep.json' not found", None),
    # ----------------------------------------------------------------------------- toy_2d.py
    ("toy_2d", ["--out", "{tmp}", "--steps", "0"], "--steps must be >= 1, got 0", None),
    ("toy_2d", ["--out", "{tmp}", "--lr", "0"], "--lr must be > 0, got 0.0", None),
    ("toy_2d", ["--out", "{tmp}", "--beta-T", "1.5"], "need 0 < --beta-1 <= --beta-T < 1", None),
    ("toy_2d", ["--out", "{file}"], "is a file; pass a folder", None),
    # ----------------------------------------------------------------------------- benchmark.py
    ("tools.benchmark", ["--device", "cpu", "--repeats", "0"], "--repeats must be >= 1, got 0", None),
    ("tools.benchmark", ["--device", "cpu", "--train-steps", "0"], "--train-steps must be >= 1, got 0", None),
    ("tools.benchmark", ["--device", "foo"], "unknown --device 'foo'", None),
    ("tools.benchmark", ["--device", "cpu", "--preset", "mnist", "--image-size", "27"], "image size 27 is not divisible by 2^2", None),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, mnist_dir, image_folder, ddpm_ckpt):
    root = tmp_path_factory.mktemp("bad")
    (root / "ddpm_out").mkdir()
    shutil.copy(ddpm_ckpt, root / "ddpm_out" / "ckpt.pt")
    (root / "file.txt").write_text("not a folder")
    checkpoints.save(str(root / "vae.pt"), kind="latent_diffusion.py VAE", net={"channels": 1},
                     model={}, scale=1.0)
    torch.save({"hello": 1}, root / "keyless.pt")
    (root / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(2000))
    torch.save(torch.zeros(0, 1, 28, 28), root / "empty.pt")
    torch.save(torch.full((4, 1, 28, 28), float("nan")), root / "nan.pt")
    torch.save({"x": torch.zeros(4, 1, 28, 28), "y": torch.tensor([0., 1., 2., 3.])}, root / "float_labels.pt")
    torch.save({"x": torch.zeros(4, 1, 28, 28) - 0.5, "y": torch.tensor([0, 1, 2, 12])}, root / "label12.pt")
    broken = root / "broken"
    shutil.copytree(image_folder, broken)
    for split in ("train", "test"):                           # a truncated JPEG in each split
        jpg = sorted((broken / split).rglob("*.jpg"))[0]
        jpg.write_bytes(jpg.read_bytes()[:100])
    return dict(mnist=mnist_dir, folder=image_folder, ddpm=str(root / "ddpm_out" / "ckpt.pt"),
                ddpm_out=str(root / "ddpm_out"), file=str(root / "file.txt"), foreign=str(root / "vae.pt"),
                keyless=str(root / "keyless.pt"), garbage=str(root / "garbage.pt"), broken=str(broken),
                **{k: str(root / f"{k}.pt") for k in ("empty", "nan", "float_labels", "label12")})


@pytest.mark.parametrize("script, argv, message, keep", CASES,
                         ids=[f"{c[0]}: {c[2]}" for c in CASES])
def test_bad_input_is_one_line(script, argv, message, keep, files, tmp_path):
    names = dict(files, tmp=str(tmp_path / "out"))
    argv = [a.format(**names) for a in argv]
    keep = keep.format(**names) if keep else None
    before = digest(keep) if keep else None
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).main(argv)
    text = str(e.value)
    assert text.startswith("error:") and "\n" not in text, text
    assert message in text, text
    if keep:
        assert digest(keep) == before, f"{keep} changed"


def test_at_least_forty_cases_over_every_script():
    scripts = {c[0] for c in CASES}
    assert len(CASES) >= 40 and len(scripts) >= 10, (len(CASES), sorted(scripts))
