"""Do the edges steer? The edge fidelity of a ControlNet trained by controlnet_canny.py.

Each of --n-eval test edge maps steers one sample; the Canny edges of the sample (the thresholds the
ControlNet was trained with) are scored against the input map: precision, recall and F1, a pixel
counting as matched when an edge of the other map lies within --tolerance pixels (and F1 with exact
pixel matches). Two baselines get the same scores: unconditional samples of the frozen UNet alone
from the same noise, and real test digits scored on the next digit's edges, which say how far a
right-looking digit that ignores the map gets (F1 0.70 at 1 px and 0.25 exactly on MNIST test digits,
where the digit's own edges shifted by one pixel score 1.00 and 0.46).

Run:
    python -m tools.controlnet_fidelity                # the run in runs/controlnet_canny (its ckpt.pt)
    python -m tools.controlnet_fidelity --out runs/controlnet_50_150 --n-eval 2000
Writes into that run's folder: edge_fidelity.md, and control.png again (the noise it draws comes
first from the same generator, so the F1 samples are those of every earlier run).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import checkpoints
import common
import controlnet_canny as cn
import ddpm_mnist
from tools import report


@dataclass
class Config:
    out: str = field(default="runs/controlnet_canny", metadata={"help": "the controlnet_canny.py run (its --out)"})
    base_ckpt: str = field(default=ddpm_mnist.DEFAULT_CKPT, metadata={"help": "the base it was trained on"})
    data_dir: str = field(default="data", metadata={"help": "root of the torchvision datasets"})
    download: bool = True
    ddim_steps: int = field(default=50, metadata={"min": 1})
    n_digits: int = field(default=8, metadata={"help": "test digits (rows) in control.png", "min": 1})
    samples_per_edge: int = field(default=4, metadata={"help": "samples per edge map in control.png", "min": 1})
    n_eval: int = field(default=1000, metadata={"help": "test edge maps for the edge F1 (costs 2 x N DDIM "
                                                "samplings of --ddim-steps steps)", "min": 1})
    tolerance: int = field(default=1, metadata={"help": "edge F1: pixels within this distance match", "min": 0})
    seed: int = 0
    device: str = "auto"


@torch.no_grad()
def edge_f1(x, edges, low: int, high: int, tolerance: int) -> dict:
    """Precision, recall and F1 of the Canny edges of images x against `edges`; a pixel matches
    when an edge of the other map lies within `tolerance` pixels (a (2 tol + 1)^2 window)."""
    def grow(e):                                        # every pixel within `tolerance` of an edge of e
        return F.max_pool2d(e, 2 * tolerance + 1, 1, tolerance)

    pred = cn.canny(x, low, high)
    precision = (pred * grow(edges)).sum() / pred.sum().clamp(min=1)
    recall = (edges * grow(pred)).sum() / edges.sum().clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-8)
    return dict(precision=precision.item(), recall=recall.item(), f1=f1.item())


@torch.no_grad()
def fidelity(cfg: Config, unet, model, ddpm, x_test, c_test, low: int, high: int, g) -> dict:
    """The edge F1 of ControlNet samples, unconditional samples (the same noise) and real digits on the
    next digit's edges. -> {"ControlNet": {precision, recall, f1, f1_exact}, "unconditional": ...,
    "another real digit": ...}"""
    m = min(cfg.n_eval, len(x_test))
    controlled, uncond = [], []
    for cs in common.progress(c_test[:m].split(256), "edge F1 samples"):  # same noise for both
        z = torch.randn(cs.shape, device=cs.device, generator=g)
        controlled.append(cn.sample(ddpm, model, cs, z, cfg.ddim_steps))
        uncond.append(ddpm.ddim_sample(ddpm.eps_from(unet, clip=True), z.shape, cfg.ddim_steps, x_T=z))
    scores = {}
    for name, x in (("ControlNet", torch.cat(controlled)), ("unconditional", torch.cat(uncond)),
                    ("another real digit", x_test[:m].roll(1, 0))):
        scores[name] = edge_f1(x, c_test[:m], low, high, cfg.tolerance)
        scores[name]["f1_exact"] = edge_f1(x, c_test[:m], low, high, 0)["f1"]
    table = report.markdown_table(["samples", "precision", "recall", "F1", "F1 exact (0 px)"],
                                  [[name, s["precision"], s["recall"], s["f1"], s["f1_exact"]] for name, s in scores.items()])
    text = (f"Edge fidelity on {m} test edge maps (Canny {low}/{high}, tolerance {cfg.tolerance} px, "
            f"{cfg.ddim_steps} DDIM steps)\n\n{table}\n")
    with open(os.path.join(cfg.out, "edge_fidelity.md"), "w") as fh:
        fh.write(text)
    print(text)
    return scores


def main(argv=None) -> dict:
    """-> the scores of edge_fidelity.md"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    ckpt = os.path.join(cfg.out, "ckpt.pt")
    common.check(os.path.isfile(ckpt), f"there is no ControlNet checkpoint '{ckpt}'; train one with "
                 f"`python controlnet_canny.py --out {cfg.out}`, or pass the --out of a trained run")
    common.prepare_out(cfg.out)
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    common.seed_everything(cfg.seed)
    unet, ddpm, state = cn.load(cfg.base_ckpt, device, cfg.data_dir, cfg.download, cfg.ddim_steps, ckpt)
    low, high = state["config"]["low"], state["config"]["high"]        # the thresholds it was trained with
    x_test = common.load_images("mnist", cfg.data_dir, False, cfg.download, unet.config["image_size"], 1, device)[0]
    c_test = cn.edge_maps(x_test, low, high, os.path.join(cfg.out, f"edges_test_{low}_{high}.pt"))
    control = cn.ControlNet(unet).to(device)
    checkpoints.load_weights(control, state["ema"], ckpt)
    model, g = cn.ControlledUNet(unet, control.eval()).eval(), common.generator(device, cfg.seed)
    cn.control_figure(model, ddpm, x_test, c_test, min(cfg.n_digits, len(x_test)), cfg.samples_per_edge,
                      cfg.ddim_steps, g, os.path.join(cfg.out, "control.png"))
    return fidelity(cfg, unet, model, ddpm, x_test, c_test, low, high, g)


if __name__ == "__main__":
    main()
