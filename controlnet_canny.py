"""ControlNet (Zhang et al., 2023) on Canny edges: steer a frozen, pretrained diffusion UNet with
an edge map, by training only a copy of its encoder.

ddpm_mnist.py's pretrained eps_theta(x_t, t) is frozen. A trainable copy of its encoder half (time
MLP, input conv, down levels, middle blocks; initialised with the frozen weights) reads x_t, t and
the condition c, a Canny edge map of the digit, through a small hint encoder:
    h_0 = inc(x_t) + hint(c),   then the copied down blocks give d_1..d_n, the middle blocks m.
Each copied feature leaves through its own *zero convolution* (1x1, weight and bias zero at the
start) into the frozen UNet's matching skip connection s_i or its bottleneck b; then the frozen
decoder runs:    s_i <- s_i + zero_conv_i(d_i),   b <- b + zero_conv_mid(m).
At initialisation the controlled UNet *is* the pretrained one (no harmful noise at the start), yet
the zero convolutions get gradients at once (their input is not zero), and through them the copy.
Only the control branch is trained, with the usual L = || eps - eps_theta(x_t, t, c) ||^2. Edges:
cv2.Canny (as ControlNet's own annotator), thresholds --low < --high, cached in OUT/edges_*.pt.

Run:
    python controlnet_canny.py                   # base: runs/ddpm_mnist/ckpt.pt (trained first if missing)
    python controlnet_canny.py --low 50 --high 150 --epochs 20 --out runs/controlnet_50_150
    python controlnet_canny.py --resume --epochs 20   # continue OUT/ckpt.pt up to epoch 20
    python controlnet_canny.py --sample-only     # control.png again, from OUT/ckpt.pt
    python -m tools.controlnet_fidelity                # do the edges steer? edge F1 against unconditional samples
Writes OUT/ckpt.pt, loss.png and control.png (a row per test digit: edge map, samples, the digit).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
import torch
import torch.nn as nn

import checkpoints
import common
import plots
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
    warmup_steps: int = field(default=0, metadata={"help": "lr warm-up (zero convolutions need none)", "min": 0})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA of the control branch (sampled with)"})
    ddim_steps: int = field(default=50, metadata={"min": 1})
    n_digits: int = field(default=8, metadata={"help": "test digits (rows) in control.png", "min": 1})
    samples_per_edge: int = field(default=4, metadata={"help": "samples per edge map in control.png", "min": 1})
    out: str = "runs/controlnet_canny"


def check_config(cfg: Config) -> None:
    """The checks that "min" cannot make (--ddim-steps is checked against the base's T once it is loaded)."""
    common.check(cfg.low < cfg.high, f"Canny thresholds must satisfy --low < --high, got {cfg.low}, {cfg.high}")
    common.check(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    common.check(0 <= cfg.ema_decay < 1, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")


# ----------------------------------------------------------------------------- the condition and the sampler


def canny(x: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """cv2.Canny on each image: x in [-1, 1] (N, 1, H, W) -> edges c in {0, 1}, float (N, 1, H, W)."""
    u8 = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    e = np.stack([cv2.Canny(im[0], low, high) > 0 for im in u8])          # (N, H, W) bool
    return torch.from_numpy(e)[:, None].float().to(x.device)


def sample(ddpm: ddpm_mnist.DDPM, model: ControlledUNet, c, x_T, steps: int):
    """DDIM (eta = 0, x0_hat clipped as ddpm_mnist.py samples) from x_T, every step conditioned on the edge maps c."""
    return ddpm.ddim_sample(ddpm.eps_from(lambda x, t: model(x, t, c), clip=True), x_T.shape, steps, x_T=x_T)


# ----------------------------------------------------------------------------- network


def zero_conv(c: int) -> nn.Conv2d:
    """A zero convolution: 1x1, weight and bias zero, so a new branch starts out adding nothing."""
    conv = nn.Conv2d(c, c, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def encode(net, h, emb):
    """The encoder half of ddpm_mnist.UNet (or of its trainable copy) from h = inc(x_t): -> (the
    middle blocks' output, [every down block's output, shallowest first]: the skips)"""
    skips = []
    for level in net.downs:
        for block in level.blocks:
            h = block(h, emb)
            skips.append(h)
        h = level.resample(h)
    for block in net.mid:
        h = block(h, emb)
    return h, skips


class EncoderCopy(nn.Module):
    """The trainable copy of the UNet's encoder half: its time MLP, input conv, down levels and middle
    blocks, built as ddpm_mnist.UNet builds them (same parameter names), then given its weights."""

    def __init__(self, unet: ddpm_mnist.UNet):
        super().__init__()
        cfg = unet.config
        base, dropout, last, c = cfg["base"], cfg["dropout"], len(cfg["mults"]) - 1, cfg["base"]
        self.base, t_dim = base, 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.inc = nn.Conv2d(cfg["channels"], base, 3, padding=1)
        self.downs = nn.ModuleList()
        for i, m in enumerate(cfg["mults"]):
            blocks = []
            for _ in range(cfg["num_res"]):
                blocks.append(ddpm_mnist.ResBlock(c, base * m, t_dim, dropout, i == last))
                c = base * m
            self.downs.append(ddpm_mnist.Level(blocks, nn.Conv2d(c, c, 3, stride=2, padding=1) if i < last
                                               else nn.Identity()))
        self.mid = nn.ModuleList([ddpm_mnist.ResBlock(c, c, t_dim, dropout, attn) for attn in (True, False)])
        mine = self.state_dict()                         # then the frozen weights
        self.load_state_dict({k: v for k, v in unet.state_dict().items() if k in mine})

    def embed_time(self, t):                             # t (N,) -> (N, t_dim), as the UNet embeds it
        return self.time_mlp(common.timestep_embedding(t, self.base))


class ControlNet(nn.Module):
    """The control branch: the encoder copy, the hint encoder, and a zero convolution per feature.
    (x_t, t, c) -> (zero_conv_mid(m), [zero_conv_i(d_i), shallowest first])"""

    def __init__(self, unet: ddpm_mnist.UNet):
        super().__init__()
        self.encoder = EncoderCopy(unet)
        self.hint = nn.Sequential(                      # c (N, 1, H, W) -> (N, base, H, W)
            nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, unet.config["base"], 3, padding=1))
        nn.init.zeros_(self.hint[-1].weight)            # the copy first sees exactly inc(x_t)
        nn.init.zeros_(self.hint[-1].bias)
        skip_channels = [b.conv2.out_channels for level in unet.downs for b in level.blocks]
        self.zero_convs = nn.ModuleList([zero_conv(ch) for ch in skip_channels])
        self.zero_conv_mid = zero_conv(unet.mid[-1].conv2.out_channels)

    def forward(self, x, t, c):
        e = self.encoder
        emb = e.embed_time(t)
        m, d = encode(e, e.inc(x) + self.hint(c), emb)  # h_0 = inc(x_t) + hint(c)
        return self.zero_conv_mid(m), [zc(d_i) for zc, d_i in zip(self.zero_convs, d)]


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
        u = self.unet
        emb = u.embed_time(t)
        with torch.no_grad():                           # nothing of the frozen encoder is trained
            b, skips = encode(u, u.inc(x), emb)
        r_mid, r_skips = self.control(x, t, c)
        h = b + r_mid                                   # b + zero_conv_mid(m)
        skips = [s + r for s, r in zip(skips, r_skips)]  # s_i + zero_conv_i(d_i)
        for level in u.ups:                             # the frozen decoder, each block taking the last skip
            for block in level.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            h = level.resample(h)
        return u.out(h)


# ----------------------------------------------------------------------------- training


def train(cfg: Config, unet: ddpm_mnist.UNet, ddpm: ddpm_mnist.DDPM, x_train, c_train, device):
    """L = || eps - eps_theta(x_t, t, c) ||^2 through the frozen UNet. Only the control branch is
    optimised, averaged (EMA) and saved, to OUT/ckpt.pt after every epoch.
    -> (the EMA control branch, the per-step losses)"""
    ckpt = os.path.join(cfg.out, "ckpt.pt")
    control = ControlNet(unet).to(device)
    model = ControlledUNet(unet, control)                # freezes the UNet
    net = torch.compile(model) if cfg.compile else model
    ema = common.make_ema(control, cfg.ema_decay)        # the control branch that samples
    opt = torch.optim.AdamW(control.parameters(), lr=cfg.lr, weight_decay=0.0, fused=device.type == "cuda")
    step, start, losses = 0, 0, []
    if cfg.resume:   # weights, EMA, optimizer and RNG come back; the thresholds define the task: kept
        state = checkpoints.resume(ckpt, device, KIND, control, ema, opt, cfg, same=("low", "high"))
        step, start, losses = state["step"], state["epoch"], state["losses"]
    print(f"ControlNet: {sum(p.numel() for p in control.parameters()) / 1e6:.2f}M trainable, UNet "
          f"{sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M frozen; {len(x_train)} digits on {device}")
    batch = min(cfg.batch_size, len(x_train))
    n_batches = len(x_train) // batch
    for epoch in range(start, cfg.epochs):
        model.train()
        t0, epoch_losses = time.perf_counter(), []
        for x0, c in common.progress(common.batches(x_train, c_train, cfg.batch_size, cfg.seed + epoch),
                                     f"epoch {epoch + 1}/{cfg.epochs}", n_batches):
            common.set_lr(opt, cfg.lr, step, cfg.warmup_steps, cfg.epochs * n_batches)
            with common.autocast(device, cfg.amp):
                loss = ddpm.loss(lambda x_t, t: net(x_t, t, c), x0)     # || eps - eps_theta(x_t, t, c) ||^2
            opt.zero_grad(set_to_none=True)
            loss.backward()                              # reaches the zero convolutions, then the copied encoder
            opt.step()
            ema.update_parameters(control)               # theta_ema <- d theta_ema + (1 - d) theta
            epoch_losses.append(loss.detach())           # on the device: no sync per step
            step += 1
        epoch_losses = torch.stack(epoch_losses)
        checkpoints.check_finite(epoch_losses.mean(), step, ckpt)   # before saving: the last good epoch stays
        common.sync(device)
        seconds = time.perf_counter() - t0
        print(f"epoch {epoch + 1}/{cfg.epochs}  loss {epoch_losses.mean().item():.4f}  {seconds:.1f}s  "
              f"{len(epoch_losses) * batch / seconds:.0f} img/s", flush=True)
        losses = losses + epoch_losses.tolist()
        checkpoints.save(ckpt, kind=KIND, net=unet.config, config=asdict(cfg), model=control.state_dict(),
                         ema=ema.module.state_dict(), opt=opt.state_dict(), step=step, epoch=epoch + 1,
                         losses=losses, rng=checkpoints.rng_state())
    return ema.module.eval(), losses


# ----------------------------------------------------------------------------- edges, figure, main


def edge_maps(x: torch.Tensor, low: int, high: int, path: str) -> torch.Tensor:
    """The Canny edges of a dataset, cached in `path` (computed again for other images, or a bad file)."""
    key = dict(n=len(x), pixel_sum=round(x.double().sum().item(), 3))
    try:
        state = torch.load(path, map_location=x.device, weights_only=True)
        if state["key"] == key and state["edges"].shape == x.shape:
            return state["edges"].float()
    except Exception:                                   # missing, damaged, or not an edge cache
        pass
    edges = canny(x, low, high)
    checkpoints.save(path, edges=edges.bool(), key=key)
    return edges


@torch.no_grad()
def control_figure(model: ControlledUNet, ddpm, x_test, c_test, n: int, k: int, steps: int, g, path: str) -> None:
    """control.png: a row per test digit i < n: its edge map, k samples steered by it (noise from g), the digit."""
    c = c_test[:n].repeat_interleave(k, 0)                                # (n k, 1, H, W)
    x = sample(ddpm, model, c, torch.randn(c.shape, device=c.device, generator=g), steps)
    rows = [torch.cat([c_test[i:i + 1] * 2 - 1, x[i * k:(i + 1) * k], x_test[i:i + 1]]) for i in range(n)]
    plots.save_labelled_grid(torch.cat(rows), path, k + 2, [f"test digit {i + 1}" for i in range(n)],
                             f"ControlNet: samples steered by each edge map ({steps} DDIM steps)",
                             f"columns: the edge map, {k} samples steered by it, the test digit it came from")


def load(base_ckpt: str, device, data_dir: str, download: bool, ddim_steps: int, ckpt: str | None = None):
    """-> (the frozen base UNet, its DDPM, the checkpoint `ckpt` of a ControlNet trained on it, or None)"""
    base = ddpm_mnist.ensure_trained(base_ckpt, device, data_dir=data_dir, download=download)
    unet, ddpm, _ = ddpm_mnist.load_trained(base, device)
    common.check(unet.config["channels"] == 1, f"'{base}' is not a grayscale (MNIST) UNet; Canny control needs one")
    common.check(ddim_steps <= ddpm.T, f"--ddim-steps must be <= T = {ddpm.T} of '{base}', got {ddim_steps}")
    if ckpt is None:
        return unet, ddpm, None
    state = checkpoints.load(ckpt, device, KIND, keys=("net", "ema", "config"))
    common.check(state["net"] == unet.config, f"'{ckpt}' steers a UNet {state['net']}, but --base-ckpt "
                 f"'{base}' is a UNet {unet.config}; pass the base it was trained on")
    return unet, ddpm, state


def main(argv=None) -> None:
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    ckpt = os.path.join(cfg.out, "ckpt.pt")
    if cfg.sample_only:                                  # before any work: is there a ControlNet to sample?
        common.check(os.path.isfile(ckpt), f"--sample-only: there is no checkpoint '{ckpt}'; train first "
                     "(drop --sample-only), or pass the --out of a trained run")
    else:
        checkpoints.new_or_resume(ckpt, cfg.resume, cfg.overwrite)
    common.prepare_out(cfg.out)
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    common.seed_everything(cfg.seed)
    unet, ddpm, state = load(cfg.base_ckpt, device, cfg.data_dir, cfg.download, cfg.ddim_steps,
                             ckpt if cfg.sample_only or cfg.resume else None)   # (does it steer this base?)
    size = unet.config["image_size"]                    # the test digits, then (training) the training digits
    x_test = common.load_images("mnist", cfg.data_dir, False, cfg.download, size, 1, device)[0]
    c_test = edge_maps(x_test, cfg.low, cfg.high, os.path.join(cfg.out, f"edges_test_{cfg.low}_{cfg.high}.pt"))
    if cfg.sample_only:
        control = ControlNet(unet).to(device)
        checkpoints.load_weights(control, state["ema"], ckpt)
    else:
        x_train = common.load_images("mnist", cfg.data_dir, True, cfg.download, size, 1, device)[0]
        c_train = edge_maps(x_train, cfg.low, cfg.high, os.path.join(cfg.out, f"edges_train_{cfg.low}_{cfg.high}.pt"))
        control, losses = train(cfg, unet, ddpm, x_train, c_train, device)
        plots.plot_curves(os.path.join(cfg.out, "loss.png"), {"train loss": plots.smooth(losses)},
                          title="ControlNet: training loss of the control branch (the UNet frozen)")
    control_figure(ControlledUNet(unet, control.eval()).eval(), ddpm, x_test, c_test, min(cfg.n_digits, len(x_test)),
                   cfg.samples_per_edge, cfg.ddim_steps, common.generator(device, cfg.seed),
                   os.path.join(cfg.out, "control.png"))
    print(f"figures in {cfg.out}/")


if __name__ == "__main__":
    main()
