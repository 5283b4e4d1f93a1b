"""Latent diffusion on MNIST: a VAE compresses 1x28x28 images to 4x7x7 latents, and DDPM runs
there (Rombach et al., 2022), 16x fewer positions than pixel space.

1. VAE (Kingma & Welling, 2014). The encoder gives q(z | x) = N(mu(x), diag(exp(logvar(x)))),
   z = mu + exp(logvar / 2) * eps (the reparameterisation trick, so gradients reach mu, logvar),
   the decoder gives x_hat(z). Per image, summed over pixels and latent entries:
       L_VAE = ||x - x_hat||^2 + beta * KL,  KL = 1/2 sum(mu^2 + exp(logvar) - 1 - logvar)
   A small beta keeps reconstructions sharp; the KL only stops the latent from drifting.
2. Latent scale factor (as in Stable Diffusion): the latents are the posterior means mu of the
   training set, multiplied by s = 1 / std(mu), so the diffusion model sees unit-variance data,
   matched to its N(0, I) prior.
3. DDPM on z0 = s * mu(x) with a small UNet; samples z0 (DDPM or DDIM, imported unchanged from
   ddpm_mnist.py) are decoded: x = x_hat(z0 / s). 7 is odd, so the latent UNet has a single 7x7
   resolution (self-attention over all 49 positions); an 8x8 latent (CIFAR) gets two.
Images live in [-1, 1]. The VAE is saved at --vae (runs/latent_diffusion/vae.pt) as
{model, config (VAE kwargs), scale, ...}; rectified_flow.py reuses it, and trains it when missing.

Run:
    python latent_diffusion.py                  # VAE (once), latent DDPM, figures in runs/latent_diffusion/
    python latent_diffusion.py --sample-only    # figures from OUT/ckpt.pt and the VAE, no training
    python latent_diffusion.py --resume         # continue an interrupted run
    python latent_diffusion.py --eval 10000     # + FD-LeNet of DDIM and DDPM samples (evaluate.py)
Figures in OUT: vae_reconstructions.png (test originals on top, reconstructions below),
ddim_vs_ddpm.png (DDIM samples in the top half, DDPM samples from the same latent noise below),
samples_epochNNN.png and loss.png; printed: scale factor, test reconstruction error, sampling times.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

import common
from ddpm_mnist import DDPM, UNet, norm


@dataclass
class Config:
    dataset: str = field(default="mnist", metadata={"help": "mnist, cifar10, or an image folder"})
    data_dir: str = field(default="data", metadata={"help": "root of the torchvision datasets"})
    download: bool = field(default=True, metadata={"help": "download mnist/cifar10 when missing"})
    vae: str = field(default="", metadata={"help": "VAE checkpoint, trained when missing (default OUT/vae.pt)"})
    vae_epochs: int = 20
    vae_base: int = 32
    latent_channels: int = 4
    beta: float = field(default=1e-3, metadata={"help": "KL weight of the VAE"})
    unet_base: int = 128
    unet_res: int = field(default=2, metadata={"help": "residual blocks per UNet level"})
    schedule: str = field(default="linear", metadata={"choices": ["linear", "cosine", "sigmoid"]})
    T: int = 1000
    epochs: int = 50
    batch_size: int = field(default=256, metadata={"help": "for the VAE and the latent UNet"})
    lr: float = field(default=5e-4, metadata={"help": "for the VAE and the latent UNet"})
    warmup_steps: int = 500
    ema_decay: float = 0.999
    ddim_steps: int = 50
    n_samples: int = field(default=32, metadata={"help": "images per sample grid"})
    sample_every: int = field(default=10, metadata={"help": "epochs between progress grids"})
    eval: int = field(default=0, metadata={"help": "score N samples of DDIM and of DDPM with evaluate.py "
                      "into OUT/eval.md; 0 = off; costs N x (T + ddim_steps) latent UNet calls"})
    out: str = "runs/latent_diffusion"
    resume: bool = False
    sample_only: bool = field(default=False, metadata={"help": "load OUT/ckpt.pt and make figures, no training"})
    seed: int = 0
    device: str = "auto"
    amp: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the UNet"})


def load_data(cfg: Config, device, train: bool = True):
    return common.load_images(cfg.dataset, cfg.data_dir, train=train, download=cfg.download, device=device)


# ----------------------------------------------------------------------------- the VAE


class Block(nn.Module):
    """Residual block GroupNorm-SiLU-conv twice (the UNet's block without the time input)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.net = nn.Sequential(norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                 norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.net(x)


class VAE(nn.Module):
    """Convolutional VAE with a spatial latent: each of len(mults) levels halves H and W
    (28x28 -> 7x7, 32x32 -> 8x8). encode(x) -> (mu, logvar); decode(z) -> x_hat."""

    def __init__(self, channels: int = 1, latent_channels: int = 4, base: int = 32, mults: tuple = (1, 2)):
        super().__init__()
        self.config = dict(channels=channels, latent_channels=latent_channels, base=base, mults=tuple(mults))
        enc, c = [nn.Conv2d(channels, base, 3, padding=1)], base
        for m in mults:
            enc += [Block(c, base * m), nn.Conv2d(base * m, base * m, 3, stride=2, padding=1)]
            c = base * m
        enc += [Block(c, c), norm(c), nn.SiLU(), nn.Conv2d(c, 2 * latent_channels, 3, padding=1)]
        dec = [nn.Conv2d(latent_channels, c, 3, padding=1), Block(c, c)]
        for m in reversed(mults):
            dec += [nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1), Block(c, base * m)]
            c = base * m
        dec += [norm(c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def encode(self, x):                                  # x (N, C, H, W) -> 2 x (N, c_z, H/4, W/4)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)              # keeps exp(logvar) finite

    def decode(self, z):                                  # z (N, c_z, h, w) -> x_hat (N, C, H, W)
        return self.decoder(z)

    def forward(self, x):
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)  # z = mu + sigma * eps
        return self.decode(z), mu, logvar


def vae_loss(x, x_hat, mu, logvar, beta: float):
    """-> (loss, recon, kl), each summed over one image's entries and averaged over the batch."""
    recon = (x_hat.float() - x).pow(2).flatten(1).sum(1).mean()                          # ||x - x_hat||^2
    kl = 0.5 * (mu.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).flatten(1).sum(1).mean()
    return recon + beta * kl, recon, kl


@torch.no_grad()
def encode_latents(vae: VAE, x, batch_size: int = 1000):
    """The posterior means mu of a whole dataset, batched: (N, C, H, W) -> (N, c_z, h, w)."""
    return torch.cat([vae.encode(b)[0].float() for b in x.split(batch_size)])


def latent_scale(z) -> float:
    """s = 1 / std(z): the factor that gives the diffusion model unit-variance latents."""
    return 1.0 / z.float().std().item()


def check_vae_fits(vae: VAE, shape, path: str) -> None:
    """One-line error when the VAE at `path` was made for other images than (C, H, W) `shape`."""
    c = vae.config
    f = 2 ** len(c["mults"])
    common.check(c["channels"] == shape[0] and shape[1] % f == 0 and shape[2] % f == 0,
                 f"VAE '{path}' takes {c['channels']}-channel images with sides divisible by {f}, but "
                 f"the data are {tuple(shape)}; pass --vae of a VAE trained on these images, or a new path")


def load_vae(path: str, device, state: dict | None = None) -> tuple[VAE, float]:
    """-> (the trained VAE in eval mode, its latent scale factor); `state`: the file, if already read."""
    state = state or common.load_checkpoint(path, device, hint="train it with `python latent_diffusion.py`")
    common.check("scale" in state and "config" in state, f"'{path}' is not a finished VAE checkpoint "
                 "of latent_diffusion.py; delete it to train a new one")
    vae = VAE(**state["config"]).to(device)
    common.load_weights(vae, state["model"], path)
    return vae.eval().requires_grad_(False), float(state["scale"])


def ensure_vae(cfg: Config, x_train, device) -> tuple[VAE, float]:
    """Load the VAE at cfg.vae, or train it (resuming an interrupted run), then compute and save
    the latent scale factor. x_train: (N, C, H, W) in [-1, 1]. -> (vae, scale)."""
    path = cfg.vae or os.path.join(cfg.out, "vae.pt")
    state = common.load_checkpoint(path, device) if os.path.isfile(path) else {}
    if "scale" in state:
        vae, scale = load_vae(path, device, state)
        check_vae_fits(vae, x_train.shape[1:], path)
        print(f"VAE from {path}, latent scale factor {scale:.4f}")
        return vae, scale
    common.check(not state or "config" in state, f"'{path}' is not a VAE checkpoint; delete it or pass --vae")
    vae = VAE(**state["config"]) if state else VAE(x_train.shape[1], cfg.latent_channels, cfg.vae_base)
    vae = vae.to(device)
    check_vae_fits(vae, x_train.shape[1:], path)
    print(f"VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, training {path}")
    gen, unlabelled = torch.Generator().manual_seed(cfg.seed), x_train.new_zeros(len(x_train))
    vae, _ = common.fit(vae, lambda net, b: vae_loss(b[0], *net(b[0]), cfg.beta)[0],
                        lambda epoch: common.batches(x_train, unlabelled, cfg.batch_size, generator=gen),
                        epochs=cfg.vae_epochs, ckpt=path, device=device, lr=cfg.lr, amp=cfg.amp,
                        resume=bool(state), config=vae.config)
    scale = latent_scale(encode_latents(vae, x_train))
    print(f"latent scale factor s = 1 / std(mu) = {scale:.4f} (over {len(x_train)} training latents)")
    common.save_checkpoint(path, **common.load_checkpoint(path, device), scale=scale)
    return vae.requires_grad_(False), scale


# ----------------------------------------------------------------------------- latent diffusion


def latent_unet(shape, base: int, num_res: int, cls=UNet) -> UNet:
    """The noise predictor for latents of shape (c_z, h, w): two levels when h is even, else one."""
    mults = (1, 2) if shape[1] % 2 == 0 else (1,)
    return cls(image_size=shape[1], channels=shape[0], base=base, mults=mults, num_res=num_res)


@torch.no_grad()
def decode(vae: VAE, z0, scale: float, batch_size: int = 1000):
    """x = x_hat(z0 / s): scaled latents (N, c_z, h, w) -> images (N, C, H, W) in [-1, 1]."""
    return torch.cat([vae.decode(b / scale).float().clamp(-1, 1) for b in z0.split(batch_size)])


def train(cfg: Config, z_train, vae: VAE, scale: float, device) -> tuple[UNet, DDPM]:
    """DDPM on the scaled latents z_train (N, c_z, h, w); one atomic checkpoint per epoch."""
    ckpt = os.path.join(cfg.out, "ckpt.pt")
    model = latent_unet(z_train.shape[1:], cfg.unet_base, cfg.unet_res).to(device)
    ddpm = DDPM(cfg.T, cfg.schedule).to(device)
    print(f"latent UNet: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(z_train)} latents of shape {tuple(z_train.shape[1:])} on {device}")

    def progress(epoch, net):
        if epoch % cfg.sample_every == 0 or epoch == cfg.epochs:
            z0 = ddpm.ddim_sample(net, (cfg.n_samples, *z_train.shape[1:]), cfg.ddim_steps,
                                  generator=torch.Generator(device).manual_seed(cfg.seed))
            common.save_grid(decode(vae, z0, scale), os.path.join(cfg.out, f"samples_epoch{epoch:03d}.png"))

    gen, unlabelled = torch.Generator().manual_seed(cfg.seed), z_train.new_zeros(len(z_train))
    model, losses = common.fit(
        model, lambda net, b: ddpm.loss(net, b[0]),
        lambda epoch: common.batches(z_train, unlabelled, cfg.batch_size, generator=gen),
        epochs=cfg.epochs, ckpt=ckpt, device=device, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        ema_decay=cfg.ema_decay, resume=cfg.resume, amp=cfg.amp, compile=cfg.compile, on_epoch=progress,
        config=asdict(cfg), unet=model.config, scale=scale)
    common.plot_curves(os.path.join(cfg.out, "loss.png"), {"latent DDPM loss": common.smooth(losses)})
    return model, ddpm


def load_trained(cfg: Config, latent_shape, scale: float, device) -> tuple[UNet, DDPM]:
    """The EMA UNet and diffusion process of OUT/ckpt.pt, checked against the VAE it needs."""
    path = os.path.join(cfg.out, "ckpt.pt")
    state = common.load_checkpoint(path, device, hint="train first (drop --sample-only)")
    common.check("unet" in state and "scale" in state, f"'{path}' is not a latent_diffusion.py checkpoint")
    u = state["unet"]
    common.check((u["channels"], u["image_size"]) == tuple(latent_shape[:2]),
                 f"'{path}' was trained on {u['channels']}x{u['image_size']}x{u['image_size']} latents but the "
                 f"VAE makes {'x'.join(map(str, latent_shape))}; use the VAE it was trained with (--vae)")
    common.check(abs(state["scale"] - scale) < 1e-6 * scale, f"'{path}' was trained with another VAE "
                 f"(scale {state['scale']:.4f}, this one {scale:.4f}); pass the --vae it was trained with")
    model = UNet(**u).to(device)
    common.load_weights(model, state["ema"], path)
    return model.eval(), DDPM(state["config"]["T"], state["config"]["schedule"]).to(device)


# ----------------------------------------------------------------------------- figures


@torch.no_grad()
def vae_figure(cfg: Config, vae: VAE, x_test) -> float:
    """Originals (top row) over reconstructions (bottom row); -> test MSE per pixel."""
    x_hat = decode(vae, encode_latents(vae, x_test), 1.0)
    mse = (x_hat - x_test).pow(2).mean().item()
    print(f"VAE test reconstruction error: {mse:.4f} MSE per pixel in [-1, 1] ({len(x_test)} test images)")
    common.save_grid(torch.cat([x_test[:10], x_hat[:10]]), os.path.join(cfg.out, "vae_reconstructions.png"), nrow=10)
    return mse


def make_figures(cfg: Config, model, ddpm: DDPM, vae: VAE, scale: float, device) -> None:
    """VAE reconstructions, DDIM (top) against DDPM (bottom) from the same noise, sampling times,
    and (with --eval N) the FD of each sampler."""
    x_test, _ = load_data(cfg, device, train=False)
    vae_figure(cfg, vae, x_test)
    c = model.config
    shape = (cfg.n_samples, c["channels"], c["image_size"], c["image_size"])   # (N, c_z, h, w)
    z_T = torch.randn(shape, device=device, generator=torch.Generator(device).manual_seed(cfg.seed))
    samplers = {  # (name, steps): fn(z_T, generator) -> latents z0
        ("DDIM", cfg.ddim_steps): lambda z, g: ddpm.ddim_sample(model, z.shape, cfg.ddim_steps, x_T=z),
        ("DDPM", ddpm.T): lambda z, g: ddpm.ddpm_sample(model, z.shape, x_T=z, generator=g),
    }
    rows = []
    for (name, steps), sample in samplers.items():
        g = torch.Generator(device).manual_seed(cfg.seed)
        z0, seconds = common.timed(device, lambda: sample(z_T, g))
        x, decode_seconds = common.timed(device, lambda: decode(vae, z0, scale))
        rows.append(x)
        print(f"{name} {steps} steps: {seconds:.2f}s for {len(x)} latents, + {decode_seconds:.2f}s to decode them")
    common.save_grid(torch.cat(rows), os.path.join(cfg.out, "ddim_vs_ddpm.png"), nrow=8)
    if cfg.eval:  # opt-in: FD in a cached classifier's features (see evaluate.py)
        import evaluate
        ev = evaluate.Evaluator(cfg.dataset, cfg.data_dir, cfg.download, device)
        decoded = {k: lambda z, g, f=f: decode(vae, f(z, g), scale) for k, f in samplers.items()}
        evaluate.score_sweep(ev, decoded, cfg.eval, shape[1:], device, os.path.join(cfg.out, "eval.md"),
                             cfg.seed, amp=cfg.amp)


def main(argv=None) -> None:
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    common.check(min(cfg.epochs, cfg.vae_epochs, cfg.n_samples, cfg.batch_size) >= 1,
                 "--epochs, --vae-epochs, --n-samples and --batch-size must be >= 1")
    common.check(1 <= cfg.ddim_steps <= cfg.T, f"--ddim-steps must be in 1..--T ({cfg.T}), got {cfg.ddim_steps}")
    common.check(cfg.beta >= 0, f"--beta must be >= 0, got {cfg.beta}")
    common.check(cfg.eval == 0 or cfg.eval >= 2, f"--eval must be 0 (off) or >= 2 samples, got {cfg.eval}")
    common.seed_everything(cfg.seed)
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    os.makedirs(cfg.out, exist_ok=True)
    x_train, _ = load_data(cfg, device)
    vae, scale = ensure_vae(cfg, x_train, device)
    latent_shape = vae.encode(x_train[:1])[0].shape[1:]  # (c_z, h, w)
    if cfg.sample_only:
        model, ddpm = load_trained(cfg, latent_shape, scale, device)
    else:
        if cfg.resume and os.path.isfile(os.path.join(cfg.out, "ckpt.pt")):  # trained with this VAE?
            load_trained(cfg, latent_shape, scale, device)
        z_train = encode_latents(vae, x_train) * scale   # z0 = s * mu(x): unit variance
        print(f"training latents: std {z_train.std().item():.3f} after scaling")
        model, ddpm = train(cfg, z_train, vae, scale, device)
    make_figures(cfg, model, ddpm, vae, scale, device)
    print(f"figures in {cfg.out}/")


if __name__ == "__main__":
    main()
