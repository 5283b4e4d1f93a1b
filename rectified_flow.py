"""Rectified flow (Liu et al., 2022; Lipman et al., 2022) on MNIST, in pixel space or in the latent
space of latent_diffusion.py's VAE, and reflow: straightening the flow so that few steps suffice.

Convention (used everywhere below): time t in [0, 1]; x0 ~ N(0, I) is NOISE at t = 0 and x1 is
DATA at t = 1. Between a noise/data pair, the straight line
    x_t = (1 - t) x0 + t x1,  whose velocity is  dx_t/dt = x1 - x0.
A network v_theta(x_t, t) learns that velocity by regression, t ~ U[0, 1]:
    L = E || (x1 - x0) - v_theta(x_t, t) ||^2
Its minimiser is v(x, t) = E[x1 - x0 | x_t = x]: where lines cross it averages them, so the ODE
dx/dt = v(x, t), integrated from noise at t = 0 to t = 1 with Euler steps
    x_{t+dt} = x_t + dt * v_theta(x_t, t),  dt = 1 / steps,
moves noise to data along curved paths (one Euler step lands on the blurry mean).
Reflow: draw noise x0, solve the ODE of this Flow-1 for x1 = Flow-1(x0) once, and train Flow-2
(initialised from Flow-1) on these fixed pairs. Paired paths cross less, so Flow-2's paths are
straighter and few Euler steps suffice. Straightness of a path x_t with endpoints x0, x1:
    S = int_0^1 || (x1 - x0) - v(x_t, t) ||^2 dt   (0 for a straight line at constant speed)
and its mean squared deviation from the chord (1 - t) x0 + t x1.
The velocity network is ddpm_mnist.py's UNet (latent_diffusion.py's single-level one for 4x7x7
latents); it reads 1000 t so that its sinusoidal time embedding sees DDPM's range of steps.

Run:
    python rectified_flow.py                      # pixel space: Flow-1, pairs, Flow-2, figures
    python rectified_flow.py --space latent       # in the VAE's latent space (trained when missing)
    python rectified_flow.py --sample-only        # figures from OUT/flow1.pt and OUT/flow2.pt
    python rectified_flow.py --resume --eval 10000
Figures in OUT (runs/rectified_flow/SPACE): noise_vs_flow-1.png and noise_vs_flow-2.png (noise x0
on top, in latent space decoded by the VAE, over its generation below), steps_comparison.png (rows:
Flow-1 at each --steps, then Flow-2, same noise), steps_error.png, loss.png, and
steps_table.md (time, error against the many-step solution, straightness); with --eval N,
eval.md (FD-LeNet and classes found for every flow and step count).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import common
import latent_diffusion as ld
from ddpm_mnist import PRESETS, UNet


@dataclass
class Config:
    space: str = field(default="pixel", metadata={"choices": ["pixel", "latent"]})
    dataset: str = field(default="mnist", metadata={"help": "mnist, cifar10, or an image folder"})
    data_dir: str = field(default="data", metadata={"help": "root of the torchvision datasets"})
    download: bool = field(default=True, metadata={"help": "download mnist/cifar10 when missing"})
    vae: str = field(default="runs/latent_diffusion/vae.pt", metadata={"help": "--space latent: the VAE"})
    vae_epochs: int = field(default=20, metadata={"help": "epochs when the VAE must be trained first"})
    preset: str = field(default="mnist", metadata={"help": "pixel UNet", "choices": list(PRESETS)})
    unet_base: int = field(default=128, metadata={"help": "latent UNet width"})
    unet_res: int = 2
    epochs: int = field(default=30, metadata={"help": "Flow-1 epochs"})
    reflow_epochs: int = field(default=30, metadata={"help": "Flow-2 epochs on the fixed pairs"})
    n_pairs: int = field(default=20000, metadata={"help": "(noise, sample) pairs made by Flow-1"})
    pair_steps: int = field(default=100, metadata={"help": "Euler steps to make the pairs"})
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 500
    ema_decay: float = 0.999
    steps: tuple[int, ...] = field(default=(1, 2, 4, 8, 50), metadata={"help": "Euler steps to compare"})
    n_samples: int = field(default=64, metadata={"help": "images per grid and per timing"})
    sample_every: int = field(default=5, metadata={"help": "epochs between progress grids"})
    eval: int = field(default=0, metadata={"help": "score N samples per flow and step count with evaluate.py "
                      "into OUT/eval.md; 0 = off; costs N x 2 x sum(steps) UNet calls"})
    out: str = field(default="", metadata={"help": "default runs/rectified_flow/SPACE"})
    resume: bool = False
    sample_only: bool = field(default=False, metadata={"help": "load the flows and make figures, no training"})
    seed: int = 0
    device: str = "auto"
    amp: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the UNet"})


# ----------------------------------------------------------------------------- data: images or latents


class Space:
    """Where the flow runs: pixels, or the VAE's scaled latents z = s * mu(x). `to_images` maps a
    point of the space back to images in [-1, 1] for figures and evaluation."""

    def __init__(self, cfg: Config, device):
        x_train, _ = common.load_images(cfg.dataset, cfg.data_dir, True, cfg.download, device=device)
        self.vae, self.scale = None, 1.0
        if cfg.space == "latent":
            vae_cfg = ld.Config(dataset=cfg.dataset, data_dir=cfg.data_dir, download=cfg.download, vae=cfg.vae,
                                vae_epochs=cfg.vae_epochs, seed=cfg.seed, amp=cfg.amp)
            self.vae, self.scale = ld.ensure_vae(vae_cfg, x_train, device)
            x_train = ld.encode_latents(self.vae, x_train) * self.scale   # (N, c_z, h, w), unit variance
        self.x1 = x_train                                                   # data, t = 1
        self.shape = tuple(x_train.shape[1:])

    def to_images(self, x):
        return x.clamp(-1, 1) if self.vae is None else ld.decode(self.vae, x, self.scale)


# ----------------------------------------------------------------------------- network


class VelocityUNet(UNet):
    """v_theta(x_t, t), t in [0, 1]: ddpm_mnist's UNet fed 1000 t (its embedding suits 0..1000)."""

    def forward(self, x, t):                         # x (N, C, H, W), t (N,) in [0, 1]
        return super().forward(x, 1000 * t)


def build_net(cfg: Config, shape) -> VelocityUNet:
    if cfg.space == "latent":
        return ld.latent_unet(shape, cfg.unet_base, cfg.unet_res, cls=VelocityUNet)
    return VelocityUNet(shape[1], shape[0], **PRESETS[cfg.preset])


# ----------------------------------------------------------------------------- the method


def rf_loss(model, x1, x0=None):
    """|| (x1 - x0) - v_theta(x_t, t) ||^2 with x_t = (1 - t) x0 + t x1, t ~ U[0, 1].
    x0 = None draws fresh noise (Flow-1); reflow passes its fixed partner noise."""
    x0 = torch.randn_like(x1) if x0 is None else x0
    t = torch.rand(len(x1), device=x1.device)
    tb = t.view(-1, *[1] * (x1.dim() - 1))
    x_t = (1 - tb) * x0 + tb * x1
    return F.mse_loss(model(x_t, t).float(), x1 - x0)


@torch.no_grad()
def euler_sample(model, x0, steps: int, return_path: bool = False):
    """Integrate dx/dt = v(x, t) from noise x0 at t = 0 to t = 1: x_{t+dt} = x_t + dt v(x_t, t).
    -> x1, or (x1, path (steps + 1, N, ...)) with every intermediate x_t."""
    common.check(steps >= 1, f"Euler steps must be >= 1, got {steps}")
    x, dt, path = x0, 1.0 / steps, [x0]
    for i in range(steps):
        t = torch.full((len(x),), i * dt, device=x.device)
        x = x + dt * model(x, t).float()
        if return_path:
            path.append(x)
    return (x, torch.stack(path)) if return_path else x


def straightness(path) -> tuple[float, float]:
    """-> (S, deviation) of Euler paths (K + 1, N, ...), per dimension, averaged over the N paths:
    S = mean_k ||(x1 - x0) - v_k||^2 with v_k = (x_{k+1} - x_k) K, the velocity on step k, and
    deviation = mean_k ||x_{t_k} - ((1 - t_k) x0 + t_k x1)||^2, the distance from the chord."""
    K = len(path) - 1
    x0, x1 = path[0], path[-1]
    v = (path[1:] - path[:-1]) * K
    t = torch.linspace(0, 1, K + 1, device=path.device).view(-1, *[1] * (path.dim() - 1))
    S = (v - (x1 - x0)).pow(2).mean().item()
    deviation = (path - ((1 - t) * x0 + t * x1)).pow(2).mean().item()
    return S, deviation


def make_pairs(model, n: int, shape, steps: int, seed: int, device, batch_size: int = 1000):
    """Reflow's training set, made ONCE: noise x0 and Flow-1's ODE solution x1 = Flow-1(x0)."""
    g = torch.Generator(device).manual_seed(seed)
    x0 = torch.randn((n, *shape), device=device, generator=g)
    x1 = torch.cat([euler_sample(model, b, steps) for b in x0.split(batch_size)])
    return x0, x1


# ----------------------------------------------------------------------------- training


def ckpt_path(cfg: Config, stage: int) -> str:
    return os.path.join(cfg.out, f"flow{stage}.pt")


def train_flow(cfg: Config, stage: int, space: Space, x1, x0, init=None, on_epoch=None):
    """Flow-1 (x0 None: fresh noise per batch) or Flow-2 (x0: the fixed partner of every x1).
    -> (the EMA network, the per-step losses)"""
    ckpt, device = ckpt_path(cfg, stage), x1.device
    model = build_net(cfg, space.shape).to(device)
    if init is not None:
        model.load_state_dict(init.state_dict())    # reflow starts from Flow-1 (Liu et al.)
    epochs = cfg.epochs if stage == 1 else cfg.reflow_epochs
    partner = x0 if x0 is not None else x1.new_zeros(len(x1))
    loss = (lambda net, b: rf_loss(net, b[0])) if x0 is None else (lambda net, b: rf_loss(net, b[0], b[1]))
    gen = torch.Generator().manual_seed(cfg.seed + stage)
    print(f"Flow-{stage}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(x1)} {'data points' if x0 is None else 'fixed pairs'} of shape {space.shape}")
    model, losses = common.fit(
        model, loss, lambda epoch: common.batches(x1, partner, cfg.batch_size, generator=gen),
        epochs=epochs, ckpt=ckpt, device=device, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        ema_decay=cfg.ema_decay, resume=cfg.resume and (stage == 1 or os.path.isfile(ckpt)),
        amp=cfg.amp, compile=cfg.compile, on_epoch=on_epoch, config=asdict(cfg), unet=model.config,
        scale=space.scale)
    return model, losses


def load_flow(cfg: Config, stage: int, space: Space, device) -> VelocityUNet:
    path = ckpt_path(cfg, stage)
    state = common.load_checkpoint(path, device, hint="train first (drop --sample-only)")
    u = state.get("unet", {})
    common.check((u.get("channels"), u.get("image_size")) == space.shape[:2] and state["scale"] == space.scale,
                 f"'{path}' was trained in another space than {'x'.join(map(str, space.shape))} "
                 f"(scale {space.scale:.4f}); pass the --space and --vae it was trained with")
    model = VelocityUNet(**u).to(device)
    common.load_weights(model, state["ema"], path)
    return model.eval()


def get_pairs(cfg: Config, flow1, space: Space, device):
    """Make the pairs with `make_pairs` and save them to OUT/pairs.pt: they never change while
    Flow-2 trains, and --resume reuses the file (a fresh run has a fresh Flow-1, so new pairs)."""
    path = os.path.join(cfg.out, "pairs.pt")
    if cfg.resume and os.path.isfile(path):
        state = common.load_checkpoint(path, device)
        if tuple(state["x0"].shape) == (cfg.n_pairs, *space.shape):
            print(f"reflow pairs from {path}")
            return state["x0"], state["x1"]
    t0 = time.perf_counter()
    x0, x1 = make_pairs(flow1, cfg.n_pairs, space.shape, cfg.pair_steps, cfg.seed + 12345, device)
    common.save_checkpoint(path, x0=x0, x1=x1, steps=cfg.pair_steps)
    print(f"made {cfg.n_pairs} reflow pairs with {cfg.pair_steps} Euler steps of Flow-1 in "
          f"{time.perf_counter() - t0:.1f}s -> {path}")
    return x0, x1


# ----------------------------------------------------------------------------- figures


def compare(cfg: Config, flows: dict, space: Space, device) -> None:
    """One figure and one table: each flow at each number of Euler steps, from the same noise."""
    x0 = torch.randn((cfg.n_samples, *space.shape), device=device,
                     generator=torch.Generator(device).manual_seed(cfg.seed))
    grid, table, curves = [], [], {}
    ref_steps = max(max(cfg.steps), cfg.pair_steps)
    for name, model in flows.items():
        x_ref, path = euler_sample(model, x0, ref_steps, return_path=True)
        S, dev = straightness(path)
        print(f"{name}: straightness S = {S:.4f}, deviation from the chord {dev:.4f} ({ref_steps} steps)")
        common.save_grid(torch.cat([space.to_images(x0[:8]), space.to_images(x_ref[:8])]),
                         os.path.join(cfg.out, f"noise_vs_{name.lower()}.png"), nrow=8)
        for steps in cfg.steps:
            x, seconds = common.timed(device, lambda: euler_sample(model, x0, steps))   # decoding not included
            err = (x - x_ref).pow(2).mean().item()
            grid.append(space.to_images(x[:8]))
            curves.setdefault(name, []).append((steps, err))
            table.append([name, steps, f"{seconds:.3f}", f"{err:.4f}", f"{S:.4f}", f"{dev:.4f}"])
    header = ["flow", "Euler steps", f"seconds / {cfg.n_samples}", f"MSE to the {ref_steps}-step solution",
              "straightness S", "deviation from the chord"]
    print(common.write_table(os.path.join(cfg.out, "steps_table.md"), header, table))
    common.save_grid(torch.cat(grid), os.path.join(cfg.out, "steps_comparison.png"), nrow=8)
    common.plot_curves(os.path.join(cfg.out, "steps_error.png"), curves, xlabel="Euler steps",
                       ylabel=f"MSE to the {ref_steps}-step solution", title="few-step error: Flow-1 vs Flow-2")
    if cfg.eval:  # opt-in: FD in a cached classifier's features (see evaluate.py)
        import evaluate
        ev = evaluate.Evaluator(cfg.dataset, cfg.data_dir, cfg.download, device)
        samplers = {(name, steps): lambda z, g, m=model, s=steps: space.to_images(euler_sample(m, z, s))
                    for name, model in flows.items() for steps in cfg.steps}
        evaluate.score_sweep(ev, samplers, cfg.eval, space.shape, device, os.path.join(cfg.out, "eval.md"),
                             cfg.seed, amp=cfg.amp)


def main(argv=None) -> None:
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    cfg.out = cfg.out or os.path.join("runs/rectified_flow", cfg.space)
    common.check(min(cfg.epochs, cfg.reflow_epochs, cfg.n_pairs, cfg.pair_steps, cfg.batch_size) >= 1,
                 "--epochs, --reflow-epochs, --n-pairs, --pair-steps and --batch-size must be >= 1")
    common.check(cfg.n_samples >= 1 and min(cfg.steps) >= 1, "--n-samples and every --steps must be >= 1")
    common.check(cfg.eval == 0 or cfg.eval >= 2, f"--eval must be 0 (off) or >= 2 samples, got {cfg.eval}")
    common.seed_everything(cfg.seed)
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    os.makedirs(cfg.out, exist_ok=True)
    space = Space(cfg, device)
    if cfg.sample_only:
        flow1, flow2 = load_flow(cfg, 1, space, device), load_flow(cfg, 2, space, device)
    else:
        def progress(epoch, net):
            if epoch % cfg.sample_every == 0:
                x0 = torch.randn((cfg.n_samples, *space.shape), device=device,
                                 generator=torch.Generator(device).manual_seed(cfg.seed))
                common.save_grid(space.to_images(euler_sample(net, x0, 50)),
                                 os.path.join(cfg.out, f"flow1_epoch{epoch:03d}.png"))
        flow1, losses1 = train_flow(cfg, 1, space, space.x1, None, on_epoch=progress)
        x0, x1 = get_pairs(cfg, flow1, space, device)
        flow2, losses2 = train_flow(cfg, 2, space, x1, x0, init=flow1)
        common.plot_curves(os.path.join(cfg.out, "loss.png"), {      # Flow-2's steps follow Flow-1's
            "Flow-1": common.smooth(losses1),
            "Flow-2 (reflow)": [(len(losses1) + i, v) for i, v in common.smooth(losses2)]})
    compare(cfg, {"Flow-1": flow1, "Flow-2": flow2}, space, device)
    print(f"figures in {cfg.out}/")


if __name__ == "__main__":
    main()
