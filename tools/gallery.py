"""The gallery: every lesson trained and judged with one command. Each lesson's key figures are
copied under docs/gallery/, and one table, docs/results.md, gives for every lesson the hardware,
the data, the training time and the measured result (evaluate.py's FD and class accuracy, or the
lesson's own measurement: edge F1, error against many steps, PSNR/SSIM against the uncached run).

    python -m tools.gallery --profile cpu --data-dir ../shared/data    # every lesson's CPU recipe: 76 min on 2 cores
    python -m tools.gallery --profile gpu --data-dir ../shared/data --only ddpm   # the defaults on one GPU, a part
    python -m tools.gallery --profile cpu --data-dir ../shared/data --only cfg latent   # some parts again

Profiles:
- `cpu`: each lesson's CPU recipe (below), settings chosen so that the network learns in minutes on
  a 2-core CPU with MNIST-8k: ddpm_mnist.py trains in 17 minutes, and the nine default parts took
  76 minutes in all, evaluation included (measured on a 2-core AMD EPYC).
- `gpu`: each script's defaults, the settings meant for one GPU, scored on more samples.
- `smoke`: tiny sizes, a few steps: the test suite's check that every part runs and writes its rows.
Every part runs the scripts themselves, through their `main(argv)` with the flags listed here, so
each recipe is a command a reader can type. Six extra parts run only when named in --only: the
course exercises' comparisons (exercises), cfg.py with the label as input maps (cfg_input, the cfg
part's recipe and scoring), fast_sampling.py's solvers against network calls,
gan_mnist.py against the DDPM recipe (gan; --resume continues its GAN runs after an interruption), and
CIFAR-10 from --cifar: pixel DDPM (ddpm_cifar, 26 min on 2 cores) and the DiT on its VAE's latents
(dit, 33 min: 28.7 training, 4.0 scoring), both scored by evaluate.py's CNN on a CPU:

    python -m tools.gallery --profile cpu --cifar /tmp/cifar10 --only ddpm_cifar dit   # the JPEG copy, unzipped
Parts run in the order below; a part that builds on an earlier one's model (classifier guidance,
ControlNet, DeepCache and fast sampling on the DDPM base, DeepCache on the reflowed flow, latent
flow on the VAE) finds it under --runs. The results of each profile are kept in
docs/gallery/results_PROFILE.json, so `--only` updates its parts and keeps the others;
docs/results.md is written again from all profiles after every part. `--rescore` scores the runs
already under --runs again without training them (after a change to evaluate.py or its classifier):

    python -m tools.gallery --profile cpu --data-dir ../shared/data --rescore --only ddpm cfg exercises
"""
from __future__ import annotations

import importlib
import datetime
import glob
import json
import os
import platform
import shutil
from dataclasses import dataclass, field

import torch

import common
from tools import compare_runs, report

PARTS = ("ddpm", "cfg", "classifier_guidance", "controlnet", "deepcache_ddim", "latent", "rf_pixel", "rf_latent",
         "deepcache_rf")
EXTRA = ("exercises", "cfg_input", "fast_sampling", "gan", "ddpm_cifar", "dit")   # run only when named in --only


@dataclass
class Config:
    profile: str = field(default="cpu", metadata={"choices": ["cpu", "gpu", "smoke"],
                         "help": "cpu: the CPU recipes; gpu: the scripts' defaults; smoke: tiny sizes"})
    only: tuple[str, ...] = field(default=(), metadata={"choices": list(PARTS + EXTRA), "help": "run these parts "
                                  "only (default: all but the extras exercises, fast_sampling and gan, in order); a part "
                                  "needs the runs of the parts it builds on"})
    data_dir: str = field(default="data", metadata={"help": "root of the torchvision datasets (MNIST)"})
    cifar: str = field(default="cifar10", metadata={"help": "the data of the CIFAR parts (ddpm_cifar, dit): cifar10 "
                       "(torchvision, under --data-dir) or a folder ROOT/{train,test}/<class>/<image>"})
    download: bool = field(default=True, metadata={"help": "download MNIST when missing"})
    runs: str = field(default="", metadata={"help": "folder of the runs (default runs/gallery/PROFILE)"})
    docs: str = field(default="docs", metadata={"help": "where results.md and gallery/ go"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    resume: bool = field(default=False, metadata={"help": "the gan part continues the GAN runs it finds under "
                         "--runs (--resume; a finished one is scored again) instead of starting them over: "
                         "they keep their training time in the checkpoint"})
    rescore: bool = field(default=False, metadata={"help": "score the runs already under --runs again and train "
                          "nothing (after a change to evaluate.py or its classifier); a row keeps the training time "
                          "it recorded; not the gan part, whose FD curve is measured while it trains"})


# ----------------------------------------------------------------------------- the recipes

# The CPU recipe's pixel UNet: ddpm_mnist.py's tiny preset (0.22M parameters, no dropout) at a higher
# learning rate than the GPU defaults; every lesson that trains a pixel UNet on the CPU uses it.
TINY = ["--preset", "tiny", "--lr", "1e-3", "--warmup-steps", "200"]
RECIPES = {  # profile -> the flags of each command (a part adds --out, --data-dir and --device)
    "cpu": dict(
        ddpm=TINY + ["--epochs", "50", "--no-ddpm-grid", "--sweep-steps", "0"],
        ddpm_eval=["--eval", "2000", "--no-ddpm-grid", "--sweep-steps", "50"],
        cfg=TINY + ["--epochs", "15", "--scales", "3", "--n-per-class", "8"],
        cfg_eval=["--scales", "0", "1", "3", "5", "--n-per-class", "20", "--eval", "500"],
        cg=TINY + ["--epochs", "5", "--scales", "3", "--samplers", "ddim", "--n-per-class", "4"],
        cg_eval=["--scales", "0", "1", "3", "10", "--samplers", "ddim", "--n-per-class", "10", "--eval", "500"],
        controlnet=["--epochs", "5", "--lr", "1e-3"],
        controlnet_eval=["--n-eval", "500"],
        deepcache=["--sweep-steps", "10", "50", "--sweep-intervals", "1", "2", "3", "5", "10", "--batch-size", "64",
                   "--warmup", "1", "--repeats", "3"],
        latent=["--vae-epochs", "8", "--vae-base", "16", "--unet-base", "32", "--epochs", "40", "--batch-size", "128",
                "--lr", "2e-3", "--warmup-steps", "200", "--n-samples", "16", "--no-ddpm"],
        latent_eval=["--eval", "2000", "--no-ddpm"],
        rf_pixel=TINY + ["--epochs", "20", "--reflow-epochs", "10", "--n-pairs", "4000", "--pair-steps", "50",
                         "--n-samples", "16"],
        rf_latent=["--unet-base", "32", "--epochs", "25", "--batch-size", "128", "--lr", "2e-3", "--warmup-steps", "200",
                   "--reflow-epochs", "10", "--n-pairs", "8000", "--pair-steps", "40", "--n-samples", "16"],
        rf_eval=["--steps", "1", "2", "4", "8", "50", "--eval", "1000"],
        exercise=TINY + ["--epochs", "5", "--no-ddpm-grid", "--sweep-steps", "50", "--eval", "500"],
        fast=["--nfe", "5", "10", "20", "50", "--eval", "2000", "--no-reference"],
        gan=["--epochs", "30", "--eval", "2000", "--eval-every", "5"], gan_chunks=(10, 25, 50),
        ddpm_cifar=TINY + ["--epochs", "8", "--no-ddpm-grid", "--sweep-steps", "0"],
        ddpm_cifar_eval=["--eval", "1000", "--no-ddpm-grid", "--sweep-steps", "50"],
        dit=["--vae-base", "16", "--vae-epochs", "3", "--model", "DiT-XS/2", "--epochs", "30", "--batch-size", "128",
             "--lr", "6e-4", "--warmup-steps", "200", "--ema-decay", "0.999", "--sample-every", "10"],
        dit_eval=["--eval", "1000"],
    ),
    "gpu": dict(
        ddpm=[], ddpm_eval=["--eval", "2000", "--sweep-steps", "10", "20", "50", "100"],
        cfg=[], cfg_eval=["--scales", "0", "1", "3", "5", "7.5", "--eval", "2000"],
        cg=[], cg_eval=["--eval", "1000"], controlnet=[], controlnet_eval=[], deepcache=[],
        latent=[], latent_eval=["--eval", "2000"], rf_pixel=[], rf_latent=[], rf_eval=["--eval", "2000"],
        exercise=["--no-ddpm-grid", "--sweep-steps", "50", "--eval", "2000"],
        fast=["--nfe", "5", "10", "20", "50", "--eval", "2000", "--stochastic"],
        gan=["--epochs", "30", "--eval", "2000", "--eval-every", "5"], gan_chunks=(10, 20, 40),
        ddpm_cifar=[], ddpm_cifar_eval=["--eval", "2000", "--no-ddpm-grid", "--sweep-steps", "50"],
        dit=[], dit_eval=["--eval", "2000"],
    ),
    "smoke": dict(
        ddpm=["--preset", "tiny", "--T", "20", "--epochs", "1", "--batch-size", "16", "--n-samples", "4",
              "--ddim-steps", "2", "--no-ddpm-grid", "--sweep-steps", "0"],
        ddpm_eval=["--eval", "8", "--no-ddpm-grid", "--sweep-steps", "2", "--n-samples", "4", "--ddim-steps", "2"],
        cfg=["--preset", "tiny", "--T", "20", "--epochs", "1", "--batch-size", "16", "--ddim-steps", "2",
             "--scales", "3", "--n-per-class", "2"],
        cfg_eval=["--scales", "0", "3", "--n-per-class", "2", "--ddim-steps", "2", "--eval", "10"],
        cg=["--preset", "tiny", "--epochs", "1", "--batch-size", "16", "--ddim-steps", "2", "--scales", "2",
            "--samplers", "ddim", "--n-per-class", "2"],
        cg_eval=["--scales", "0", "2", "--samplers", "ddim", "--n-per-class", "2", "--ddim-steps", "2", "--eval", "4"],
        controlnet=["--epochs", "1", "--batch-size", "16", "--ddim-steps", "2", "--n-digits", "2",
                    "--samples-per-edge", "2"],
        controlnet_eval=["--ddim-steps", "2", "--n-digits", "2", "--samples-per-edge", "2", "--n-eval", "4"],
        deepcache=["--batch-size", "2", "--warmup", "0", "--repeats", "1", "--sweep-steps", "2", "--sweep-intervals",
                   "1", "2"],
        latent=["--vae-epochs", "1", "--vae-base", "8", "--unet-base", "8", "--unet-res", "1", "--T", "20",
                "--epochs", "1", "--batch-size", "32", "--n-samples", "2", "--ddim-steps", "2"],
        latent_eval=["--n-samples", "2", "--ddim-steps", "2", "--eval", "4"],
        rf_pixel=["--preset", "tiny", "--epochs", "1", "--reflow-epochs", "1", "--n-pairs", "8", "--pair-steps", "2",
                  "--n-samples", "2", "--batch-size", "32"],
        rf_latent=["--unet-base", "8", "--unet-res", "1", "--epochs", "1", "--reflow-epochs", "1", "--n-pairs", "8",
                   "--pair-steps", "2", "--n-samples", "2", "--batch-size", "32"],
        rf_eval=["--steps", "1", "2", "--n-samples", "2", "--eval", "4"],
        exercise=["--preset", "tiny", "--T", "20", "--epochs", "1", "--batch-size", "16", "--n-samples", "4",
                  "--ddim-steps", "2", "--no-ddpm-grid", "--sweep-steps", "2", "--eval", "4"],
        fast=["--nfe", "2", "4", "--n-samples", "2", "--eval", "4"],
        gan=["--epochs", "2", "--batch-size", "16", "--width", "8", "--n-samples", "4", "--eval", "8",
             "--eval-every", "1"], gan_chunks=(1,),
        ddpm_cifar=["--preset", "tiny", "--T", "20", "--epochs", "1", "--batch-size", "16", "--n-samples", "4",
                    "--ddim-steps", "2", "--no-ddpm-grid", "--sweep-steps", "0"],
        ddpm_cifar_eval=["--eval", "8", "--no-ddpm-grid", "--sweep-steps", "2", "--n-samples", "4", "--ddim-steps", "2"],
        dit=["--model", "DiT-T/2", "--vae-base", "16", "--vae-epochs", "1", "--epochs", "1", "--batch-size", "12",
             "--T", "50", "--ddim-steps", "2", "--n-per-class", "2"],
        dit_eval=["--ddim-steps", "2", "--n-per-class", "2", "--eval", "6"],
    ),
}
for _recipe in RECIPES.values():                 # the second conditioning: the cfg recipe, the label as input maps
    _recipe["cfg_input"] = _recipe["cfg"] + ["--cond", "input"]


# ----------------------------------------------------------------------------- running the scripts


class Gallery:
    """Runs the scripts of one profile: `run` calls a script's main with the profile's data and
    device flags and times it; `figures` copies a run's PNGs into docs/gallery/."""

    def __init__(self, cfg: Config):
        self.cfg, self.recipe = cfg, RECIPES[cfg.profile]
        self.runs = cfg.runs or os.path.join("runs/gallery", cfg.profile)
        self.device = common.get_device(cfg.device)
        self.flags = ["--data-dir", cfg.data_dir, "--device", str(self.device)] + ([] if cfg.download else
                                                                                   ["--no-download"])

    def cifar_data(self) -> str:
        """The CIFAR parts' data, as results.md names it: a folder of JPEG files is the shared q75 copy."""
        jpeg = glob.glob(os.path.join(self.cfg.cifar, "train", "*", "*.jpg"))[:1]
        return "CIFAR-10 (JPEG q75)" if jpeg else "CIFAR-10"

    def out(self, part: str, *sub: str) -> str:
        return os.path.join(self.runs, part, *sub)

    def run(self, script: str, *argv: str):
        """-> (script.main(argv + data and device flags), wall seconds)"""
        argv = [*argv, *self.flags]
        command = f"-m {script}" if script.startswith("tools.") else f"{script}.py"   # a companion, or a lesson
        print(f"\n$ python {command} {' '.join(argv)}", flush=True)
        main = importlib.import_module(script).main
        return report.timed(self.device, lambda: main(argv))

    def train(self, script: str, part: str, *argv: str):
        """A training command into runs/PART (replacing the gallery's earlier run of it); with --rescore
        nothing runs: -> (None, None), and the row keeps its recorded training time."""
        if self.cfg.rescore:
            common.check(os.path.isdir(self.out(part)), f"--rescore: there is no run '{self.out(part)}' to score; "
                         "train it first (leave --rescore out)")
            return None, None
        return self.run(script, *self.recipe[part], *argv, "--out", self.out(part), "--overwrite")

    def figures(self, part: str, *patterns: str) -> list[str]:
        """Copy the files runs/PART/PATTERN to docs/gallery/PROFILE_PART_NAME; -> their paths under docs/."""
        folder = os.path.join(self.cfg.docs, "gallery")
        os.makedirs(folder, exist_ok=True)
        paths = []
        for path in (p for pattern in patterns for p in sorted(glob.glob(self.out(part, pattern)))):
            name = f"{self.cfg.profile}_{part}_{os.path.relpath(path, self.out(part)).replace(os.sep, '_')}"
            shutil.copyfile(path, os.path.join(folder, name))
            paths.append(f"gallery/{name}")
        return paths


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats with 3 significant digits."""
    return report.markdown_table(header, rows, ".3g")


def scored(rows: list[dict], *keys: str) -> str:
    """evaluate.score_sweep's rows (plus the given extra keys first) as a markdown table."""
    return table([*keys, "sampler", "steps", "seconds", rows[0].get("metric", "FD-LeNet") if rows else "FD-LeNet",
                  "classes found, smallest-largest share"],
                 [[r[k] for k in keys] + [r["sampler"], r["steps"], round(r["seconds"], 1), round(r["fd"], 2),
                                          r["classes"]] for r in rows])


# ----------------------------------------------------------------------------- the parts, in order


def ddpm(g: Gallery) -> dict:
    """ddpm_mnist.py: train, then FD-LeNet of the recipe's samplers with x0 clipping (the default),
    and of the last DDIM step count without it, from the same noise."""
    _, train_s = g.train("tools.ddpm_figures", "ddpm")          # ddpm_mnist.py's training, then every figure
    ckpt, steps = g.out("ddpm", "ckpt.pt"), "2" if g.cfg.profile == "smoke" else "50"
    clip, eval_s = g.run("tools.ddpm_figures", "--sample-only", "--ckpt", ckpt, "--out", g.out("ddpm"),
                         *g.recipe["ddpm_eval"])
    plain, _ = g.run("tools.ddpm_figures", "--sample-only", "--ckpt", ckpt, "--out", g.out("ddpm", "no_clip"),
                     *g.recipe["ddpm_eval"], "--no-clip", "--no-ddpm-grid", "--sweep-steps", steps)
    ddim = next(r for r in clip["eval"] if r["sampler"] == "DDIM" and str(r["steps"]) == steps)
    result = (f"FD-LeNet {ddim['fd']:.1f} with DDIM-{steps}, x0 clipped ({plain['eval'][0]['fd']:.1f} without); "
              f"{ddim['classes']}; test eps-MSE {clip['test_loss']:.4f}")
    rows = [dict(r, clip="yes") for r in clip["eval"]] + [dict(r, clip="no") for r in plain["eval"]]
    return dict(lesson="ddpm_mnist.py", train_s=train_s, eval_s=eval_s, result=result,
                details=scored(rows, "clip"), figures=g.figures("ddpm", "ddim*_8x8.png", "loss_per_timestep.png", "loss.png",
                                                               "samples_epoch005.png", "samples_epoch025.png"))


def cfg(g: Gallery, part: str = "cfg") -> dict:
    """cfg.py: train, then (cfg_sweep.py) class accuracy, within-class diversity and FD-LeNet against w."""
    _, train_s = g.train("cfg", part)
    rows, eval_s = g.run("tools.cfg_sweep", "--out", g.out(part), *g.recipe["cfg_eval"])
    at = {r[0]: r for r in rows}
    w = 3.0 if 3.0 in at else rows[-1][0]
    result = (f"class accuracy {at[w][2]:.3f} at w = {w:g} ({rows[0][2]:.3f} at w = {rows[0][0]:g}, {rows[-1][2]:.3f} "
              f"at w = {rows[-1][0]:g}); diversity {rows[0][1]:.2f} to {rows[-1][1]:.2f} (real = 1)")
    return dict(lesson="cfg.py" if part == "cfg" else "cfg.py --cond input", train_s=train_s, eval_s=eval_s,
                result=result, details=table(["w", "diversity (real = 1)", "class accuracy (LeNet)", "FD-LeNet"], rows),
                figures=g.figures(part, "cfg_w*.png", "tradeoff.png"))


def cfg_input(g: Gallery) -> dict:
    """cfg.py with the label as input maps instead of cross-attention: the cfg part's recipe and scoring."""
    return cfg(g, "cfg_input")


def classifier_guidance(g: Gallery) -> dict:
    """classifier_guidance.py on the ddpm part's base, then (classifier_guidance_sweep.py) the noisy
    classifier's accuracy per t and guided samples' LeNet accuracy against the scale."""
    base = ["--base-ckpt", g.out("ddpm", "ckpt.pt")]
    _, train_s = g.train("classifier_guidance", "cg", *base)
    res, eval_s = g.run("tools.classifier_guidance_sweep", *base, "--out", g.out("cg"), *g.recipe["cg_eval"])
    per_t, rows = res["accuracy_per_t"], res["rows"]
    result = (f"noisy classifier: test accuracy {per_t[0][1]:.3f} at t = {per_t[0][0]}, {per_t[len(per_t) // 2][1]:.3f} "
              f"at t = {per_t[len(per_t) // 2][0]}, {per_t[-1][1]:.3f} at t = {per_t[-1][0]}; guided LeNet accuracy "
              + ", ".join(f"{r[4]:.3f} (s = {r[1]:g})" for r in rows))
    details = table(["t"] + [str(t) for t, _ in per_t], [["accuracy"] + [a for _, a in per_t]]) + "\n\n" + table(
        ["sampler", "scale s", "diversity (real = 1)", "accuracy by p_phi", "accuracy (LeNet)", "FD-LeNet"], rows)
    return dict(lesson="classifier_guidance.py", train_s=train_s, eval_s=eval_s, result=result, details=details,
                figures=g.figures("cg", "guided_ddim_s*.png", "accuracy_per_t.png", "accuracy_vs_scale.png"))


def controlnet(g: Gallery) -> dict:
    """controlnet_canny.py on the ddpm part's base, then controlnet_fidelity.py: edge F1 against
    unconditional samples."""
    base = ["--base-ckpt", g.out("ddpm", "ckpt.pt")]
    _, train_s = g.train("controlnet_canny", "controlnet", *base)
    res, eval_s = g.run("tools.controlnet_fidelity", *base, "--out", g.out("controlnet"), *g.recipe["controlnet_eval"])
    c, u, r = res["ControlNet"], res["unconditional"], res["another real digit"]
    result = f"edge F1 (1 px) {c['f1']:.3f} against {u['f1']:.3f} unconditional (exact: {c['f1_exact']:.3f} / " \
             f"{u['f1_exact']:.3f}); real digits on another digit's edges: {r['f1']:.3f}"
    details = table(["samples", "precision", "recall", "F1", "F1 exact"],
                    [[k, v["precision"], v["recall"], v["f1"], v["f1_exact"]] for k, v in res.items()])
    return dict(lesson="controlnet_canny.py", train_s=train_s, eval_s=eval_s, result=result, details=details,
                figures=g.figures("controlnet", "control.png"))


def deepcache_part(g: Gallery, base: str, ckpt: str) -> dict:
    part = f"deepcache_{base}"
    res, eval_s = g.run("tools.deepcache_sweep", "--base", base, "--base-ckpt", ckpt, *g.recipe["deepcache"],
                        "--out", g.out(part))
    rows = res["sweep"]
    top = max(r["steps"] for r in rows)
    result = "; ".join(f"{r['steps']} steps, interval {r['interval']}: {r['speedup']:.2f}x, PSNR {r['psnr']:.1f} dB, "
                       f"SSIM {r['ssim']:.3f}" for r in rows if r["steps"] == top and r["interval"] in (2, 5, 10))
    details = table(["steps", "interval", "full steps", "speedup", "theory", "PSNR dB", "SSIM"],
                    [[r["steps"], r["interval"], r["K"], round(r["speedup"], 2), round(r["theory"], 2),
                      round(r["psnr"], 1), round(r["ssim"], 4)] for r in rows])
    return dict(lesson=f"deepcache.py --base {base}", train_s=0.0, eval_s=eval_s, result=result or "-",
                details=details, figures=g.figures(part, "quality.png", "tradeoff.png", "grid_steps*.png"))


def deepcache_ddim(g: Gallery) -> dict:
    """deepcache_sweep.py over the ddpm part's UNet and DDIM: speedup and PSNR/SSIM against the interval."""
    return deepcache_part(g, "ddim", g.out("ddpm", "ckpt.pt"))


def latent(g: Gallery) -> dict:
    """latent_diffusion.py: VAE and latent DDPM, then (latent_figures.py) FD-LeNet of decoded DDIM and DDPM samples."""
    _, train_s = g.train("tools.latent_figures", "latent")      # latent_diffusion.py's training, then every figure
    res, eval_s = g.run("tools.latent_figures", "--sample-only", "--out", g.out("latent"), *g.recipe["latent_eval"])
    result = ", ".join(f"FD-LeNet {r['fd']:.1f} with {r['sampler']}-{r['steps']} ({r['classes']})" for r in res["eval"])
    result += f"; VAE test MSE {res['recon_mse']:.4f}, scale factor {res['scale']:.3f}"
    grid = "ddim.png" if "--no-ddpm" in g.recipe["latent_eval"] else "ddim_vs_ddpm.png"   # the samplers it ran
    return dict(lesson="latent_diffusion.py", train_s=train_s, eval_s=eval_s, result=result,
                details=scored(res["eval"]), figures=g.figures("latent", grid, "vae_reconstructions.png"))


def rf(g: Gallery, space: str, *extra: str) -> dict:
    part = f"rf_{space}"
    _, train_s = g.train("tools.flow_figures", part, "--space", space, *extra)   # rectified_flow.py's training, figures
    res, eval_s = g.run("tools.flow_figures", "--sample-only", "--space", space, *extra, "--out", g.out(part),
                        *g.recipe["rf_eval"])
    err = {(r["flow"], r["steps"]): r for r in res["steps"]}
    fd = {(r["sampler"], r["steps"]): r["fd"] for r in res["eval"]}
    most = max(s for _, s in fd)
    result = (f"FD-LeNet at {most} Euler steps {fd['Flow-1', most]:.1f} (Flow-1), {fd['Flow-2', most]:.1f} (Flow-2); at "
              f"1 step {fd['Flow-1', 1]:.1f} / {fd['Flow-2', 1]:.1f}; error to the 100-step solution at 1 step "
              f"{err['Flow-1', 1]['mse']:.4f} / {err['Flow-2', 1]['mse']:.4f}; straightness S "
              f"{err['Flow-1', 1]['S']:.4f} / {err['Flow-2', 1]['S']:.4f}")
    details = table(["flow", "Euler steps", "MSE to its many-step solution", "straightness S", "FD-LeNet"],
                    [[r["flow"], r["steps"], round(r["mse"], 5), round(r["S"], 4), round(fd[r["flow"], r["steps"]], 2)]
                     for r in res["steps"] if (r["flow"], r["steps"]) in fd])
    return dict(lesson=f"rectified_flow.py --space {space}", train_s=train_s, eval_s=eval_s, result=result,
                details=details, figures=g.figures(part, "steps_comparison.png", "steps_error.png"))


def rf_pixel(g: Gallery) -> dict:
    """rectified_flow.py in pixel space: Flow-1, reflow pairs, Flow-2; (flow_figures.py) FD and error against steps."""
    return rf(g, "pixel")


def rf_latent(g: Gallery) -> dict:
    """rectified_flow.py in the latent part's VAE space."""
    return rf(g, "latent", "--vae", g.out("latent", "vae.pt"))


def deepcache_rf(g: Gallery) -> dict:
    """deepcache_sweep.py over the reflowed pixel flow (Flow-2) and its Euler steps."""
    return deepcache_part(g, "rf", g.out("rf_pixel", "flow2.pt"))


def exercises(g: Gallery) -> dict:
    """The course exercises of ddpm_mnist.py, overlaid by compare_runs.py: eps, x0 and v prediction,
    and the linear, cosine and cosine-clipped-at-0.95 schedules, each a short run of the recipe."""
    flags = {"eps": [], "x0": ["--predict", "x0"], "v": ["--predict", "v"], "cosine": ["--schedule", "cosine"],
             "cosine 0.95": ["--schedule", "cosine", "--cosine-clip", "0.95"]}
    folder = {name: g.out("exercises", name.replace(" ", "_")) for name in flags}
    again = "--sample-only" if g.cfg.rescore else "--overwrite"      # --rescore: the same figures and scores only
    seconds = [g.run("tools.ddpm_figures", *g.recipe["exercise"], *f, "--out", folder[name], again)[1]
               for name, f in flags.items()]
    train_s = None if g.cfg.rescore else sum(seconds)
    runs = {}
    for compare, names, labels in (("predict", ("eps", "x0", "v"), ("eps", "x0", "v")),
                                   ("schedule", ("eps", "cosine", "cosine 0.95"), ("linear", "cosine", "cosine 0.95"))):
        runs |= {f"{compare}: {label}": r for label, r in compare_runs.main(
            ["--runs", *(folder[n] for n in names), "--labels", *labels, "--out", g.out("exercises", compare)]).items()}
    fd_key = sorted({k for r in runs.values() for k in r["fd"]})[-1:]
    rows = [[name, round(r["test_loss"], 4), *[round(r["fd"][k], 1) for k in fd_key]] for name, r in runs.items()]
    result = "; ".join(f"{name} test eps-MSE {r['test_loss']:.4f}" + "".join(f", {k} FD-LeNet {r['fd'][k]:.1f}"
                                                                           for k in fd_key)
                       for name, r in runs.items() if not name.startswith("schedule: linear"))
    return dict(lesson="ddpm_mnist.py course exercises", train_s=train_s, eval_s=0.0, result=result,
                details=table(["run", "test eps-MSE", *fd_key], rows),
                figures=g.figures("exercises", "predict/compare.png", "schedule/compare.png"))


def fast_sampling(g: Gallery) -> dict:
    """fast_sampling.py on the ddpm part's model: FD-LeNet against network calls for each solver
    (fast_sampling_figures.py)."""
    rows, eval_s = g.run("tools.fast_sampling_figures", "--base-ckpt", g.out("ddpm", "ckpt.pt"), "--out",
                         g.out("fast_sampling"), *g.recipe["fast"])
    fd = {(r["sampler"], r["nfe"]): r["fd"] for r in rows}
    nfes = sorted({n for s, n in fd if s == "DDIM"})
    result = "; ".join(f"NFE {n}: " + ", ".join(f"{s} {fd[s, n]:.1f}" for s in ("DDIM", "DPM-Solver++(2M)", "Heun")
                                                 if (s, n) in fd) for n in nfes)
    details = table(["solver", "NFE", "seconds", "FD-LeNet", "classes found"],
                    [[r["sampler"], r["nfe"], round(r["seconds"], 1), round(r["fd"], 2), r["classes"]] for r in rows])
    return dict(lesson="fast_sampling.py", train_s=0.0, eval_s=eval_s, result=result, details=details,
                figures=g.figures("fast_sampling", "fd_vs_nfe.png", "nfe*.png"))


def gan(g: Gallery) -> dict:
    """gan_mnist.py against ddpm_mnist.py's recipe on the same data and machine, for 3 seeds: FD-LeNet
    and classes found against training time (the GAN scores itself every few epochs, gan_figures.py at the
    end; seed 1's diffusion run is trained in chunks, --resume, scored after each), the losses side by
    side, and the seconds to sample 1,000 images. Diffusion's seed 0 is the ddpm part's run."""
    import ddpm_mnist
    from tools import gan_figures
    import gan_mnist
    runs, chunks, eval_s = [], g.recipe["gan_chunks"], 0.0    # eval_s: scoring (and loading), not training
    for seed in ("0", "1", "2"):
        out = g.out("gan", f"gan_{seed}")
        again = g.cfg.resume and os.path.exists(os.path.join(out, "ckpt.pt"))
        res, seconds = g.run("tools.gan_figures", *g.recipe["gan"], "--seed", seed, "--out", out,
                             "--resume" if again else "--overwrite")
        runs.append(dict(res, model="GAN", seed=seed, minutes=res["train_seconds"] / 60))
        eval_s += max(0.0, seconds - res["train_seconds"])    # its scoring (a resumed run: a part of it)
    for seed in ("0", "1", "2"):
        out, curve, minutes = (g.out("ddpm"), [], None) if seed == "0" else (g.out("gan", f"ddpm_{seed}"), [], 0.0)
        for i, epochs in enumerate(chunks if seed == "1" else chunks[-1:] if seed == "2" else ()):
            _, seconds = g.run("tools.ddpm_figures", *g.recipe["ddpm"], "--epochs", str(epochs), "--seed", seed, "--out", out,
                               *(["--resume"] if i else ["--overwrite"]))
            minutes += seconds / 60
            if seed == "1" and epochs != chunks[-1]:     # quality on the way, 500 samples (the GAN's every K epochs: N)
                res, seconds = g.run("tools.ddpm_figures", "--sample-only", "--out", out, "--eval", "500", "--no-ddpm-grid",
                                     "--sweep-steps", "50", "--seed", seed)
                curve.append((minutes, epochs, res["eval"][0]["fd"]))
                eval_s += seconds
        res, seconds = g.run("tools.ddpm_figures", "--sample-only", "--out", out, *g.recipe["ddpm_eval"], "--seed", seed)
        eval_s += seconds
        row = next(r for r in res["eval"] if r["sampler"] == "DDIM")
        if minutes is None:                                  # the ddpm part's run: its recorded training time
            minutes = json.load(open(os.path.join(g.cfg.docs, "gallery", f"results_{g.cfg.profile}.json")))["ddpm"][
                "train_s"] / 60
        runs.append(dict(model="diffusion (DDIM-50)", seed=seed, minutes=minutes, fd=row["fd"], classes=row["classes"],
                         curve=curve + [(minutes, chunks[-1], row["fd"])] if seed == "1" else []))
    device = g.device
    G, hist = gan_mnist.load_trained(g.out("gan", "gan_0", "ckpt.pt"), device)
    unet, ddpm, state = ddpm_mnist.load_trained(g.out("ddpm", "ckpt.pt"), device)
    eps, n = ddpm.eps_from(unet, clip=True), 100                # sampling cost, measured on 100 images
    x_T = torch.randn((n, 1, 28, 28), device=device)
    steps = min(50, ddpm.T)
    times = {"GAN, one pass": report.timed(device, lambda: gan_mnist.sample(G, n))[1],
             f"DDIM-{steps}": report.timed(device, lambda: ddpm.ddim_sample(eps, x_T.shape, steps, x_T=x_T))[1],
             f"DDPM-{ddpm.T}": report.timed(device, lambda: ddpm.ddpm_sample(eps, x_T.shape, x_T=x_T))[1]}
    gan_figures.comparison_figure(g.out("gan", "gan_vs_diffusion.png"), runs, hist, state["losses"])
    fd = {m: [r["fd"] for r in runs if r["model"] == m] for m in ("GAN", "diffusion (DDIM-50)")}
    spread = {m: f"{min(v):.1f}-{max(v):.1f} (mean {sum(v) / len(v):.1f})" for m, v in fd.items()}
    result = (f"FD-LeNet over 3 seeds, 2,000 samples: GAN {spread['GAN']}, diffusion {spread['diffusion (DDIM-50)']}; "
              "seconds to sample 1,000 images: " + ", ".join(f"{k} {10 * v:.1f}" for k, v in times.items()))
    details = table(["model", "seed", "training minutes", "FD-LeNet", "classes found, smallest-largest share"],
                    [[r["model"], r["seed"], round(r["minutes"], 1), round(r["fd"], 2), r["classes"]] for r in runs])
    details += "\n\n" + table(["sampler", "seconds for 1,000 images (measured on 100)"],
                               [[k, round(10 * v, 2)] for k, v in times.items()])
    return dict(lesson="gan_mnist.py against ddpm_mnist.py", train_s=sum(r["minutes"] for r in runs) * 60, eval_s=eval_s,
                result=result, details=details, figures=g.figures("gan", "gan_vs_diffusion.png", "gan_0/samples.png"))


def cifar_flags(g: Gallery) -> list[str]:
    return ["--dataset", g.cfg.cifar]


def ddpm_cifar(g: Gallery) -> dict:
    """ddpm_mnist.py on CIFAR-10 in pixel space (the course's extra credit): train, then FD of DDIM samples in
    the features of evaluate.py's CIFAR classifier (the small CNN on a CPU, the ResNet-9 on a GPU)."""
    _, train_s = g.train("tools.ddpm_figures", "ddpm_cifar", *cifar_flags(g))
    res, eval_s = g.run("tools.ddpm_figures", "--sample-only", "--out", g.out("ddpm_cifar"), *cifar_flags(g),
                        *g.recipe["ddpm_cifar_eval"])
    ddim = res["eval"][-1]
    result = (f"{ddim['metric']} {ddim['fd']:.1f} with DDIM-{ddim['steps']} ({ddim['classes']}); "
              f"test eps-MSE {res['test_loss']:.4f}")
    return dict(lesson="ddpm_mnist.py --dataset cifar10", data=g.cifar_data(), train_s=train_s, eval_s=eval_s,
                result=result, details=scored(res["eval"]),
                figures=g.figures("ddpm_cifar", "ddim*_8x8.png", "loss.png", "loss_per_timestep.png"))


def dit(g: Gallery) -> dict:
    """dit_cifar.py on the latents of its VAE: train (the VAE first), then (dit_figures.py) the test loss, and the
    FD and class accuracy of guided samples against w."""
    _, train_s = g.train("tools.dit_figures", "dit", *cifar_flags(g))
    res, eval_s = g.run("tools.dit_figures", "--sample-only", "--out", g.out("dit"), *cifar_flags(g),
                        *g.recipe["dit_eval"])
    rows = res["eval"]
    result = (f"class accuracy {', '.join(f'{r[2]:.3f}' for r in rows)} at w = {', '.join(f'{r[0]:g}' for r in rows)} "
              f"(chance {1 / res['classes']:.2g}); {res['metric']} {', '.join(f'{r[1]:.1f}' for r in rows)}; test eps-MSE "
              f"{res['test_loss']:.4f}; VAE test MSE {res['recon_mse']:.4f}, scale factor {res['scale']:.3f}")
    return dict(lesson="dit_cifar.py", data=g.cifar_data(), train_s=train_s, eval_s=eval_s, result=result,
                details=table(["w", res["metric"], "class accuracy"], rows),
                figures=g.figures("dit", "cfg_w*.png", "loss.png", "eval.png", "vae_reconstructions.png"))


# ----------------------------------------------------------------------------- the table


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                platform.processor()) if os.path.isfile("/proc/cpuinfo") else platform.processor()
    return f"CPU, {torch.get_num_threads()} threads ({name})"


def write_results(docs: str) -> str:
    """docs/results.md from every profile's docs/gallery/results_PROFILE.json."""
    lines = ["# Results", "", "Written by `python -m tools.gallery` (see its docstring); every number comes from a network "
             "trained by the command beside it and scored with evaluate.py or the lesson's own measurement. FD values "
             "compare only when one metric classifier scored them (docs/evaluate.md says which).", ""]
    rows, sections, totals = [], [], []
    for path in sorted(glob.glob(os.path.join(docs, "gallery", "results_*.json"))):
        runs = json.load(open(path))
        minutes = {p: ((r["train_s"] or 0.0) + r["eval_s"]) / 60 for p, r in runs.items()}
        totals.append(f"- {next(iter(runs.values()))['profile']} profile: {sum(minutes.values()):.0f} min of training "
                      f"and scoring for all {len(runs)} parts in the table, {sum(minutes.get(p, 0) for p in PARTS):.0f} "
                      f"min for the {sum(p in runs for p in PARTS)} default ones (without --only)"
                      + (" (a '-' trained outside the gallery: not counted)" if any(
                          r["train_s"] is None for r in runs.values()) else ""))
        for part in PARTS + EXTRA:
            if part not in runs:
                continue
            r = runs[part]
            trained = "-" if r["train_s"] is None else f"{r['train_s'] / 60:.1f} min"   # None: trained elsewhere
            rows.append([r["lesson"], r["profile"], r["hardware"], r["data"], trained,
                         f"{r['eval_s'] / 60:.1f} min", r["result"]])
            figures = " ".join(f"![{os.path.basename(f)}]({f})" for f in r["figures"])
            when = f"trained {r['trained']}, scored {r['date']}" if r.get("trained") else r["date"]
            sections.append(f"## {r['lesson']} ({r['profile']}, {when})\n\n{r['details']}\n\n{figures}\n")
    header = ["lesson", "profile", "hardware", "data", "training", "scoring", "result"]
    text = "\n".join(lines + [report.markdown_table(header, rows), ""] + totals + [""] + sections)
    with open(os.path.join(docs, "results.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> dict:
    """Run the parts of one profile; -> {part: its row of docs/results.md}"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    common.check(not (cfg.rescore and "gan" in cfg.only), "--rescore cannot score the gan part: its FD curve is "
                 "measured while it trains; run --only gan again (--resume scores its finished GAN runs)")
    g = Gallery(cfg)
    parts = [p for p in PARTS + EXTRA if p in cfg.only or (not cfg.only and p in PARTS)]
    data = ""
    if set(parts) - {"ddpm_cifar", "dit"}:
        n_train = len(common.load_images("mnist", cfg.data_dir, True, cfg.download)[0])
        data = "MNIST-8k" if n_train == 8000 else f"MNIST, {n_train:,} training digits"
    store = os.path.join(cfg.docs, "gallery", f"results_{cfg.profile}.json")
    os.makedirs(os.path.dirname(store), exist_ok=True)
    runs = json.load(open(store)) if os.path.isfile(store) else {}
    for part in parts:
        common.seed_everything(0)
        row, today = globals()[part](g), datetime.date.today().isoformat()
        if row["train_s"] is None:                     # --rescore: the same trained run, scored again today
            before = runs.get(part, {})
            row |= dict(train_s=before.get("train_s"), trained=before.get("trained", before.get("date", "outside "
                        "the gallery")))           # a run trained by its own command: no training time recorded
        runs[part] = dict({"data": data} | row, profile=cfg.profile, hardware=hardware(g.device), date=today)
        with open(store, "w") as f:
            json.dump(runs, f, indent=1)
        print(write_results(cfg.docs).split("\n## ")[0])
    return runs


if __name__ == "__main__":
    main()
