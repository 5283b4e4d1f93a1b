"""The figures and measurements of rectified_flow.py. `python -m tools.flow_figures` takes its flags, trains as
`python rectified_flow.py` does (or loads OUT/flow1.pt and OUT/flow2.pt with --sample-only), and samples
each flow from the same noise x0 (in latent space the VAE decodes what is shown) into:

- noise_vs_flow-1.png, noise_vs_flow-2.png: noise x0 (top row) over its many-step generation,
- steps_comparison.png: a row of samples per flow (Flow-1 = 1-rectified, Flow-2 = 2-rectified), a
  column per Euler step count,
- steps_error.png and steps_table.md: time, MSE to the flow's own many-step solution, straightness S,
- loss.png: the training loss of Flow-1, then of Flow-2 on the reflow pairs,
- with --eval N: eval.md, the FD-LeNet and classes found for every flow and step count (evaluate.py).

Run:
    python -m tools.flow_figures --sample-only --eval 10000          # the run in runs/rectified_flow/pixel
    python -m tools.flow_figures --space latent --steps 1 2 4 8 50  # train in latent space, then the figures
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch

import checkpoints
import common
import plots
import rectified_flow as rf
from tools import report
from tools.latent_figures import axis_scale, plot_points


@dataclass
class Config(rf.Config):
    steps: tuple[int, ...] = field(default=(1, 2, 4, 8, 50), metadata={"min": 1, "help": "Euler steps to compare"})
    eval: int = field(default=0, metadata={"min": 0, "help": "score N samples per flow and step count with "
                      "evaluate.py into OUT/eval.md; 0 = off; costs N x 2 x sum(steps) UNet calls"})


def make_figures(cfg: Config, flows: dict, space, device) -> dict:
    """Each flow at each number of Euler steps, from the same noise: the figures above.
    -> {steps: [{flow, steps, seconds, mse (to the many-step solution), S, deviation}], eval: score_sweep's rows}"""
    x0 = torch.randn((cfg.n_samples, *space.shape), device=device, generator=common.generator(device, cfg.seed))
    samples, table, rows = {}, [], []
    ref_steps = max(max(cfg.steps), cfg.pair_steps)
    for name, model in flows.items():
        x_ref, path = rf.euler_sample(model, x0, ref_steps, return_path=True)
        S, dev = rf.straightness(path)
        print(f"{name}: straightness S = {S:.4f}, deviation from the chord {dev:.4f} ({ref_steps} steps)")
        plots.save_labelled_grid(torch.cat([space.to_images(x0[:8]), space.to_images(x_ref[:8])]),
                                 os.path.join(cfg.out, f"noise_vs_{name.lower()}.png"), 8,
                                 ["noise x0", f"{ref_steps} steps"], f"{name}, {cfg.space} space: each noise and its image")
        for steps in cfg.steps:
            x, seconds = report.timed(device, lambda: rf.euler_sample(model, x0, steps))   # decoding not included
            err = (x - x_ref).pow(2).mean().item()
            samples.setdefault(name, []).append(space.to_images(x[:4]))
            table.append([name, steps, f"{seconds:.3f}", f"{err:.4f}", f"{S:.4f}", f"{dev:.4f}"])
            rows.append(dict(flow=name, steps=steps, seconds=seconds, mse=err, S=S, deviation=dev))
    header = ["flow", "Euler steps", f"seconds / {cfg.n_samples}", f"MSE to the {ref_steps}-step solution",
              "straightness S", "deviation from the chord"]
    print(report.write_table(os.path.join(cfg.out, "steps_table.md"), header, table))
    plots.save_labelled_grid(                                      # a row per noise x0, a column per step count
        torch.cat([torch.stack(x, 1).flatten(0, 1) for x in samples.values()]),
        os.path.join(cfg.out, "steps_comparison.png"), len(cfg.steps),
        [f"{name}\n{name[-1]}-rectified" for name, x in samples.items() for _ in range(len(x[0]))],
        f"Euler samples, {cfg.space} space", xlabel=f"Euler steps {', '.join(map(str, cfg.steps))}; a noise x0 per row")
    curves = {name: [(r["steps"], r["mse"]) for r in rows if r["flow"] == name and r["steps"] < ref_steps]
              for name in flows}                            # (at ref_steps itself the error is 0)
    if all(curves.values()):
        plot_points(os.path.join(cfg.out, "steps_error.png"), curves, "Euler steps",
                    f"MSE to the {ref_steps}-step solution", f"{cfg.space} space: few-step error, Flow-1 vs Flow-2")
    losses = [checkpoints.load(os.path.join(cfg.out, f"flow{i}.pt"), "cpu")["losses"] for i in (1, 2)]
    loss = {"Flow-1": plots.smooth(losses[0]),                     # Flow-2's steps follow Flow-1's
            "Flow-2 (reflow)": [(len(losses[0]) + i, v) for i, v in plots.smooth(losses[1])]}
    plots.plot_curves(os.path.join(cfg.out, "loss.png"), loss, ylabel="MSE to x1 - x0, mean of 50 steps",
                      logy=axis_scale(v for c in loss.values() for _, v in c) == "log",
                      title=f"{cfg.space} space: training loss, Flow-1 then Flow-2")
    scored = []
    if cfg.eval:  # opt-in: FD in a cached classifier's features (see evaluate.py)
        from tools import evaluate
        ev = evaluate.Evaluator(cfg.dataset, cfg.data_dir, cfg.download, device)

        def euler(model, steps, z, g):
            return space.to_images(rf.euler_sample(model, z, steps))
        samplers = {(name, steps): functools.partial(euler, model, steps) for name, model in flows.items()
                    for steps in cfg.steps}
        scored = evaluate.score_sweep(ev, samplers, cfg.eval, space.shape, device, os.path.join(cfg.out, "eval.md"),
                                      cfg.seed)
    return dict(steps=rows, eval=scored)


def main(argv=None) -> dict:
    """Train as rectified_flow.py does (or load, --sample-only), then the figures above. -> make_figures' results"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    rf.check_config(cfg)
    common.check(cfg.eval != 1, "--eval must be 0 (off) or >= 2 samples, got 1")
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    flow1, flow2, space = rf.train_or_load(cfg, device)
    results = make_figures(cfg, {"Flow-1": flow1, "Flow-2": flow2}, space, device)
    print(f"figures in {cfg.out}/")
    return results


if __name__ == "__main__":
    main()
