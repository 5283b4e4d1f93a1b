"""The figures and measurements of fast_sampling.py. `python -m tools.fast_sampling_figures` takes its flags,
samples the same solvers from the same noise, and writes:
- nfe{N}.png: the lesson's grids (a row per solver, named with its steps and network calls),
- with --eval N: N samples per solver and NFE scored with evaluate.py (FD-LeNet, classes found, seconds)
  into nfe_table.md and fd_vs_nfe.png, beside DDPM through all T steps (--reference: N x T UNet calls).

Run:
    python -m tools.fast_sampling_figures --base-ckpt runs/cpu/ckpt.pt --nfe 5 10 20 50 --eval 2000 --no-reference
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import common
import plots
import fast_sampling
from fast_sampling import SOLVERS, steps_for
from tools import report


@dataclass
class Config(fast_sampling.Config):
    eval: int = field(default=0, metadata={"min": 0, "help": "score N samples per solver and NFE with "
                      "evaluate.py (FD-LeNet, classes found); 0 = off"})
    reference: bool = field(default=True, metadata={"help": "DDPM through all T steps as the reference row "
                            "(--eval N: N x T UNet calls)"})


def fd_vs_nfe(path: str, rows: list[dict], solvers: list[str], metric: str, n: int, reference: float | None,
              T: int) -> None:
    """fd_vs_nfe.png: FD against NFE on a linear axis, a marker at every measured point, ticks at the NFEs
    measured; the axis stops at 3x the best FD, and a point above it is drawn at the top with its value."""
    fig, ax = plots.figure(figsize=(6.5, 4.2))
    fds = [r["fd"] for r in rows]
    top = min(max(fds), 3 * min(fds))
    for s, marker in zip(solvers, "osD^v"):
        nfe, fd = zip(*[(r["nfe"], r["fd"]) for r in rows if r["sampler"] == s])
        line, = ax.plot(nfe, [min(v, top) for v in fd], marker=marker, label=s)
        for k, v in zip(nfe, fd):
            if v > top:
                ax.annotate(f"{v:.0f} (off scale)", (k, top), textcoords="offset points", xytext=(8, 0), va="center",
                            fontsize=8, color=line.get_color())
    if reference is not None:
        ax.axhline(reference, color="gray", ls="--", label=f"DDPM, {T} steps ({reference:.1f})")
    ax.set(xticks=sorted({r["nfe"] for r in rows if r["sampler"] in solvers}), ylim=(0.9 * min(fds), 1.06 * top),
           xlabel="network calls (NFE)", ylabel=metric,
           title=f"{metric} ({n} samples, lower is better) against network calls")
    plots.save_figure(fig, path)


def score(cfg: Config, model, ddpm, device, shape) -> list[dict]:
    """FD-LeNet, classes found and seconds of cfg.eval samples per solver and NFE (and of DDPM-T with
    --reference), into nfe_table.md and fd_vs_nfe.png. -> the rows"""
    from tools import evaluate
    ev = evaluate.Evaluator("mnist", cfg.data_dir, cfg.download, device, image_size=shape[-1], channels=shape[0])
    eps, solvers = ddpm.eps_from(model, cfg.clip), fast_sampling.solvers_of(cfg)

    def solve(solver, nfe, z, g):
        return SOLVERS[solver](ddpm, eps, z, steps_for(solver, nfe), g)

    def ddpm_all(z, g):
        return ddpm.ddpm_sample(eps, z.shape, x_T=z, generator=g)
    samplers = {(s, nfe): functools.partial(solve, s, nfe) for s in solvers for nfe in cfg.nfe}
    if cfg.reference:
        samplers[("DDPM", ddpm.T)] = ddpm_all
    rows = evaluate.score_sweep(ev, samplers, cfg.eval, shape, device, seed=cfg.seed)
    for r in rows:                                       # score_sweep's "steps" holds the NFE here
        r["nfe"] = r.pop("steps")
    report.write_table(os.path.join(cfg.out, "nfe_table.md"), ["solver", "NFE", "seconds", ev.name, "classes found"],
                       [[r["sampler"], r["nfe"], r["seconds"], r["fd"], r["classes"]] for r in rows])
    fd_vs_nfe(os.path.join(cfg.out, "fd_vs_nfe.png"), rows, solvers, ev.name, cfg.eval,
              rows[-1]["fd"] if cfg.reference else None, ddpm.T)
    return rows


def main(argv=None) -> list[dict]:
    """The labelled nfe{N}.png, then with --eval N the scores. -> the rows of nfe_table.md (empty without --eval)"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    common.check(cfg.eval != 1, "--eval must be 0 (off) or >= 2 samples, got 1")
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    common.prepare_out(cfg.out)
    model, ddpm, shape = fast_sampling.load_base(cfg, device)
    fast_sampling.save_strips(cfg.out, fast_sampling.samples_per_nfe(cfg, model, ddpm, device, shape), fast_sampling.solvers_of(cfg))
    rows = score(cfg, model, ddpm, device, shape) if cfg.eval else []
    for r in rows:
        print(f"{r['sampler']:18s} NFE {r['nfe']:5d}  {r['seconds']:7.1f}s  {r['fd']:8.2f}  {r['classes']}")
    print(f"figures in {cfg.out}/")
    return rows


if __name__ == "__main__":
    main()
