"""Rectified flow (Liu et al., 2022; Lipman et al., 2022) on MNIST, in pixel space or in the latent
space of latent_diffusion.py's VAE, and reflow: straightening the flow so that few steps suffice.

Convention: time t in [0, 1]; x0 ~ N(0, I) is NOISE at t = 0 and x1 is DATA at t = 1. Between a
noise/data pair the straight line x_t = (1 - t) x0 + t x1 has velocity dx_t/dt = x1 - x0, which a
network v_theta(x_t, t) learns by regression, t ~ U[0, 1]:
    L = E || (x1 - x0) - v_theta(x_t, t) ||^2
Its minimiser is v(x, t) = E[x1 - x0 | x_t = x]: where lines cross it averages them, so the ODE
dx/dt = v, integrated from noise at t = 0 to t = 1 with Euler steps
    x_{t+dt} = x_t + dt * v_theta(x_t, t),  dt = 1 / steps,
moves noise to data along curved paths (one Euler step lands on the blurry mean).
Reflow: draw noise x0, solve Flow-1's ODE once for x1 = Flow-1(x0), and train Flow-2 (initialised
from Flow-1) on these fixed pairs. Paired paths cross less: Flow-2's are straighter, few steps suffice.
Straightness of a path with endpoints x0, x1 (0 for a straight line at constant speed):
    S = int_0^1 || (x1 - x0) - v(x_t, t) ||^2 dt,  and its mean squared distance from the chord.
The velocity network is ddpm_mnist.py's UNet (latent_diffusion.py's one-level UNet for 4x7x7 latents),
fed 1000 t so that its sinusoidal time embedding sees DDPM's range of steps.

Run (into runs/rectified_flow/SPACE; flow_figures.py takes the same flags and makes the figures):
    python rectified_flow.py                      # pixel space: Flow-1, pairs, Flow-2, samples.png
    python rectified_flow.py --space latent       # in the VAE's latent space (trained when missing)
    python rectified_flow.py --sample-only        # samples.png from OUT/flow1.pt and OUT/flow2.pt
    python -m tools.flow_figures --sample-only --eval 10000   # error and FD against Euler steps, straightness
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import checkpoints
import common
import plots
import latent_diffusion as ld
from ddpm_mnist import PRESETS, UNet

KIND, PAIRS_KIND = "rectified_flow.py flow", "rectified_flow.py reflow pairs"


@dataclass
class Config(common.RunConfig):
    space: str = field(default="pixel", metadata={"choices": ["pixel", "latent"]})
    dataset: str = field(default="mnist", metadata={"help": "mnist, cifar10, or an image folder"})
    vae: str = field(default="runs/latent_diffusion/vae.pt", metadata={"help": "--space latent: "
                     "latent_diffusion.py's VAE, trained there when missing"})
    vae_epochs: int = field(default=20, metadata={"min": 1, "help": "epochs when the VAE must be trained first"})
    preset: str = field(default="mnist", metadata={"help": "pixel UNet", "choices": list(PRESETS)})
    unet_base: int = field(default=128, metadata={"min": 1, "help": "latent UNet width"})
    unet_res: int = field(default=2, metadata={"min": 1, "help": "latent UNet residual blocks per level"})
    epochs: int = field(default=30, metadata={"min": 1, "help": "Flow-1 epochs"})
    reflow_epochs: int = field(default=30, metadata={"min": 1, "help": "Flow-2 epochs on the fixed pairs"})
    n_pairs: int = field(default=20000, metadata={"min": 1, "help": "(noise, sample) pairs made by Flow-1"})
    pair_steps: int = field(default=100, metadata={"min": 1, "help": "Euler steps to make the pairs"})
    batch_size: int = field(default=128, metadata={"min": 1})
    lr: float = 5e-4
    warmup_steps: int = field(default=500, metadata={"min": 0})
    ema_decay: float = field(default=0.999, metadata={"min": 0})
    n_samples: int = field(default=64, metadata={"min": 1, "help": "images per grid and per timing"})
    sample_every: int = field(default=5, metadata={"min": 1, "help": "Flow-1 epochs between progress grids"})
    out: str = field(default="", metadata={"help": "default runs/rectified_flow/SPACE"})


def check_config(cfg: Config) -> None:
    """The checks that the flags' choices and minimums do not make; fills in the default --out."""
    common.check(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    common.check(cfg.ema_decay < 1, f"--ema-decay must be < 1, got {cfg.ema_decay}")
    cfg.out = cfg.out or os.path.join("runs/rectified_flow", cfg.space)


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
    g = common.generator(device, seed)
    x0 = torch.randn((n, *shape), device=device, generator=g)
    x1 = torch.cat([euler_sample(model, b, steps) for b in x0.split(batch_size)])
    return x0, x1


# ----------------------------------------------------------------------------- data: images or latents


class Space:
    """Where the flow runs: pixels (vae None), or the VAE's scaled latents z = s * mu(x) of shape
    (c_z, h, w). `to_images` maps a point of the space back to images in [-1, 1]."""

    def __init__(self, shape, vae=None, scale: float = 1.0):
        self.shape, self.vae, self.scale = tuple(shape), vae, scale

    def to_images(self, x):
        return x.clamp(-1, 1) if self.vae is None else ld.decode(self.vae, x, self.scale)


def load_space(cfg: Config, device) -> tuple[torch.Tensor, Space]:
    """-> (the training data x1 (N, ...) in the flow's space, the Space). Latents are s * mu(x) of
    the VAE at --vae, trained there when missing; --sample-only encodes one image, for the shape."""
    x1, _ = common.load_images(cfg.dataset, cfg.data_dir, True, cfg.download, device=device)  # data: t = 1
    if cfg.space == "pixel":
        return x1, Space(x1.shape[1:])
    vae, scale = (ld.load_vae(cfg.vae, device) if cfg.sample_only else
                  ld.ensure_vae(cfg.vae, x1, device, resume=cfg.resume, overwrite=cfg.overwrite, epochs=cfg.vae_epochs,
                                seed=cfg.seed, amp=cfg.amp))
    ld.check_vae_fits(vae, x1.shape[1:], cfg.vae)
    z = ld.encode_latents(vae, x1[:1] if cfg.sample_only else x1) * scale   # z = s * mu(x): unit variance
    return z, Space(z.shape[1:], vae, scale)


# ----------------------------------------------------------------------------- network


class VelocityUNet(UNet):
    """v_theta(x_t, t), t in [0, 1]: ddpm_mnist's UNet fed 1000 t (its embedding suits 0..1000)."""

    def forward(self, x, t):                         # x (N, C, H, W), t (N,) in [0, 1]
        return super().forward(x, 1000 * t)


def build_net(cfg: Config, shape) -> VelocityUNet:
    """The velocity network for points of shape (C, H, W): a PRESETS UNet on pixels, the latent UNet on latents."""
    if cfg.space == "latent":
        return ld.latent_unet(shape, cfg.unet_base, cfg.unet_res, cls=VelocityUNet)
    return VelocityUNet(shape[1], shape[0], **PRESETS[cfg.preset])


# ----------------------------------------------------------------------------- training


def train_flow(cfg: Config, stage: int, model: VelocityUNet, x1, x0, space: Space, device, resume: bool,
               flow1_step: int = 0):
    """Flow-1 (x0 None: fresh noise for every batch) or Flow-2 (x0: the fixed partner noise of every x1,
    made by Flow-1 after `flow1_step` steps): AdamW with warm-up, EMA weights that sample, one checkpoint
    OUT/flowSTAGE.pt per epoch; resume: continue that file. -> (the EMA network, the per-step losses)"""
    ckpt, epochs = os.path.join(cfg.out, f"flow{stage}.pt"), (cfg.epochs if stage == 1 else cfg.reflow_epochs)
    ema = common.make_ema(model, cfg.ema_decay)           # theta_ema, the weights that sample
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=device.type == "cuda")
    step, start, losses = 0, 0, []
    if resume:  # weights, EMA, optimizer and RNG come back; a changed network or space is refused
        same = ("space", "preset") if cfg.space == "pixel" else ("space", "unet_base", "unet_res")
        state = checkpoints.resume(ckpt, device, KIND, model, ema, opt, cfg, same + ("dataset",))
        step, start, losses = state["step"], state["epoch"], state["losses"]
    net = torch.compile(model) if cfg.compile else model
    print(f"Flow-{stage}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(x1)} {'data points' if x0 is None else 'fixed pairs'} of shape {space.shape}")
    batch = min(cfg.batch_size, len(x1))
    n_batches = len(x1) // batch
    for epoch in range(start, epochs):
        model.train()
        t0, epoch_losses = time.perf_counter(), []
        for x1_b, x0_b in common.progress(common.batches(x1, x0, batch, cfg.seed + epoch),
                                          f"Flow-{stage} epoch {epoch + 1}/{epochs}", n_batches):
            common.set_lr(opt, cfg.lr, step, cfg.warmup_steps, epochs * n_batches)
            with common.autocast(device, cfg.amp):    # || (x1 - x0) - v_theta(x_t, t) ||^2
                loss = rf_loss(net, x1_b, x0_b)           # x0_b None: fresh noise (Flow-1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update_parameters(model)                  # theta_ema <- d theta_ema + (1 - d) theta
            epoch_losses.append(loss.detach())            # on the device: no sync per step
            step += 1
        epoch_losses = torch.stack(epoch_losses)
        checkpoints.check_finite(epoch_losses.mean(), step, ckpt)   # before saving: the last good epoch stays
        losses += epoch_losses.tolist()
        seconds = time.perf_counter() - t0
        print(f"Flow-{stage} epoch {epoch + 1}/{epochs}  loss {epoch_losses.mean().item():.4f}  {seconds:.1f}s  "
              f"{n_batches * batch / seconds:.0f} samples/s", flush=True)
        checkpoints.save(ckpt, kind=KIND, net=model.config, config=asdict(cfg), flow1_step=flow1_step,
                         scale=space.scale, model=model.state_dict(), ema=ema.module.state_dict(),
                         opt=opt.state_dict(), step=step, epoch=epoch + 1, losses=losses, rng=checkpoints.rng_state())
        if stage == 1 and (epoch + 1) % cfg.sample_every == 0:             # progress grid (own generator)
            x0_grid = torch.randn((cfg.n_samples, *space.shape), device=device,
                                  generator=common.generator(device, cfg.seed))
            plots.save_labelled_grid(space.to_images(euler_sample(ema.module.eval(), x0_grid, 50)),
                                     os.path.join(cfg.out, f"flow1_epoch{epoch + 1:03d}.png"), 8, [],
                                     f"Flow-1 after epoch {epoch + 1}: 50 Euler steps, {cfg.space} space, EMA weights")
    return ema.module.eval(), losses


def get_pairs(path: str, flow1, flow1_step: int, n: int, shape, steps: int, seed: int, device, reuse: bool):
    """Reflow's pairs, made with `make_pairs` and kept in `path`: they never change while Flow-2
    trains, and with `reuse` (--resume) the file is used again when it came from this Flow-1 (same
    step, n, shape, Euler steps). Any other file there (older pairs, damaged, foreign) is replaced."""
    want = dict(kind=PAIRS_KIND, flow1_step=flow1_step, n=n, shape=tuple(shape), steps=steps, seed=seed)
    if reuse and os.path.isfile(path):
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception:                                 # a damaged file: made again below
            state = {}
        if isinstance(state, dict) and all(state.get(k) == v for k, v in want.items()) and "x1" in state:
            print(f"reflow pairs from {path}")
            return state["x0"], state["x1"]
        print(f"'{path}' holds no pairs of this Flow-1: making them again")
    t0 = time.perf_counter()
    x0, x1 = make_pairs(flow1, n, shape, steps, seed, device)
    checkpoints.save(path, x0=x0, x1=x1, **want)
    print(f"made {n} reflow pairs with {steps} Euler steps of Flow-1 in {time.perf_counter() - t0:.1f}s -> {path}")
    return x0, x1


def reflow(cfg: Config, x1, space: Space, device) -> tuple[VelocityUNet, VelocityUNet]:
    """Rectified flow, then reflow (Liu et al.): Flow-1 on (fresh noise, data x1), its ODE solutions as fixed
    pairs, Flow-2 initialised from Flow-1 and trained on them; --resume continues each. -> their EMA networks"""
    common.seed_everything(cfg.seed)                      # the same flows whether the VAE was trained now or not
    flow1, losses1 = train_flow(cfg, 1, build_net(cfg, space.shape).to(device), x1, None, space, device, cfg.resume)
    x0, x1 = get_pairs(os.path.join(cfg.out, "pairs.pt"), flow1, len(losses1), cfg.n_pairs, space.shape,
                       cfg.pair_steps, cfg.seed + 12345, device, reuse=cfg.resume)
    model = build_net(cfg, space.shape).to(device)
    model.load_state_dict(flow1.state_dict())            # reflow starts from Flow-1
    ckpt2 = os.path.join(cfg.out, "flow2.pt")
    resume2 = cfg.resume and os.path.isfile(ckpt2)        # a Flow-2 reflowed from this very Flow-1?
    if resume2 and checkpoints.load(ckpt2, device, KIND).get("flow1_step") != len(losses1):
        print(f"'{ckpt2}' was reflowed from an earlier Flow-1: Flow-2 starts again from this one")
        resume2 = False
    return flow1, train_flow(cfg, 2, model, x1, x0, space, device, resume2, flow1_step=len(losses1))[0]


def load_flow(path: str, device, space: Space) -> VelocityUNet:
    """The EMA velocity network of `path`, checked against the space (shape, VAE scale) it runs in."""
    state = checkpoints.load(path, device, KIND, keys=("net", "ema", "scale"),
                             hint="train first (drop --sample-only)")
    u = state["net"]
    common.check((u["channels"], u["image_size"]) == space.shape[:2] and state["scale"] == space.scale,
                 f"'{path}' was trained in another space than {'x'.join(map(str, space.shape))} "
                 f"(scale {space.scale:.4f}); pass the --space and --vae it was trained with")
    model = VelocityUNet(**u).to(device)
    checkpoints.load_weights(model, state["ema"], path)
    return model.eval()


def train_or_load(cfg: Config, device) -> tuple[VelocityUNet, VelocityUNet, Space]:
    """Train Flow-1 and Flow-2 (--resume: continue them), or load them (--sample-only). -> (flow1, flow2, space)"""
    ckpt1, ckpt2 = os.path.join(cfg.out, "flow1.pt"), os.path.join(cfg.out, "flow2.pt")
    if cfg.sample_only:                                   # the files first: never train a VAE only to stop
        for path in (ckpt1, ckpt2) + ((cfg.vae,) if cfg.space == "latent" else ()):
            common.check(os.path.isfile(path), f"--sample-only: '{path}' not found; train first (drop "
                         "--sample-only), or pass the --out (and --vae) of a trained run")
        common.prepare_out(cfg.out)
    else:                                                 # before any work: nothing is overwritten
        checkpoints.new_or_resume(ckpt1, cfg.resume, cfg.overwrite)
        if cfg.resume:                                    # a flow of this script, and the VAE it ran on
            checkpoints.load(ckpt1, device, KIND)
            common.check(cfg.space == "pixel" or os.path.isfile(cfg.vae), f"--resume: the VAE '{cfg.vae}' "
                         "is not found; pass the --vae this run was trained with")
        else:
            checkpoints.new_or_resume(ckpt2, False, cfg.overwrite)
    x1, space = load_space(cfg, device)
    if cfg.sample_only:
        return load_flow(ckpt1, device, space), load_flow(ckpt2, device, space), space
    if cfg.resume:
        load_flow(ckpt1, device, space)                   # the run to continue ran in this space
    flow1, flow2 = reflow(cfg, x1, space, device)
    return flow1, flow2, space


def main(argv=None) -> tuple[VelocityUNet, VelocityUNet]:
    """Train Flow-1 and Flow-2 (or load them, --sample-only); OUT/samples.png: Flow-1 and Flow-2 in 1 Euler
    step (top rows) and in 50 (bottom rows), all from the same noise. -> (Flow-1, Flow-2), the EMA networks"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    flow1, flow2, space = train_or_load(cfg, device)
    n = min(8, cfg.n_samples)
    x0 = torch.randn((n, *space.shape), device=device, generator=common.generator(device, cfg.seed))
    rows = [space.to_images(euler_sample(flow, x0, steps)) for steps in (1, 50) for flow in (flow1, flow2)]
    plots.save_labelled_grid(torch.cat(rows), os.path.join(cfg.out, "samples.png"), n, ["Flow-1, 1 step",
                             "Flow-2, 1 step", "Flow-1, 50 steps", "Flow-2, 50 steps"], f"Euler samples, {cfg.space} "
                             "space, the same noise in every column")
    print(f"samples in {cfg.out}/ (figures against Euler steps, straightness, FD: flow_figures.py)")
    return flow1, flow2


if __name__ == "__main__":
    main()
