"""Every step of toy_2d.py plotted. `python -m tools.toy_figures` takes toy_2d.py's flags and trains as it does;
before training it draws forward.png (the dissolve, at steps evenly spaced in log-SNR, or --panels course),
closed_form_vs_chain.png (q(x_t | x_0) against t + 1 applications of q_step) and toy_2d_variance.png
(Var(x_t) under the variance-preserving forward process against the simplified one); after, toy_2d.py's
loss.png and samples.png, then reverse.png and reverse.gif (--no-gif: none). All point clouds share the
frame [-3.5, 3.5]^2.

Run:  python -m tools.toy_figures                                            # into runs/toy_2d/, as toy_2d.py
      python -m tools.toy_figures --panels course --no-gif --out runs/toy_2d_course   # forward.png at t = 0, 33, 66, 99
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

import common
import plots
import toy_2d
from toy_2d import Diffusion2D, closed_form_vs_chain, energy_distance


@dataclass
class Config(toy_2d.Config):
    gif: bool = field(default=True, metadata={"help": "write reverse.gif (a few seconds)"})
    panels: str = field(default="logsnr", metadata={"choices": ["logsnr", "course"], "help": "the steps of "
                        "forward.png: evenly spaced in log-SNR, or the course's t = 0, 33, 66, 99 of T = 100 "
                        "(evenly spaced in t: the last two both look like pure noise)"})


def forward_steps(alpha_bar: torch.Tensor, n: int = 6) -> list[int]:
    """n steps t evenly spaced in log-SNR_t = log(alpha_bar_t / (1 - alpha_bar_t)), from step 0 (not
    shown: the data panel stands for it) to T-1. Evenly spaced t would not show the dissolve: with the
    default schedule alpha_bar_33 = 0.58, and the arms already blur by alpha_bar = 0.9.
    -> increasing t, decreasing alpha_bar_t."""
    log_snr = (alpha_bar / (1 - alpha_bar)).log()
    targets = torch.linspace(log_snr[0].item(), log_snr[-1].item(), n + 1)[1:]
    return sorted({int((log_snr - v).abs().argmin()) for v in targets})


def course_steps(T: int) -> list[int]:
    """The panels course assignments ask for: t = 0, T/3, 2T/3 and T-1, evenly spaced in t (0, 33, 66,
    99 for T = 100). They differ from `forward_steps` because noise is not added evenly in t: with
    the default schedule alpha_bar_33 = 0.56 and alpha_bar_66 = 0.10, so the cloud is already gone
    by the third panel and the last two look alike."""
    return [round(k * (T - 1) / 3) for k in range(4)]


def scatter_grid(path: str, rows: list[list[torch.Tensor]], titles: list[list[str]], suptitle: str,
                 size: float = 2.4) -> None:
    """One point cloud per panel, rows of panels on a common [-3.5, 3.5]^2 frame."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plots.figure(n_rows, n_cols, figsize=(size * n_cols, size * n_rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (clouds, row_titles) in enumerate(zip(rows, titles)):
        for ax, x, title in zip(axes[i], clouds, row_titles):
            ax.axis("on")
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
            ax.set(xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), aspect="equal", xticks=[], yticks=[])
            ax.set_title(title, fontsize=9)
    fig.suptitle(suptitle)
    plots.save_figure(fig, path, dpi=90, grid=False, legend=0)


def variance_figure(path: str, diffusion: Diffusion2D, x0: torch.Tensor, generator) -> tuple[list, list]:
    """Why a variance-preserving schedule? Var(x_t) of the toy data, measured on each forward chain (dots)
    beside its closed form (line). Variance-preserving (this lesson), x_t = sqrt(1 - beta_t) x_{t-1} +
    sqrt(beta_t) eps: Var = alpha_bar_t Var(x_0) + 1 - alpha_bar_t, which ends at 1, the N(0, I) that
    sampling starts from. The simplified chain x_t = x_{t-1} + sqrt(beta_t) eps (= x_0 + sqrt(sum_{s<=t}
    beta_s) eps, variance-exploding): Var = Var(x_0) + sum_{s<=t} beta_s grows with every step, the data is
    never scaled away, and the network sees inputs whose scale changes with t. -> the measured Var(x_t), VP and VE"""
    var0, x_vp, x_ve, vp, ve = x0.var(0).mean(), x0, x0, [], []   # variances per coordinate, averaged over both
    for t in range(diffusion.T):
        x_vp = diffusion.q_step(x_vp, t, generator)
        x_ve = x_ve + diffusion.beta[t].sqrt() * torch.randn(x0.shape, generator=generator)
        vp.append(x_vp.var(0).mean().item()), ve.append(x_ve.var(0).mean().item())
    ab, ts = diffusion.alpha_bar, range(diffusion.T)
    fig, ax = plots.figure(figsize=(7.5, 4.4))
    for closed, measured, color, name, step in (
            (ab * var0 + 1 - ab, vp, "tab:blue", r"variance-preserving: $\bar\alpha_t$ Var$(x_0) + 1 - \bar\alpha_t$",
             r"$x_t = \sqrt{1 - \beta_t}\,x_{t-1} + \sqrt{\beta_t}\,\epsilon$"),
            (var0 + diffusion.beta.cumsum(0), ve, "tab:red", r"simplified: Var$(x_0) + \sum_{s \leq t} \beta_s$",
             r"$x_t = x_{t-1} + \sqrt{\beta_t}\,\epsilon$")):
        ax.plot(ts, closed, color=color, label=name)
        ax.plot(ts, measured, ".", color=color, ms=3, label=f"measured, {step}")
    ax.set(xlabel="step t", ylabel=r"Var$(x_t)$ per coordinate", ylim=(0, None),
           title="Var(x_t) of the toy data (dots: measured, lines: closed form):\n"
                 "variance-preserving against the simplified (variance-exploding) process")
    plots.save_figure(fig, path)
    return vp, ve


def reverse_gif(path: str, xs: list[torch.Tensor], frames: int = 20) -> None:
    """`frames` states of the reverse chain, evenly spaced, then the samples held for a second."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    T = len(xs) - 1
    ks = list(range(0, T, max(1, T // frames))) + [T] * 5
    fig, ax = plt.subplots(figsize=(3.5, 3.5))
    dots = ax.scatter(xs[0][:, 0], xs[0][:, 1], s=2, alpha=0.5)
    ax.set(xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), aspect="equal", xticks=[], yticks=[])

    def draw(k):
        dots.set_offsets(xs[k].numpy())
        ax.set_title("samples" if k == T else f"reverse process, t = {T - 1 - k}")
        return (dots,)

    FuncAnimation(fig, draw, frames=ks, blit=False).save(path, writer=PillowWriter(fps=5), dpi=60)
    plt.close(fig)


def forward_figures(cfg: Config, diffusion: Diffusion2D, x_train, x_test, g) -> dict:
    """Before training: forward.png, closed_form_vs_chain.png (noise from `g`) and toy_2d_variance.png (its
    own noise). -> the shown steps and the energy distances of the closed form against the chain"""
    ab = diffusion.alpha_bar
    shown = forward_steps(ab) if cfg.panels == "logsnr" else course_steps(cfg.T)
    noisy = [diffusion.q_sample(x_test, torch.full((len(x_test),), t), torch.randn(x_test.shape, generator=g))
             for t in shown]
    titles = ["data x_0"] + [f"t = {t}, $\\bar\\alpha$ = {ab[t]:.3f}" for t in shown]
    scatter_grid(os.path.join(cfg.out, "forward.png"), [[x_test] + noisy], [titles], "forward process q(x_t | x_0)")

    # The closed form against the chain of single steps: the same distribution at every t.
    checked = shown[1::2] if len(shown) > 3 else shown
    pairs = closed_form_vs_chain(diffusion, x_test, checked, g)
    ed_chain = [energy_distance(closed, chain) for closed, chain, _ in pairs]
    ed_chain_floor = [energy_distance(closed, again) for closed, _, again in pairs]
    scatter_grid(os.path.join(cfg.out, "closed_form_vs_chain.png"),
                 [[c for c, _, _ in pairs], [x for _, x, _ in pairs]],
                 [[f"closed form, t = {t}" for t in checked],
                  [f"{t + 1} q_steps: ED {e:.4f} (floor {f:.4f})"
                   for t, e, f in zip(checked, ed_chain, ed_chain_floor)]],
                 "x_t from the closed form q(x_t | x_0) (top) and from steps 0..t of q_step (bottom)\n"
                 "ED: energy distance between the two; floor: between two closed-form draws", size=3.2)
    print("closed form vs chain, energy distance: " + ", ".join(
        f"t = {t}: {e:.4f} (floor {f:.4f})" for t, e, f in zip(checked, ed_chain, ed_chain_floor)))
    variance_figure(os.path.join(cfg.out, "toy_2d_variance.png"), diffusion, x_train,
                    torch.Generator().manual_seed(cfg.seed + 2))
    return {"shown": shown, "ed_chain": ed_chain, "ed_chain_floor": ed_chain_floor}


def reverse_figures(cfg: Config, xs: list[torch.Tensor], shown: list[int]) -> None:
    """After training, from the reverse chain xs of toy_2d.judge: reverse.png and reverse.gif (--gif)."""
    scatter_grid(os.path.join(cfg.out, "reverse.png"), [[xs[cfg.T - 1 - t] for t in reversed(shown)] + [xs[-1]]],
                 [[f"t = {t}" for t in reversed(shown)] + ["samples"]], "reverse process p(x_{t-1} | x_t), from noise")
    if cfg.gif:
        reverse_gif(os.path.join(cfg.out, "reverse.gif"), xs)


def main(argv=None) -> dict:
    """Train as toy_2d.py does, with the figures above around it. -> toy_2d.judge's numbers and the energy
    distances of the closed form against the chain"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    toy_2d.check_config(cfg)
    common.prepare_out(cfg.out)
    common.seed_everything(cfg.seed)
    torch.set_num_threads(1)  # a tiny MLP: more CPU threads mostly wait on each other (and on other programs)
    rng = np.random.default_rng(cfg.seed)
    x_train, x_test = toy_2d.make_points(cfg.data, cfg.n_train, rng), toy_2d.make_points(cfg.data, cfg.n_test, rng)
    diffusion = Diffusion2D(cfg.T, cfg.beta_1, cfg.beta_T)
    g = torch.Generator().manual_seed(cfg.seed + 1)      # figure noise, apart from training's random numbers
    forward = forward_figures(cfg, diffusion, x_train, x_test, g)   # no training needed
    model, losses = toy_2d.train(cfg, diffusion, x_train)
    results, xs = toy_2d.judge(cfg, diffusion, model, losses, x_test)
    reverse_figures(cfg, xs, forward.pop("shown"))
    print(f"figures in {cfg.out}/")
    return {**results, **forward}


if __name__ == "__main__":
    main()
