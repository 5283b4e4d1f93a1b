"""The measurements of a gan_mnist.py run, and gallery.py's comparison of the GAN with diffusion.

`python -m tools.gan_figures` takes gan_mnist.py's flags and trains as it does (or loads OUT/ckpt.pt with
--sample-only), writes its samples.png and loss.png, then with --eval N:
- eval.md: FD-LeNet and classes found of N samples at the end, and the seconds to sample 1,000 images,
- with --eval-every K (scored by gan_mnist.py's loop while it trains, kept in the checkpoint):
  fd_vs_time.png and fd_vs_time.json, the FD against training seconds.
`comparison_figure`: FD against training minutes for every GAN and diffusion run, and the two lessons'
losses side by side (gallery.py's gan part).

Run:
    python -m tools.gan_figures --eval 2000 --eval-every 5   # train as gan_mnist.py does, then score the end
    python -m tools.gan_figures --sample-only --eval 2000    # score runs/gan_mnist/ckpt.pt (its FD record included)
"""
from __future__ import annotations

import json
import os

import common
import plots
import gan_mnist
from gan_mnist import Config, sample
from tools import report


def make_figures(cfg: Config, G, history: dict, device, evaluator=None) -> dict:
    """With an evaluator: eval.md, and the FD against training time when the loop scored it. -> the results"""
    results = dict(train_seconds=history["seconds"], fd_history=history["fd"])
    if evaluator is None:
        return results
    from tools import evaluate
    _, seconds = report.timed(device, lambda: sample(G, 1000, common.generator(device, cfg.seed + 1)))
    x = sample(G, cfg.eval, common.generator(device, cfg.seed))
    hist = evaluator.histogram(x)
    results |= dict(fd=evaluator.fd(x), classes=evaluate.coverage(hist), histogram=hist, sample_seconds_1000=seconds)
    report.write_table(os.path.join(cfg.out, "eval.md"), ["samples", evaluator.name, "classes found",
                                                          "seconds to sample 1,000"],
                       [[cfg.eval, results["fd"], results["classes"], seconds]])
    print(f"{evaluator.name} {results['fd']:.2f} ({cfg.eval} samples), {results['classes']}; "
          f"1,000 samples in {seconds:.3f}s")
    if history["fd"]:
        with open(os.path.join(cfg.out, "fd_vs_time.json"), "w") as f:
            json.dump(history["fd"], f)
        plots.plot_curves(os.path.join(cfg.out, "fd_vs_time.png"),
                          {"GAN": [(s / 60, fd) for s, _, fd, _ in history["fd"]]}, xlabel="training minutes",
                          ylabel=evaluator.name, logy=False,
                          title=f"GAN: {evaluator.name} of {cfg.eval} samples against training time")
    return results


def comparison_figure(path: str, runs: list[dict], gan_history: dict, diffusion_losses: list) -> None:
    """The course's comparison in one figure: FD against training minutes (a colour per run: each GAN
    seed's curve in reds, diffusion's in blues, x at the end of every run), diffusion's one falling
    loss, and the GAN's two losses, a game with no end in sight.
    runs: [{model, seed, minutes, fd, and fd_history (GAN) or curve [(minutes, epoch, fd)]}]"""
    from matplotlib.ticker import ScalarFormatter
    fig, (a, b, c) = plots.figure(1, 3, figsize=(15, 4))
    palettes = {"GAN": iter(["tab:red", "tab:orange", "tab:brown", "tab:pink"] * 9),
                "diffusion": iter(["tab:blue", "tab:cyan", "tab:purple", "tab:green"] * 9)}
    for r in runs:
        color = next(palettes["GAN" if r["model"] == "GAN" else "diffusion"])
        label = f"{r['model']}, seed {r['seed']}"
        curve = ([(s / 60, fd) for s, _, fd, _ in r.get("fd_history", [])]          # GAN: (seconds, epoch, fd, classes)
                 or [(m, fd) for m, _, fd in r.get("curve", [])])                   # diffusion: (minutes, epoch, fd)
        if curve:
            a.plot(*zip(*curve), color=color, alpha=0.7, marker=".", label=label)
        a.scatter([r["minutes"]], [r["fd"]], color=color, marker="x", label=None if curve else f"{label} (end)")
    a.set(xlabel="training minutes", ylabel="FD-LeNet (x: 2,000 samples at the end)", yscale="log",
          title="GAN against diffusion: FD against training time")
    for axis in (a.yaxis.set_major_formatter, a.yaxis.set_minor_formatter):   # 30, 40, ... not 3 x 10^1
        axis(ScalarFormatter())
    b.plot(*zip(*plots.smooth(diffusion_losses)), color="tab:blue")
    b.set(xlabel="step", ylabel="eps-MSE", yscale="log", title="diffusion: one loss, falling")
    for name, key, color in (("D", "d", "tab:gray"), ("G", "g", "tab:red")):
        c.plot(*zip(*plots.smooth(gan_history[key])), color=color, label=name)
    c.set(xlabel="step", ylabel="loss", title="GAN: D's loss against G's, a game")
    plots.save_figure(fig, path, dpi=110, legend=7)


def main(argv=None) -> dict:
    """Train as gan_mnist.py does (or load, --sample-only), its samples.png and loss.png, then the
    measurements above. -> make_figures' results"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    gan_mnist.check_config(cfg)
    device = common.get_device(cfg.device)
    G, history, evaluator = gan_mnist.train_or_load(cfg, device)
    gan_mnist.samples_and_losses(cfg.out, G, history, cfg.n_samples, cfg.seed, device)
    results = make_figures(cfg, G, history, device, evaluator)
    print(f"figures in {cfg.out}/")
    return results


if __name__ == "__main__":
    main()
