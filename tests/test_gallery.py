"""The gallery (gallery.py) end to end at tiny sizes: every part runs its scripts, and
docs/results.md gets one row per lesson, with its figures copied under docs/gallery/."""
import importlib
import json
import os

import pytest

from tools import gallery


def test_the_smoke_gallery_writes_every_row(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # runs/ and evaluate.py's checkpoints/ land here
    runs = gallery.main(["--profile", "smoke", "--data-dir", mnist_dir, "--no-download", "--device", "cpu",
                         "--docs", "docs"])
    assert list(runs) == list(gallery.PARTS)             # exercises run only when named
    text = open("docs/results.md").read()
    for part, row in runs.items():
        assert f"| {row['lesson']} | smoke |" in text, part
        assert row["result"] and row["details"].startswith("|"), part
        for figure in row["figures"]:
            assert os.path.getsize(os.path.join("docs", figure)) > 50, figure
    assert json.load(open("docs/gallery/results_smoke.json")).keys() == runs.keys()
    # --only runs one part again and keeps the others' rows
    again = gallery.main(["--profile", "smoke", "--data-dir", mnist_dir, "--no-download", "--device", "cpu",
                          "--docs", "docs", "--only", "deepcache_ddim"])
    assert again.keys() == runs.keys() and again["ddpm"] == runs["ddpm"]
    extra = gallery.main(["--profile", "smoke", "--data-dir", mnist_dir, "--no-download", "--device", "cpu",
                          "--docs", "docs", "--only", "exercises", "cfg_input", "fast_sampling", "gan"])
    assert len(extra["exercises"]["figures"]) == 2 and len(extra["fast_sampling"]["figures"]) == 3
    assert extra["cfg_input"]["lesson"] == "cfg.py --cond input" and "smoke_cfg_input_tradeoff.png" in str(
        extra["cfg_input"]["figures"]) and extra["cfg_input"]["figures"] != extra["cfg"]["figures"]
    assert len(extra["gan"]["figures"]) == 2 and "GAN" in extra["gan"]["details"]
    assert "exercises" in open("docs/results.md").read()
    # --rescore: the same runs scored again, nothing trained; the rows keep their training times
    ckpts = [os.path.join("runs", "gallery", "smoke", *p, "ckpt.pt") for p in (("ddpm",), ("exercises", "eps"))]
    stamps = [os.stat(c).st_mtime_ns for c in ckpts]
    rescored = gallery.main(["--profile", "smoke", "--data-dir", mnist_dir, "--no-download", "--device", "cpu",
                             "--docs", "docs", "--only", "ddpm", "exercises", "--rescore"])
    assert [os.stat(c).st_mtime_ns for c in ckpts] == stamps
    for part in ("ddpm", "exercises"):
        assert rescored[part]["train_s"] == extra[part]["train_s"] and rescored[part]["result"] == extra[part]["result"]
        assert rescored[part]["trained"] == extra[part]["date"]
    with pytest.raises(SystemExit, match="--rescore cannot score the gan part"):
        gallery.main(["--profile", "smoke", "--data-dir", mnist_dir, "--no-download", "--only", "gan", "--rescore"])
    # --resume: the gan part scores its finished GAN runs again instead of training them over
    ckpt = os.path.join("runs", "gallery", "smoke", "gan", "gan_0", "ckpt.pt")
    written = os.stat(ckpt).st_mtime_ns
    resumed = gallery.main(["--profile", "smoke", "--data-dir", mnist_dir, "--no-download", "--device", "cpu",
                            "--docs", "docs", "--only", "gan", "--resume"])
    assert os.stat(ckpt).st_mtime_ns == written
    gan_rows = lambda details: [line for line in details.splitlines() if line.startswith("| GAN |")]  # noqa: E731
    assert gan_rows(resumed["gan"]["details"]) == gan_rows(extra["gan"]["details"])


def test_every_recipe_parses_with_its_scripts_flags():
    import common
    scripts = dict(ddpm="tools.ddpm_figures", cfg="cfg", cg="classifier_guidance", controlnet="controlnet_canny",
                   deepcache="tools.deepcache_sweep", latent="tools.latent_figures", rf="tools.flow_figures", exercise="tools.ddpm_figures",
                   fast="tools.fast_sampling_figures", gan="tools.gan_figures", dit="tools.dit_figures")
    scripts["controlnet_eval"] = "tools.controlnet_fidelity"          # a key with a script of its own
    for profile, recipe in gallery.RECIPES.items():
        for key, argv in recipe.items():
            if key == "gan_chunks":
                continue
            common.parse_config(importlib.import_module(scripts.get(key, scripts[key.split("_")[0]])).Config, argv)


def test_the_cifar_parts_need_no_mnist(image_folder, tmp_path, monkeypatch):
    """ddpm_cifar and dit: pixel DDPM and the DiT on an image folder, scored in the CPU metric's features;
    their rows name their own data, and no MNIST is read (there is none under --data-dir)."""
    monkeypatch.chdir(tmp_path)
    runs = gallery.main(["--profile", "smoke", "--data-dir", str(tmp_path / "nothing"), "--no-download",
                         "--device", "cpu", "--docs", "docs", "--cifar", image_folder, "--only", "ddpm_cifar", "dit"])
    assert list(runs) == ["ddpm_cifar", "dit"]
    for row in runs.values():
        assert row["data"] == "CIFAR-10 (JPEG q75)" and "FD-CNN" in row["result"] and row["figures"]
    assert "at w = 1, 3, 5, 7.5 (chance 0.33)" in runs["dit"]["result"]   # the fixture's 3 classes
    assert "| dit_cifar.py | smoke |" in open("docs/results.md").read()


def test_the_benchmark_counts_a_training_steps_flops_and_profiles_it(tmp_path):
    """benchmark.py's FLOPs per training image are forward and backward (about 3 forward passes: the backward
    computes each layer's input and weight gradients), which gives the fraction of the GPU's peak; --trace
    writes where a step's time went."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    import ddpm_mnist
    from tools import benchmark
    trace = tmp_path / "trace.txt"
    res = benchmark.main(["--device", "cpu", "--preset", "tiny", "--batch-size", "8", "--train-steps", "1",
                          "--repeats", "1", "--warmup", "0", "--T", "10", "--ddim-steps", "2", "--sample-batch", "2",
                          "--trace", str(trace), "--trace-steps", "1", "--peak-tflops", "1"])
    model = ddpm_mnist.UNet(28, 1, **ddpm_mnist.PRESETS["tiny"])
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        model(torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long))
    assert 2.5 < res["flops_per_image"] / forward.get_total_flops() <= 3.0
    assert res["peak_fraction"] == pytest.approx(res["flops_per_image"] * res["images_per_s"] / 1e12)
    assert 0.3 < res["matrix_share"] < 1 and "convolution_backward" in trace.read_text()


def test_the_gpu_script_names_real_parts():
    """tools/gpu_part.sh (the GPU results, run on a lent machine, rehearsed with PROFILE=smoke) parses as bash,
    and every gallery part and recipe it names exists: a renamed part would cost a GPU session."""
    import re
    import subprocess
    path = os.path.join(os.path.dirname(gallery.__file__), "gpu_part.sh")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    text = open(path).read()
    parts = [p for line in re.findall(r"^\s*(?:\d\) )?gallery ([\w ]+?)\s*(?:;;)?$", text, re.M) for p in line.split()]
    recipes = re.findall(r"\$\(recipe (\w+)\)", text)
    assert len(parts) >= 10 and recipes
    assert set(parts) <= set(gallery.PARTS + gallery.EXTRA), set(parts) - set(gallery.PARTS + gallery.EXTRA)
    assert all(r in gallery.RECIPES[p] for r in recipes for p in ("gpu", "smoke")), recipes
