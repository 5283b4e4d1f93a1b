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
noise) are the baseline. For scale, on MNIST test digits: the edges of *another* digit score
F1 0.70 at 1 px and 0.25 exactly; the digit's own edges shifted by one pixel 1.00 and 0.46.

Run:
    python controlnet_canny.py                   # base: runs/ddpm_mnist/ckpt.pt (trained first if missing)
    python controlnet_canny.py --low 50 --high 150 --epochs 20
    python controlnet_canny.py --sample-only     # figures from OUT/ckpt.pt
Figures in runs/controlnet_canny/: control.png (rows: edge map | samples | original digit),
loss.png, and edge_fidelity.md (F1 of ControlNet vs unconditional samples).
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import ddpm_mnist

BASE_CKPT = "runs/ddpm_mnist/ckpt.pt"


@dataclass
class Config:
    base_ckpt: str = field(default="", metadata={
        "help": f"ddpm_mnist.py checkpoint (default {BASE_CKPT}, trained first when missing)"})
    data_dir: str = field(default="data", metadata={"help": "root of torchvision's MNIST"})
    download: bool = True
    low: int = field(default=100, metadata={"help": "Canny lower hysteresis threshold"})
    high: int = field(default=200, metadata={"help": "Canny upper threshold (ControlNet's annotator: 100, 200)"})
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-4
    ema_decay: float = 0.999
    ddim_steps: int = 50
    n_digits: int = field(default=8, metadata={"help": "test digits (rows) in control.png"})
    samples_per_edge: int = field(default=4, metadata={"help": "samples per edge map in control.png"})
    n_eval: int = field(default=1000, metadata={"help": "test edge maps for the edge F1"})
    tolerance: int = field(default=1, metadata={"help": "edge F1: pixels within this distance match"})
    out: str = "runs/controlnet_canny"
    sample_only: bool = field(default=False, metadata={"help": "load OUT/ckpt.pt and make figures, no training"})
    seed: int = 0
    device: str = "auto"
    amp: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA"})


# ----------------------------------------------------------------------------- data: Canny edges


def load_digits(cfg: Config, train: bool, size: int, device) -> torch.Tensor:
    """MNIST digits in [-1, 1], (N, 1, size, size), on `device` (labels are not needed)."""
    return common.load_images("mnist", cfg.data_dir, train, cfg.download, size, 1, device)[0]


def canny(x: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """cv2.Canny on each image: x in [-1, 1] (N, 1, H, W) -> edges in {0, 1}, float (N, 1, H, W)."""
    u8 = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    e = np.stack([cv2.Canny(im[0], low, high) > 0 for im in u8])          # (N, H, W) bool
    return torch.from_numpy(e)[:, None].float().to(x.device)


def edge_maps(x: torch.Tensor, low: int, high: int, path: str) -> torch.Tensor:
    """The Canny edges of a whole dataset, computed once and cached in `path` (recomputed only
    when the cached file is of other images: their count or pixel sum differ)."""
    key = dict(n=len(x), pixel_sum=round(x.double().sum().item(), 3))
    if os.path.isfile(path):
        state = torch.load(path, map_location=x.device, weights_only=True)
        if state["key"] == key:
            return state["edges"].float()
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
        self.encoder = copy.deepcopy(unet)              # trainable copy, starts at the frozen weights
        del self.encoder.ups, self.encoder.out          # the decoder is not copied
        self.inc, self.encoder.inc = self.encoder.inc, nn.Identity()   # so encode() starts from h_0
        self.encoder.requires_grad_(True)
        self.hint = nn.Sequential(                      # c (N, 1, H, W) -> (N, base, H, W)
            nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, base, 3, padding=1))
        nn.init.zeros_(self.hint[-1].weight)
        nn.init.zeros_(self.hint[-1].bias)
        skip_channels = [b.conv2.out_channels for level in unet.downs for b in level.blocks]
        self.zero_convs = nn.ModuleList([zero_conv(ch) for ch in skip_channels])
        self.zero_conv_mid = zero_conv(unet.mid[-1].conv2.out_channels)

    def forward(self, x, t, c):
        emb = self.encoder.embed_time(t)
        m, ds = self.encoder.encode(self.inc(x) + self.hint(c), emb)   # h_0 = inc(x_t) + hint(c)
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
            b, skips = self.unet.encode(x, emb)
        r_mid, r_skips = self.control(x, t, c)
        skips = [s + r for s, r in zip(skips, r_skips)]  # s_i + zero_conv_i(d_i)
        return self.unet.decode(b + r_mid, skips, emb)  # b + zero_conv_mid(m)


# ----------------------------------------------------------------------------- the method


def sample(ddpm: ddpm_mnist.DDPM, model: ControlledUNet, c, x_T, steps: int):
    """DDIM (eta = 0) from x_T, every step conditioned on the edge maps c."""
    return ddpm.ddim_sample(lambda x, t: model(x, t, c), x_T.shape, steps, x_T=x_T)


@torch.no_grad()
def edge_f1(x, edges, low: int, high: int, tolerance: int) -> dict:
    """Precision, recall and F1 of the Canny edges of images x against `edges`; a pixel matches
    when an edge of the other map lies within `tolerance` pixels (a (2 tol + 1)^2 window)."""
    pred = canny(x, low, high)
    grow = lambda e: F.max_pool2d(e, 2 * tolerance + 1, 1, tolerance)     # noqa: E731
    precision = (pred * grow(edges)).sum() / pred.sum().clamp(min=1)
    recall = (edges * grow(pred)).sum() / edges.sum().clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-8)
    return dict(precision=precision.item(), recall=recall.item(), f1=f1.item())


# ----------------------------------------------------------------------------- training


def train(cfg: Config, model: ControlledUNet, ddpm, x_train, c_train, device):
    """Diffusion loss through the frozen UNet, optimising the control branch only (common.fit gets
    `model.control`, so the optimizer and the EMA never see the UNet's weights); a checkpoint per epoch."""
    ckpt = os.path.join(cfg.out, "ckpt.pt")
    n_train, n_frozen = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (model.control, model.unet))
    print(f"ControlNet: {n_train:.2f}M trainable, UNet {n_frozen:.2f}M frozen; {len(x_train)} digits on {device}")
    gen = torch.Generator().manual_seed(cfg.seed)
    ema_control, losses = common.fit(
        model.control, lambda net, b: ddpm.loss(lambda x, t: model(x, t, b[1]), b[0]),
        lambda epoch: common.batches(x_train, c_train, cfg.batch_size, generator=gen),
        epochs=cfg.epochs, ckpt=ckpt, device=device, lr=cfg.lr, ema_decay=cfg.ema_decay, amp=cfg.amp,
        config=asdict(cfg))
    common.plot_curves(os.path.join(cfg.out, "loss.png"), {"train loss": common.smooth(losses)})
    return ema_control


# ----------------------------------------------------------------------------- figures


@torch.no_grad()
def make_figures(cfg: Config, unet, control, ddpm, x_test, c_test, device) -> None:
    """control.png: rows of edge map | samples_per_edge samples | original; edge F1 vs unconditional."""
    model = ControlledUNet(unet, control).eval()
    g = torch.Generator(device).manual_seed(cfg.seed)
    k, n = cfg.samples_per_edge, min(cfg.n_digits, len(x_test))
    c = c_test[:n].repeat_interleave(k, 0)                                # (n k, 1, H, W)
    x = sample(ddpm, model, c, torch.randn(c.shape, device=device, generator=g), cfg.ddim_steps)
    rows = [torch.cat([c_test[i:i + 1] * 2 - 1, x[i * k:(i + 1) * k], x_test[i:i + 1]]) for i in range(n)]
    common.save_grid(torch.cat(rows), os.path.join(cfg.out, "control.png"), nrow=k + 2)

    m = min(cfg.n_eval, len(x_test))
    controlled, uncond = [], []
    for cs in c_test[:m].split(256):                                     # same noise for both
        z = torch.randn(cs.shape, device=device, generator=g)
        controlled.append(sample(ddpm, model, cs, z, cfg.ddim_steps))
        uncond.append(ddpm.ddim_sample(unet, z.shape, cfg.ddim_steps, x_T=z))
    lines = [f"Edge fidelity on {m} test edge maps (Canny {cfg.low}/{cfg.high}, tolerance {cfg.tolerance} px, "
             f"{cfg.ddim_steps} DDIM steps)", "", "| samples | precision | recall | F1 | F1 exact (0 px) |",
             "|---|---|---|---|---|"]
    for name, xs in (("ControlNet", controlled), ("unconditional", uncond)):
        s = edge_f1(torch.cat(xs), c_test[:m], cfg.low, cfg.high, cfg.tolerance)
        exact = edge_f1(torch.cat(xs), c_test[:m], cfg.low, cfg.high, 0)["f1"]
        lines.append(f"| {name} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {exact:.3f} |")
    with open(os.path.join(cfg.out, "edge_fidelity.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    common.check(0 <= cfg.low < cfg.high,
                 f"Canny thresholds must satisfy 0 <= --low < --high, got {cfg.low}, {cfg.high}")
    common.check(cfg.epochs >= 1 and cfg.samples_per_edge >= 1 and cfg.n_digits >= 1 and cfg.n_eval >= 1,
                 "--epochs, --samples-per-edge, --n-digits and --n-eval must be >= 1")
    common.check(cfg.tolerance >= 0, f"--tolerance must be >= 0, got {cfg.tolerance}")
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    common.seed_everything(cfg.seed)
    base_cfg = ddpm_mnist.Config(data_dir=cfg.data_dir, download=cfg.download, out=os.path.dirname(BASE_CKPT))
    ckpt = common.checkpoint_or_train(cfg.base_ckpt, BASE_CKPT, lambda: ddpm_mnist.train(base_cfg, device))
    unet, ddpm, _ = ddpm_mnist.load_trained(ckpt, device)
    common.check(unet.config["channels"] == 1, f"'{ckpt}' is not a grayscale (MNIST) UNet; Canny control needs one")
    common.check(1 <= cfg.ddim_steps <= ddpm.T, f"--ddim-steps must be in 1..T ({ddpm.T}), got {cfg.ddim_steps}")
    os.makedirs(cfg.out, exist_ok=True)
    size = unet.config["image_size"]
    x_test = load_digits(cfg, False, size, device)
    c_test = edge_maps(x_test, cfg.low, cfg.high, os.path.join(cfg.out, f"edges_test_{cfg.low}_{cfg.high}.pt"))
    control = ControlNet(unet).to(device)
    if cfg.sample_only:
        path = os.path.join(cfg.out, "ckpt.pt")
        state = common.load_checkpoint(path, device, hint="train first (drop --sample-only)")
        common.load_weights(control, state["ema"], path)
    else:
        x_train = load_digits(cfg, True, size, device)
        c_train = edge_maps(x_train, cfg.low, cfg.high, os.path.join(cfg.out, f"edges_train_{cfg.low}_{cfg.high}.pt"))
        control = train(cfg, ControlledUNet(unet, control), ddpm, x_train, c_train, device)
    make_figures(cfg, unet, control.eval(), ddpm, x_test, c_test, device)
    print(f"figures in {cfg.out}/")


if __name__ == "__main__":
    main()
