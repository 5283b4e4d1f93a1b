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
    python rectified_flow.py --resume --eval 10000  # continue an interrupted run, then score the flows
Figures in OUT (runs/rectified_flow/SPACE): noise_vs_flow-1.png and noise_vs_flow-2.png (noise x0
on top, in latent space decoded by the VAE, over its generation below), steps_comparison.png (rows:
Flow-1 at each --steps, then Flow-2, same noise), steps_error.png, loss.png, and
steps_table.md (time, error against the many-step solution, straightness); with --eval N,
eval.md (FD-LeNet and classes found for every flow and step count).
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import common
import latent_diffusion as ld
from ddpm_mnist import PRESETS, UNet

KIND, PAIRS_KIND = "rectified_flow.py flow", "rectified_flow.py reflow pairs"


@dataclass
class Config(common.RunConfig):
    space: str = field(default="pixel", metadata={"choices": ["pixel", "latent"]})
    dataset: str = field(default="mnist", metadata={"help": "mnist, cifar10, or an image folder"})
    vae: str = field(default="runs/latent_diffusion/vae.pt", metadata={"help": "--space latent: the VAE of "
                     "latent_diffusion.py, trained there (its defaults) when missing"})
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
    steps: tuple[int, ...] = field(default=(1, 2, 4, 8, 50), metadata={"min": 1, "help": "Euler steps to compare"})
    n_samples: int = field(default=64, metadata={"min": 1, "help": "images per grid and per timing"})
    sample_every: int = field(default=5, metadata={"min": 1, "help": "Flow-1 epochs between progress grids"})
    eval: int = field(default=0, metadata={"min": 0, "help": "score N samples per flow and step count with "
                      "evaluate.py into OUT/eval.md; 0 = off; costs N x 2 x sum(steps) UNet calls"})
    out: str = field(default="", metadata={"help": "default runs/rectified_flow/SPACE"})


def check_config(cfg: Config) -> None:
    """The checks that the flags' choices and minimums do not make."""
    common.check(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    common.check(cfg.ema_decay < 1, f"--ema-decay must be < 1, got {cfg.ema_decay}")
    common.check(cfg.eval != 1, "--eval must be 0 (off) or >= 2 samples, got 1")


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
    """Flow-1 (x0 None: fresh noise for every batch) or Flow-2 (x0: the fixed partner noise of
    every x1, made by Flow-1 after `flow1_step` steps), one checkpoint OUT/flowSTAGE.pt per epoch;
    resume: continue that file. -> (the EMA network, the per-step losses)"""
    ckpt, epochs = os.path.join(cfg.out, f"flow{stage}.pt"), (cfg.epochs if stage == 1 else cfg.reflow_epochs)
    run = common.Run(model, ckpt, KIND, device, cfg.lr, cfg.ema_decay)   # + the EMA, AdamW, step and losses
    if resume:
        same = ("space", "preset") if cfg.space == "pixel" else ("space", "unet_base", "unet_res")
        run.resume(cfg, same + ("dataset",))
    net = torch.compile(model) if cfg.compile else model
    print(f"Flow-{stage}: {run.millions():.2f}M parameters, "
          f"{len(x1)} {'data points' if x0 is None else 'fixed pairs'} of shape {space.shape}")
    n_batches = len(x1) // min(cfg.batch_size, len(x1))
    for epoch in range(run.epoch, epochs):
        model.train()
        run.new_epoch(f"Flow-{stage} epoch {epoch + 1}/{epochs}", "samples/s")
        for x1_b, x0_b in common.progress(common.batches(x1, x0, cfg.batch_size, cfg.seed + epoch),
                                          f"Flow-{stage} epoch {epoch + 1}/{epochs}", n_batches):
            common.set_lr(run.opt, cfg.lr, run.step, cfg.warmup_steps, epochs * n_batches)
            with common.autocast(device, cfg.amp):    # || (x1 - x0) - v_theta(x_t, t) ||^2
                loss = rf_loss(net, x1_b, x0_b)           # x0_b None: fresh noise (Flow-1)
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            run.opt.step()
            run.ema.update_parameters(model)
            run.add(loss, len(x1_b))
        run.end_epoch(net=model.config, config=asdict(cfg), flow1_step=flow1_step, scale=space.scale)
        if stage == 1 and (epoch + 1) % cfg.sample_every == 0:             # progress grid (own generator)
            x0_grid = torch.randn((cfg.n_samples, *space.shape), device=device,
                                  generator=common.generator(device, cfg.seed))
            common.save_grid(space.to_images(euler_sample(run.ema.module.eval(), x0_grid, 50)),
                             os.path.join(cfg.out, f"flow1_epoch{epoch + 1:03d}.png"))
    return run.ema.module.eval(), run.losses


def load_flow(path: str, device, space: Space) -> VelocityUNet:
    """The EMA velocity network of `path`, checked against the space (shape, VAE scale) it runs in."""
    state = common.load_checkpoint(path, device, KIND, keys=("net", "ema", "scale"),
                                   hint="train first (drop --sample-only)")
    u = state["net"]
    common.check((u["channels"], u["image_size"]) == space.shape[:2] and state["scale"] == space.scale,
                 f"'{path}' was trained in another space than {'x'.join(map(str, space.shape))} "
                 f"(scale {space.scale:.4f}); pass the --space and --vae it was trained with")
    model = VelocityUNet(**u).to(device)
    common.load_weights(model, state["ema"], path)
    return model.eval()


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
    common.save_checkpoint(path, x0=x0, x1=x1, **want)
    print(f"made {n} reflow pairs with {steps} Euler steps of Flow-1 in {time.perf_counter() - t0:.1f}s -> {path}")
    return x0, x1


# ----------------------------------------------------------------------------- figures


def compare(cfg: Config, flows: dict, space: Space, device) -> dict:
    """One figure and one table: each flow at each number of Euler steps, from the same noise.
    -> {steps: [{flow, steps, seconds, mse (to the many-step solution), S, deviation}], eval: score_sweep's rows}"""
    x0 = torch.randn((cfg.n_samples, *space.shape), device=device,
                     generator=common.generator(device, cfg.seed))
    grid, table, curves, rows = [], [], {}, []
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
            rows.append(dict(flow=name, steps=steps, seconds=seconds, mse=err, S=S, deviation=dev))
    header = ["flow", "Euler steps", f"seconds / {cfg.n_samples}", f"MSE to the {ref_steps}-step solution",
              "straightness S", "deviation from the chord"]
    print(common.write_table(os.path.join(cfg.out, "steps_table.md"), header, table))
    common.save_grid(torch.cat(grid), os.path.join(cfg.out, "steps_comparison.png"), nrow=8)
    common.plot_curves(os.path.join(cfg.out, "steps_error.png"), curves, xlabel="Euler steps",
                       ylabel=f"MSE to the {ref_steps}-step solution", title="few-step error: Flow-1 vs Flow-2")
    scored = []
    if cfg.eval:  # opt-in: FD in a cached classifier's features (see evaluate.py)
        import evaluate
        ev = evaluate.Evaluator(cfg.dataset, cfg.data_dir, cfg.download, device)

        def euler(model, steps, z, g):
            return space.to_images(euler_sample(model, z, steps))
        samplers = {(name, steps): functools.partial(euler, model, steps) for name, model in flows.items()
                    for steps in cfg.steps}
        scored = evaluate.score_sweep(ev, samplers, cfg.eval, space.shape, device, os.path.join(cfg.out, "eval.md"),
                                      cfg.seed)
    return dict(steps=rows, eval=scored)


def main(argv=None) -> dict:
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    cfg.out = cfg.out or os.path.join("runs/rectified_flow", cfg.space)
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    ckpt1, ckpt2 = os.path.join(cfg.out, "flow1.pt"), os.path.join(cfg.out, "flow2.pt")
    if cfg.sample_only:                                   # the files first: never train a VAE only to stop
        for path in (ckpt1, ckpt2) + ((cfg.vae,) if cfg.space == "latent" else ()):
            common.check(os.path.isfile(path), f"--sample-only: '{path}' not found; train first (drop "
                         "--sample-only), or pass the --out (and --vae) of a trained run")
        common.prepare_out(cfg.out)
    else:                                                 # before any work: nothing is overwritten
        common.new_or_resume(ckpt1, cfg.resume, cfg.overwrite)
        if cfg.resume:                                    # a flow of this script, and the VAE it ran on
            common.load_checkpoint(ckpt1, device, KIND)
            common.check(cfg.space == "pixel" or os.path.isfile(cfg.vae), f"--resume: the VAE '{cfg.vae}' "
                         "is not found; pass the --vae this run was trained with")
        else:
            common.new_or_resume(ckpt2, False, cfg.overwrite)
    x1, space = load_space(cfg, device)
    if cfg.sample_only:
        flow1, flow2 = load_flow(ckpt1, device, space), load_flow(ckpt2, device, space)
    else:
        if cfg.resume:
            load_flow(ckpt1, device, space)               # the run to continue ran in this space
        common.seed_everything(cfg.seed)                  # the same flows whether the VAE was trained now or not
        flow1, losses1 = train_flow(cfg, 1, build_net(cfg, space.shape).to(device), x1, None, space, device, cfg.resume)
        x0, x1 = get_pairs(os.path.join(cfg.out, "pairs.pt"), flow1, len(losses1), cfg.n_pairs, space.shape,
                           cfg.pair_steps, cfg.seed + 12345, device, reuse=cfg.resume)
        model = build_net(cfg, space.shape).to(device)
        model.load_state_dict(flow1.state_dict())        # reflow starts from Flow-1 (Liu et al.)
        resume2 = cfg.resume and os.path.isfile(ckpt2)    # a Flow-2 reflowed from this very Flow-1?
        if resume2 and common.load_checkpoint(ckpt2, device, KIND).get("flow1_step") != len(losses1):
            print(f"'{ckpt2}' was reflowed from an earlier Flow-1: Flow-2 starts again from this one")
            resume2 = False
        flow2, losses2 = train_flow(cfg, 2, model, x1, x0, space, device, resume2, flow1_step=len(losses1))
        common.plot_curves(os.path.join(cfg.out, "loss.png"), {      # Flow-2's steps follow Flow-1's
            "Flow-1": common.smooth(losses1),
            "Flow-2 (reflow)": [(len(losses1) + i, v) for i, v in common.smooth(losses2)]})
    results = compare(cfg, {"Flow-1": flow1, "Flow-2": flow2}, space, device)
    print(f"figures in {cfg.out}/")
    return results


if __name__ == "__main__":
    main()
