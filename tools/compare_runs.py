"""Compare ddpm_mnist.py runs: schedules, parameterisations, architectures, side by side.

Every ddpm_figures.py run (training, or --sample-only on a ddpm_mnist.py run) writes OUT/per_timestep.json:
alpha_bar_t of its schedule, its test eps-MSE in 20 bins of t (one random t per test image) with the
log-SNR of each bin,
    log-SNR_t = log(alpha_bar_t / (1 - alpha_bar_t))   (high: clean data, t = 0; low: noise, t = T-1),
and the FD of each sampler when it ran with --eval N. This script overlays them in one figure:
alpha_bar_t against t, the per-timestep loss against t and against log-SNR, and the FDs.

Compare the per-timestep curves, not the final training loss: the training MSE is an average over
noise levels weighted by the schedule (how many t fall at each log-SNR) and by the target (x0- and
v-MSE weigh noise levels differently from eps-MSE), so two schedules or parameterisations give
different numbers for the same estimator. Against log-SNR, runs see the same x_t distribution at the
same abscissa, whatever their schedule; the eps-MSE makes eps, x0 and v runs comparable too.

Run:
    python -m tools.compare_runs --runs runs/linear runs/cosine runs/cos95 --out runs/compare
    python -m tools.compare_runs --runs runs/eps runs/x0 runs/v --labels eps x0 v --out runs/predict
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import common
import plots
from tools import report


@dataclass
class Config:
    runs: tuple[str, ...] = field(default=(), metadata={"help": "ddpm_mnist.py output folders (each holds "
                                                         "per_timestep.json), two or more"})
    labels: tuple[str, ...] = field(default=(), metadata={"help": "a name per run (empty: the folder names)"})
    out: str = field(default="runs/compare", metadata={"help": "folder of compare.png and compare.md"})


def check_config(cfg: Config) -> None:
    common.check(len(cfg.runs) >= 2, f"--runs needs two or more run folders, got {len(cfg.runs)}")
    common.check(not cfg.labels or len(cfg.labels) == len(cfg.runs),
                 f"--labels needs one name per run ({len(cfg.runs)}), got {len(cfg.labels)}")


def load_run(folder: str) -> dict:
    """The record ddpm_mnist.py wrote into `folder` (one line if it is missing or unreadable)."""
    path = os.path.join(folder, "per_timestep.json")
    common.check(os.path.isfile(path), f"'{path}' not found; run `python -m tools.ddpm_figures --out {folder}` "
                 f"(or `--sample-only --out {folder}` on a trained run) first")
    try:
        with open(path) as f:
            run = json.load(f)
        assert {"alpha_bar", "t", "logsnr", "loss", "test_loss"} <= set(run)
    except (ValueError, AssertionError):
        common.die(f"'{path}' is not a per_timestep.json of ddpm_mnist.py; run it again into {folder}")
    return run


def describe(run: dict) -> str:
    c, n = run["config"], run["net"]
    clip = f" clip {c['cosine_clip']}" if c["schedule"] == "cosine" else ""
    return f"{c['schedule']}{clip}, {c['predict']}, {c['time_embed']}, base {n['base']} x {list(n['mults'])}"


def twin(runs: dict, name: str, key: str, rel: float) -> str:
    """' (drawn on <earlier run>)' when an earlier run's `key` curve matches this one's within rel (relative;
    absolute for alpha_bar): the legend says so, as the two lines lie one over the other."""
    a = runs[name][key]
    for other in list(runs)[:list(runs).index(name)]:
        b = runs[other][key]
        if len(a) == len(b) and all(abs(x - y) <= rel * (1 if key == "alpha_bar" else max(abs(x), abs(y)))
                                    for x, y in zip(a, b)):
            return f" (drawn on {other})"
    return ""


def plot(runs: dict, path: str) -> None:
    fig, axes = plots.figure(1, 3, figsize=(16, 4.5))
    one_schedule = all(r["alpha_bar"] == next(iter(runs.values()))["alpha_bar"] for r in runs.values())
    for i, (name, r) in enumerate(runs.items()):       # a line style and a marker per run: coinciding curves show
        style = dict(ls=["-", "--", ":", "-."][i % 4], marker="os^vDx"[i % 6], ms=4, alpha=0.85)
        fd = " ".join(f"{k} FD {v:.2f}" for k, v in r["fd"].items())
        if i == 0 or not one_schedule:
            label = "every run" if one_schedule else name + twin(runs, name, "alpha_bar", 0.001)
            axes[0].plot(r["alpha_bar"], label=label, markevery=max(1, len(r["alpha_bar"]) // 8), **style)
        mean = f"mean {r['test_loss']:.4f}" + (", " + fd if fd else "")
        axes[1].plot(r["t"], r["loss"], label=f"{name} ({mean}){twin(runs, name, 'loss', 0.01)}", **style)
        axes[2].plot(r["logsnr"], r["loss"], label=name, **style)
    axes[0].set(xlabel="t  (0 = clean data, T-1 = noise)", ylabel="alpha_bar_t",
                title="schedule alpha_bar_t" + (": the same for every run" if one_schedule else " of each run"))
    axes[1].set(xlabel="t  (0 = clean data)", ylabel="test eps-MSE", yscale="log", title="test loss per timestep")
    axes[2].set(xlabel="log-SNR = log(alpha_bar / (1 - alpha_bar))  (right = clean data)", ylabel="test eps-MSE",
                yscale="log", title="test loss per noise level")
    fig.suptitle("Compare the curves: the final training MSE is not comparable across schedules or targets "
                 "(each weighs the noise levels differently)", fontsize=9)
    plots.save_figure(fig, path, legend=7)


def main(argv=None) -> dict:
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    common.prepare_out(cfg.out)
    names = cfg.labels or [os.path.basename(os.path.normpath(r)) for r in cfg.runs]
    runs = {name: load_run(folder) for name, folder in zip(names, cfg.runs)}
    plot(runs, os.path.join(cfg.out, "compare.png"))
    fds = sorted({k for r in runs.values() for k in r["fd"]})
    print(report.write_table(os.path.join(cfg.out, "compare.md"), ["run", "setting", "test eps-MSE", *fds],
                             [[n, describe(r), r["test_loss"], *[r["fd"].get(k, "-") for k in fds]]
                              for n, r in runs.items()]))
    print(f"figure in {cfg.out}/compare.png")
    return runs


if __name__ == "__main__":
    main()
