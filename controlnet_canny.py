"""ControlNet (Zhang et al., 2023) on Canny edges: steer a frozen, pretrained diffusion UNet with
an edge map, by training only a copy of its encoder.

The pretrained eps_theta(x_t, t) of ddpm_mnist.py is frozen. A trainable copy of its encoder
(input conv, down-blocks, middle blocks; initialised with the frozen weights) reads x_t, t and the
condition c, a Canny edge map of the digit fed in through a small hint encoder:
    h_0 = inc(x_t) + hint(c),   then the copied down- and middle blocks give d_1..d_n and m.
Each copied feature leaves through its own zero-initialised 1x1 convolution (`zero_conv`), and is
added to the frozen UNet's matching skip connection s_i, and to its bottleneck b:
    s_i <- s_i + zero_conv_i(d_i),   b <- b + zero_conv_mid(m),   then the frozen decoder runs.
At initialisation every zero_conv outputs 0, so the controlled UNet *is* the pretrained one (no
harmful noise at the start), yet the zero_conv's weights get gradients at once (their input is not
zero), after which the gradients reach the copied encoder. The hint encoder's last conv starts at
zero too, so the copy first sees exactly inc(x_t). Training uses the ordinary diffusion loss
    L = || eps - eps_theta(x_t, t, c) ||^2,   with only the control branch optimised.
Edges come from OpenCV's `cv2.Canny` (as in ControlNet's own annotator) with thresholds
--low < --high on the uint8 digits; they are computed once per dataset and thresholds, then cached
in OUT/edges_{train,test}_{low}_{high}.pt. Edge fidelity: the Canny edges of a sample against the
input edges, precision/recall/F1 counting a pixel as matched within --tolerance pixels (and F1 with
exact pixel matches); the same numbers for unconditional samples (the frozen UNet alone, same
noise) are the baseline, and real test digits scored on the next digit's edges (a row of its own)
say how far a right-looking digit that ignores the map gets: F1 0.70 at 1 px and 0.25 exactly on
MNIST test digits, where the digit's own edges shifted by one pixel score 1.00 and 0.46.

Run:
    python controlnet_canny.py                   # base: runs/ddpm_mnist/ckpt.pt (trained first if missing)
    python controlnet_canny.py --low 50 --high 150 --epochs 20 --out runs/controlnet_50_150
    python controlnet_canny.py --resume --epochs 20   # continue OUT/ckpt.pt up to epoch 20
    python controlnet_canny.py --sample-only     # figures from OUT/ckpt.pt
Figures in runs/controlnet_canny/: control.png (rows: edge map | samples | original digit),
loss.png, and edge_fidelity.md (F1 of ControlNet vs unconditional samples).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import ddpm_mnist

KIND = "controlnet_canny.py ControlNet"


@dataclass
class Config(common.RunConfig):
    base_ckpt: str = field(default=ddpm_mnist.DEFAULT_CKPT, metadata={
        "help": "ddpm_mnist.py checkpoint to steer (the default one is trained first when missing)"})
    low: int = field(default=100, metadata={"help": "Canny lower hysteresis threshold", "min": 0})
    high: int = field(default=200, metadata={"help": "Canny upper threshold (ControlNet's annotator: 100, 200)"})
    epochs: int = field(default=10, metadata={"min": 1})
    batch_size: int = field(default=128, metadata={"min": 1})
    lr: float = 2e-4
    warmup_steps: int = field(default=0, metadata={"help": "linear lr warm-up (the zero convolutions need none)",
                                                   "min": 0})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA of the control branch (sampled with)"})
    ddim_steps: int = field(default=50, metadata={"min": 1})
    n_digits: int = field(default=8, metadata={"help": "test digits (rows) in control.png", "min": 1})
    samples_per_edge: int = field(default=4, metadata={"help": "samples per edge map in control.png", "min": 1})
    n_eval: int = field(default=1000, metadata={"help": "test edge maps for the edge F1 (costs 2 x N DDIM "
                                                "samplings of --ddim-steps steps)", "min": 1})
    tolerance: int = field(default=1, metadata={"help": "edge F1: pixels within this distance match", "min": 0})
    out: str = "runs/controlnet_canny"


def check_config(cfg: Config) -> None:
    """The checks that "min" cannot make (--ddim-steps is checked against the base's T once it is loaded)."""
    common.check(cfg.low < cfg.high, f"Canny thresholds must satisfy --low < --high, got {cfg.low}, {cfg.high}")
    common.check(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    common.check(0 <= cfg.ema_decay < 1, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")


# ----------------------------------------------------------------------------- the method


def sample(ddpm: ddpm_mnist.DDPM, model: ControlledUNet, c, x_T, steps: int):
    """DDIM (eta = 0, x0_hat clipped as ddpm_mnist.py samples) from x_T, every step conditioned on the edge maps c."""
    return ddpm.ddim_sample(ddpm.eps_from(lambda x, t: model(x, t, c), clip=True), x_T.shape, steps, x_T=x_T)


@torch.no_grad()
def edge_f1(x, edges, low: int, high: int, tolerance: int) -> dict:
    """Precision, recall and F1 of the Canny edges of images x against `edges`; a pixel matches
    when an edge of the other map lies within `tolerance` pixels (a (2 tol + 1)^2 window)."""
    def grow(e):                                        # every pixel within `tolerance` of an edge of e
        return F.max_pool2d(e, 2 * tolerance + 1, 1, tolerance)

    pred = canny(x, low, high)
    precision = (pred * grow(edges)).sum() / pred.sum().clamp(min=1)
    recall = (edges * grow(pred)).sum() / edges.sum().clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-8)
    return dict(precision=precision.item(), recall=recall.item(), f1=f1.item())


# ----------------------------------------------------------------------------- data: Canny edges


def canny(x: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """cv2.Canny on each image: x in [-1, 1] (N, 1, H, W) -> edges in {0, 1}, float (N, 1, H, W)."""
    u8 = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    e = np.stack([cv2.Canny(im[0], low, high) > 0 for im in u8])          # (N, H, W) bool
    return torch.from_numpy(e)[:, None].float().to(x.device)


def edge_maps(x: torch.Tensor, low: int, high: int, path: str) -> torch.Tensor:
    """The Canny edges of a whole dataset, computed once and cached in `path`. A cache of other
    images (their count or pixel sum differ), or one that cannot be read, is computed again."""
    key = dict(n=len(x), pixel_sum=round(x.double().sum().item(), 3))
    try:
        state = torch.load(path, map_location=x.device, weights_only=True)
        if state["key"] == key and state["edges"].shape == x.shape:
            return state["edges"].float()
    except Exception:                                   # missing, damaged, or not an edge cache
        pass
    edges = canny(x, low, high)
    common.save_checkpoint(path, edges=edges.bool(), key=key)
    return edges


# ----------------------------------------------------------------------------- network


def zero_conv(c: int) -> nn.Conv2d:
    """1x1 convolution with weight and bias zero: a new branch that starts out adding nothing."""
    conv = nn.Conv2d(c, c, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNet(nn.Module):
    """The control branch: a trainable copy of the UNet's encoder + hint encoder + zero_convs.
    (x_t, t, c) -> (bottleneck residual, [skip residuals, shallowest first])."""

    def __init__(self, unet: ddpm_mnist.UNet):
        super().__init__()
        base = unet.config["base"]
        self.encoder = ddpm_mnist.UNet(**unet.config, decoder=False)   # a trainable copy of the encoder half,
        mine = self.encoder.state_dict()                                # starting at the frozen weights
        self.encoder.load_state_dict({k: v for k, v in unet.state_dict().items() if k in mine})
        self.hint = nn.Sequential(                      # c (N, 1, H, W) -> (N, base, H, W)
            nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, base, 3, padding=1))
        nn.init.zeros_(self.hint[-1].weight)
        nn.init.zeros_(self.hint[-1].bias)
        skip_channels = [b.conv2.out_channels for level in unet.downs for b in level.blocks]
        self.zero_convs = nn.ModuleList([zero_conv(ch) for ch in skip_channels])
        self.zero_conv_mid = zero_conv(unet.mid[-1].conv2.out_channels)

    def forward(self, x, t, c):
        emb, e = self.encoder.embed_time(t), self.encoder
        m, ds = e.encode(e.inc(x) + self.hint(c), emb)  # h_0 = inc(x_t) + hint(c)
        return self.zero_conv_mid(m), [zc(d) for zc, d in zip(self.zero_convs, ds)]


class ControlledUNet(nn.Module):
    """eps_theta(x_t, t, c): the frozen UNet, its skips and bottleneck shifted by the ControlNet."""

    def __init__(self, unet: ddpm_mnist.UNet, control: ControlNet):
        super().__init__()
        self.unet, self.control = unet.requires_grad_(False).eval(), control

    def train(self, mode: bool = True):
        super().train(mode)
        self.unet.eval()                                # frozen: no dropout, ever
        return self

    def forward(self, x, t, c):                         # x (N, 1, H, W), t (N,), c (N, 1, H, W)
        emb = self.unet.embed_time(t)
        with torch.no_grad():                           # nothing of the frozen encoder is trained
            b, skips = self.unet.encode(self.unet.inc(x), emb)
        r_mid, r_skips = self.control(x, t, c)
        skips = [s + r for s, r in zip(skips, r_skips)]  # s_i + zero_conv_i(d_i)
        return self.unet.decode(b + r_mid, skips, emb)  # b + zero_conv_mid(m)


# ----------------------------------------------------------------------------- training


def train(cfg: Config, unet: ddpm_mnist.UNet, ddpm: ddpm_mnist.DDPM, x_train, c_train, device):
    """L = || eps - eps_theta(x_t, t, c) ||^2 through the frozen UNet. Only the control branch is
    optimised, averaged (EMA) and saved, to OUT/ckpt.pt after every epoch.
    -> (the EMA control branch, the per-step losses)"""
    ckpt = os.path.join(cfg.out, "ckpt.pt")
    control = ControlNet(unet).to(device)
    model = ControlledUNet(unet, control)                # freezes the UNet
    net = torch.compile(model) if cfg.compile else model
    run = common.Run(control, ckpt, KIND, device, cfg.lr, cfg.ema_decay)   # control only: EMA, AdamW, step, losses
    if cfg.resume:   # the thresholds define the task: a resumed run must keep them
        run.resume(cfg, same=("low", "high"))
    print(f"ControlNet: {run.millions():.2f}M trainable, UNet {run.millions(unet):.2f}M frozen; {len(x_train)} "
          f"digits on {device}")
    total = cfg.epochs * (len(x_train) // min(cfg.batch_size, len(x_train)))
    for epoch in range(run.epoch, cfg.epochs):
        model.train()
        run.new_epoch(f"epoch {epoch + 1}/{cfg.epochs}")
        for x0, c in common.progress(common.batches(x_train, c_train, cfg.batch_size, cfg.seed + epoch),
                                     f"epoch {epoch + 1}/{cfg.epochs}", total // cfg.epochs):
            common.set_lr(run.opt, cfg.lr, run.step, cfg.warmup_steps, total)
            with common.autocast(device, cfg.amp):
                loss = ddpm.loss(lambda x_t, t: net(x_t, t, c), x0)     # || eps - eps_theta(x_t, t, c) ||^2
            run.opt.zero_grad(set_to_none=True)
            loss.backward()                              # reaches the zero_convs, then the copied encoder
            run.opt.step()
            run.ema.update_parameters(control)
            run.add(loss, len(x0))
        run.end_epoch(net=unet.config, config=asdict(cfg))   # NaN guard, loss/time/img/s line, checkpoint
    return run.ema.module.eval(), run.losses


# ----------------------------------------------------------------------------- figures


@torch.no_grad()
def make_figures(cfg: Config, unet, control, ddpm, x_test, c_test, device) -> dict:
    """control.png: rows of edge map | samples_per_edge samples | original; edge F1 against
    unconditional samples, and against real digits each scored on the next one's edges (the F1 of
    a right-looking digit that ignores the map). -> {"ControlNet": {precision, recall, f1, f1_exact},
    "unconditional": {...}, "another real digit": {...}}"""
    model = ControlledUNet(unet, control).eval()
    g = common.generator(device, cfg.seed)
    k, n = cfg.samples_per_edge, min(cfg.n_digits, len(x_test))
    c = c_test[:n].repeat_interleave(k, 0)                                # (n k, 1, H, W)
    x = sample(ddpm, model, c, torch.randn(c.shape, device=device, generator=g), cfg.ddim_steps)
    rows = [torch.cat([c_test[i:i + 1] * 2 - 1, x[i * k:(i + 1) * k], x_test[i:i + 1]]) for i in range(n)]
    common.save_grid(torch.cat(rows), os.path.join(cfg.out, "control.png"), nrow=k + 2)

    m = min(cfg.n_eval, len(x_test))
    controlled, uncond = [], []
    for cs in common.progress(c_test[:m].split(256), "edge F1 samples"):  # same noise for both
        z = torch.randn(cs.shape, device=device, generator=g)
        controlled.append(sample(ddpm, model, cs, z, cfg.ddim_steps))
        uncond.append(ddpm.ddim_sample(ddpm.eps_from(unet, clip=True), z.shape, cfg.ddim_steps, x_T=z))
    scores = {}
    for name, x in (("ControlNet", torch.cat(controlled)), ("unconditional", torch.cat(uncond)),
                    ("another real digit", x_test[:m].roll(1, 0))):
        scores[name] = edge_f1(x, c_test[:m], cfg.low, cfg.high, cfg.tolerance)
        scores[name]["f1_exact"] = edge_f1(x, c_test[:m], cfg.low, cfg.high, 0)["f1"]
    table = common.markdown_table(["samples", "precision", "recall", "F1", "F1 exact (0 px)"],
                                  [[name, s["precision"], s["recall"], s["f1"], s["f1_exact"]] for name, s in scores.items()])
    text = (f"Edge fidelity on {m} test edge maps (Canny {cfg.low}/{cfg.high}, tolerance {cfg.tolerance} px, "
            f"{cfg.ddim_steps} DDIM steps)\n\n{table}\n")
    with open(os.path.join(cfg.out, "edge_fidelity.md"), "w") as fh:
        fh.write(text)
    print(text)
    return scores


def main(argv=None) -> dict:
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    ckpt = os.path.join(cfg.out, "ckpt.pt")
    if cfg.sample_only:                                  # before any work: is there a ControlNet to sample?
        common.check(os.path.isfile(ckpt), f"--sample-only: there is no checkpoint '{ckpt}'; train first "
                     "(drop --sample-only), or pass the --out of a trained run")
    else:
        common.new_or_resume(ckpt, cfg.resume, cfg.overwrite)
    common.prepare_out(cfg.out)
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    common.seed_everything(cfg.seed)
    base = ddpm_mnist.ensure_trained(cfg.base_ckpt, device, data_dir=cfg.data_dir, download=cfg.download)
    unet, ddpm, _ = ddpm_mnist.load_trained(base, device)
    common.check(unet.config["channels"] == 1, f"'{base}' is not a grayscale (MNIST) UNet; Canny control needs one")
    common.check(cfg.ddim_steps <= ddpm.T, f"--ddim-steps must be <= T = {ddpm.T} of '{base}', got {cfg.ddim_steps}")
    if cfg.sample_only or cfg.resume:                    # does OUT/ckpt.pt steer this base? (before the edges)
        state = common.load_checkpoint(ckpt, device, KIND, keys=("net", "ema"))
        common.check(state["net"] == unet.config, f"'{ckpt}' steers a UNet {state['net']}, but --base-ckpt "
                     f"'{base}' is a UNet {unet.config}; pass the base it was trained on")
    size = unet.config["image_size"]
    x_test = common.load_images("mnist", cfg.data_dir, False, cfg.download, size, 1, device)[0]
    c_test = edge_maps(x_test, cfg.low, cfg.high, os.path.join(cfg.out, f"edges_test_{cfg.low}_{cfg.high}.pt"))
    if cfg.sample_only:
        control = ControlNet(unet).to(device)
        common.load_weights(control, state["ema"], ckpt)
    else:
        x_train = common.load_images("mnist", cfg.data_dir, True, cfg.download, size, 1, device)[0]
        c_train = edge_maps(x_train, cfg.low, cfg.high, os.path.join(cfg.out, f"edges_train_{cfg.low}_{cfg.high}.pt"))
        control, losses = train(cfg, unet, ddpm, x_train, c_train, device)
        common.plot_curves(os.path.join(cfg.out, "loss.png"), {"train loss": common.smooth(losses)})
    scores = make_figures(cfg, unet, control.eval(), ddpm, x_test, c_test, device)
    print(f"figures in {cfg.out}/")
    return scores


if __name__ == "__main__":
    main()
