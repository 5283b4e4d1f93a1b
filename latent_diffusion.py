"""Latent diffusion on MNIST: a VAE compresses 1x28x28 images to 4x7x7 latents and DDPM runs there
(Rombach et al., 2022), on 16x fewer positions than pixel space.

1. VAE (Kingma & Welling, 2014): q(z | x) = N(mu(x), diag(exp(logvar(x)))), sampled as
   z = mu + exp(logvar / 2) * eps (reparameterised: gradients reach mu, logvar); decoder x_hat(z).
       L_VAE = ||x - x_hat||^2 + kl_weight * KL,  KL = 1/2 sum(mu^2 + exp(logvar) - 1 - logvar)
   summed over one image's entries; a small KL weight keeps reconstructions sharp.
2. Scale factor (as in Stable Diffusion): z0 = s * mu(x), s = 1 / std(mu) over the training set:
   unit-variance data, matched to the diffusion's N(0, I) prior.
3. DDPM on z0 (ddpm_mnist.py's process and UNet); samples are decoded, x = x_hat(z0 / s). 7 is odd,
   so the latent UNet has one 7x7 level (attention over all 49 positions); 8x8 latents get two.
Images live in [-1, 1]; DDPM time t is an integer step 0..T-1. The VAE is saved with s at --vae
(default OUT/vae.pt); rectified_flow.py and dit_cifar.py reuse it (`ensure_vae`, `load_vae`).

Run (latent_figures.py takes the same flags: DDIM against DDPM, --eval N for FD-LeNet):
    python latent_diffusion.py                  # VAE (once), latent DDPM: grids, vae_reconstructions.png, loss.png
    python latent_diffusion.py --sample-only    # OUT/samples.png from OUT/ckpt.pt and the VAE, no training
    python latent_diffusion.py --resume         # continue an interrupted run
    python -m tools.latent_figures --sample-only --eval 10000   # + FD-LeNet of DDIM and DDPM samples (evaluate.py)
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

import checkpoints
import common
import plots
from ddpm_mnist import DDPM, UNet, norm

VAE_KIND, UNET_KIND = "latent_diffusion.py VAE", "latent_diffusion.py latent UNet"


@dataclass
class Config(common.RunConfig):
    dataset: str = field(default="mnist", metadata={"help": "mnist, cifar10, or an image folder"})
    vae: str = field(default="", metadata={"help": "VAE checkpoint, trained when missing (default OUT/vae.pt)"})
    vae_epochs: int = field(default=20, metadata={"min": 1})
    vae_base: int = field(default=32, metadata={"min": 1, "help": "VAE width"})
    latent_channels: int = field(default=4, metadata={"min": 1})
    kl_weight: float = field(default=1e-3, metadata={"min": 0, "help": "weight of the KL term of the VAE loss"})
    unet_base: int = field(default=128, metadata={"min": 1, "help": "latent UNet width"})
    unet_res: int = field(default=2, metadata={"min": 1, "help": "residual blocks per UNet level"})
    schedule: str = field(default="linear", metadata={"choices": ["linear", "cosine", "sigmoid"]})
    T: int = field(default=1000, metadata={"min": 1, "help": "diffusion steps"})
    epochs: int = field(default=50, metadata={"min": 1, "help": "latent UNet epochs"})
    batch_size: int = field(default=256, metadata={"min": 1, "help": "for the VAE and the latent UNet"})
    lr: float = field(default=5e-4, metadata={"help": "for the VAE and the latent UNet"})
    warmup_steps: int = field(default=500, metadata={"min": 0})
    ema_decay: float = field(default=0.999, metadata={"min": 0})
    ddim_steps: int = field(default=50, metadata={"min": 1})
    n_samples: int = field(default=32, metadata={"min": 1, "help": "images per sample grid"})
    sample_every: int = field(default=10, metadata={"min": 1, "help": "epochs between progress grids"})
    out: str = "runs/latent_diffusion"


def check_config(cfg: Config) -> None:
    """The checks that the flags' choices and minimums do not make."""
    common.check(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    common.check(cfg.ema_decay < 1, f"--ema-decay must be < 1, got {cfg.ema_decay}")
    common.check(cfg.ddim_steps <= cfg.T, f"--ddim-steps must be in 1..--T ({cfg.T}), got {cfg.ddim_steps}")


# ----------------------------------------------------------------------------- the method


def vae_loss(x, x_hat, mu, logvar, kl_weight: float):
    """-> (loss, recon, kl), each summed over one image's entries and averaged over the batch."""
    recon = (x_hat.float() - x).pow(2).flatten(1).sum(1).mean()                          # ||x - x_hat||^2
    kl = 0.5 * (mu.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).flatten(1).sum(1).mean()
    return recon + kl_weight * kl, recon, kl


@torch.no_grad()
def encode_latents(vae: VAE, x, batch_size: int = 1000):
    """The posterior means mu of a whole dataset, batched: (N, C, H, W) -> (N, c_z, h, w)."""
    return torch.cat([vae.encode(b)[0].float() for b in x.split(batch_size)])


def latent_scale(z) -> float:
    """s = 1 / std(z): the factor that gives the diffusion model unit-variance latents."""
    return 1.0 / z.float().std().item()


@torch.no_grad()
def decode(vae: VAE, z0, scale: float, batch_size: int = 1000):
    """x = x_hat(z0 / s): scaled latents (N, c_z, h, w) -> images (N, C, H, W) in [-1, 1]."""
    return torch.cat([vae.decode(b / scale).float().clamp(-1, 1) for b in z0.split(batch_size)])


# ----------------------------------------------------------------------------- network


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


def latent_unet(shape, base: int, num_res: int, cls=UNet) -> UNet:
    """The noise predictor for latents of shape (c_z, h, w): two levels when h is even, else one."""
    mults = (1, 2) if shape[1] % 2 == 0 else (1,)
    return cls(image_size=shape[1], channels=shape[0], base=base, mults=mults, num_res=num_res)


# ----------------------------------------------------------------------------- training


def check_vae_fits(vae: VAE, shape, path: str) -> None:
    """One-line error when the VAE at `path` was made for other images than (C, H, W) `shape`."""
    c, f = vae.config, 2 ** len(vae.config["mults"])
    common.check(c["channels"] == shape[0] and shape[1] % f == 0 and shape[2] % f == 0,
                 f"VAE '{path}' takes {c['channels']}-channel images with sides divisible by {f}, but "
                 f"the data are {tuple(shape)}; pass --vae of a VAE trained on these images, or a new path")


def load_vae(path: str, device) -> tuple[VAE, float]:
    """-> (the trained VAE of `path` in eval mode, its latent scale factor s)."""
    state = checkpoints.load(path, device, VAE_KIND, keys=("net", "model", "scale"),
                             hint="train it with `python latent_diffusion.py`, or pass --vae")
    vae = VAE(**state["net"]).to(device)
    checkpoints.load_weights(vae, state["model"], path)
    return vae.eval().requires_grad_(False), float(state["scale"])


def ensure_vae(path: str, x_train, device, *, resume: bool = False, overwrite: bool = False,
               **train_args) -> tuple[VAE, float]:
    """The finished VAE at `path` (with its scale factor s), or else `train_vae` there. An unfinished one
    continues with `resume`, is replaced with `overwrite`, else stops in one line. -> (vae, s)"""
    common.check(path and not os.path.isdir(path), f"--vae '{path}' is not a file path; pass one such as vae.pt")
    device = torch.device(device)                         # (a name such as "cpu" will do)
    old = checkpoints.load(path, device, VAE_KIND, keys=("net",)) if os.path.isfile(path) else None
    if old and "scale" in old:                            # finished: reuse it
        vae, scale = load_vae(path, device)
        check_vae_fits(vae, x_train.shape[1:], path)
        print(f"VAE from {path}, latent scale factor {scale:.4f}")
        return vae, scale
    common.check(not old or resume or overwrite, f"'{path}' holds an unfinished VAE (epoch {old and old.get('epoch')}); "
                 "pass --resume to continue it, or --overwrite to train a new one there")
    return train_vae(path, x_train, device, old=old if resume else None, **train_args)


def train_vae(path: str, x_train, device, old: dict | None = None, epochs: int = 20, base: int = 32,
              latent_channels: int = 4, kl_weight: float = 1e-3, batch_size: int = 256, lr: float = 5e-4,
              seed: int = 0, amp: bool = True) -> tuple[VAE, float]:
    """Part 1 as a loop: the VAE loss on x_train (N, C, H, W) in [-1, 1], one checkpoint per epoch at `path`
    (`old`: the unfinished one to continue), then s = 1 / std(mu). No EMA: the VAE is used as trained."""
    torch.manual_seed(seed)                               # the same VAE whichever script trains it
    vae = (VAE(**old["net"]) if old else VAE(x_train.shape[1], latent_channels, base)).to(device)
    check_vae_fits(vae, x_train.shape[1:], path)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, fused=device.type == "cuda")
    config = dict(epochs=epochs, kl_weight=kl_weight, batch_size=batch_size, lr=lr, seed=seed)
    step, start, losses, state = 0, 0, [], {}
    if old:                                               # weights, optimizer and RNG come back
        state = checkpoints.resume(path, device, VAE_KIND, vae, None, opt)
        step, start, losses = state["step"], state["epoch"], state["losses"]
    print(f"VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, training {path}")
    batch = min(batch_size, len(x_train))
    n_batches = len(x_train) // batch
    for epoch in range(start, epochs):
        vae.train()
        t0, epoch_losses = time.perf_counter(), []
        for x, _ in common.progress(common.batches(x_train, batch_size=batch, seed=seed + epoch),
                                    f"VAE epoch {epoch + 1}/{epochs}", n_batches):
            common.set_lr(opt, lr, step, 0, epochs * n_batches)              # constant lr, no warm-up
            with common.autocast(device, amp):
                loss = vae_loss(x, *vae(x), kl_weight)[0]                    # ||x - x_hat||^2 + w KL
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_losses.append(loss.detach())
            step += 1
        epoch_losses = torch.stack(epoch_losses)
        checkpoints.check_finite(epoch_losses.mean(), step, path)   # before saving: the last good epoch stays
        losses += epoch_losses.tolist()
        seconds = time.perf_counter() - t0
        print(f"VAE epoch {epoch + 1}/{epochs}  loss {epoch_losses.mean().item():.4f}  {seconds:.1f}s  "
              f"{n_batches * batch / seconds:.0f} img/s", flush=True)
        # no EMA: the "ema" entry every checkpoint has holds the VAE's own weights
        state = dict(kind=VAE_KIND, net=vae.config, config=config, model=vae.state_dict(), ema=vae.state_dict(),
                     opt=opt.state_dict(), step=step, epoch=epoch + 1, losses=losses, rng=checkpoints.rng_state())
        checkpoints.save(path, **state)
    scale = latent_scale(encode_latents(vae.eval(), x_train))   # s = 1 / std(mu) over the training set
    print(f"latent scale factor s = 1 / std(mu) = {scale:.4f} (over {len(x_train)} training latents)")
    checkpoints.save(path, **state | dict(config=config, scale=scale))   # finished: the last checkpoint + s
    return vae.requires_grad_(False), scale


def train(cfg: Config, z_train, vae: VAE, scale: float, ckpt: str, device) -> tuple[UNet, DDPM]:
    """DDPM (Algorithm 1) on the scaled latents z_train (N, c_z, h, w), one checkpoint per epoch.
    -> (the EMA UNet in eval mode, the diffusion process)"""
    model = latent_unet(z_train.shape[1:], cfg.unet_base, cfg.unet_res).to(device)
    ema = common.make_ema(model, cfg.ema_decay)           # theta_ema, the weights that sample
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=device.type == "cuda")
    ddpm = DDPM(cfg.T, cfg.schedule).to(device)
    step, start, losses = 0, 0, []
    if cfg.resume:  # weights, EMA, optimizer and RNG come back; a changed process or network is refused
        state = checkpoints.resume(ckpt, device, UNET_KIND, model, ema, opt, cfg,
                                   same=("T", "schedule", "unet_base", "unet_res", "dataset"))
        step, start, losses = state["step"], state["epoch"], state["losses"]
    net = torch.compile(model) if cfg.compile else model
    print(f"latent UNet: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(z_train)} "
          f"latents of shape {tuple(z_train.shape[1:])} on {device}")
    batch = min(cfg.batch_size, len(z_train))
    n_batches = len(z_train) // batch
    for epoch in range(start, cfg.epochs):
        model.train()
        t0, epoch_losses = time.perf_counter(), []
        for z0, _ in common.progress(common.batches(z_train, batch_size=batch, seed=cfg.seed + epoch),
                                     f"epoch {epoch + 1}/{cfg.epochs}", n_batches):
            common.set_lr(opt, cfg.lr, step, cfg.warmup_steps, cfg.epochs * n_batches)
            with common.autocast(device, cfg.amp):
                loss = ddpm.loss(net, z0)                 # || eps - eps_theta(z_t, t) ||^2, z_t from z0 = s mu(x)
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
        print(f"epoch {epoch + 1}/{cfg.epochs}  loss {epoch_losses.mean().item():.4f}  {seconds:.1f}s  "
              f"{n_batches * batch / seconds:.0f} latents/s", flush=True)
        checkpoints.save(ckpt, kind=UNET_KIND, net=model.config, config=asdict(cfg), scale=scale,
                         model=model.state_dict(), ema=ema.module.state_dict(), opt=opt.state_dict(),
                         step=step, epoch=epoch + 1, losses=losses, rng=checkpoints.rng_state())
        if (epoch + 1) % cfg.sample_every == 0 or epoch + 1 == cfg.epochs:
            sample_grid(cfg, ema.module.eval(), ddpm, vae, scale, device, f"samples_epoch{epoch + 1:03d}.png",
                        f" after epoch {epoch + 1}")
    return ema.module.eval(), ddpm


def sample_grid(cfg: Config, model: UNet, ddpm: DDPM, vae: VAE, scale: float, device, name: str, when: str = ""):
    """OUT/name: --n-samples latent DDIM samples of `model`, decoded; noise fixed by --seed, own generator."""
    c = model.config                                      # latents (c_z, h, w)
    z0 = ddpm.ddim_sample(model, (cfg.n_samples, c["channels"], c["image_size"], c["image_size"]), cfg.ddim_steps,
                          generator=common.generator(device, cfg.seed))
    plots.save_labelled_grid(decode(vae, z0, scale), os.path.join(cfg.out, name), 8, [],
                             f"latent DDIM-{cfg.ddim_steps}, decoded: EMA weights{when}")


def load_trained(path: str, device, vae_path: str) -> tuple[UNet, DDPM, VAE, float]:
    """The EMA UNet and diffusion process of `path`, and the VAE of `vae_path` it was trained on, with its s."""
    state = checkpoints.load(path, device, UNET_KIND, keys=("net", "ema", "config", "scale"),
                             hint="train first (drop --sample-only)")
    vae, scale = load_vae(vae_path, device)
    common.check(abs(state["scale"] - scale) < 1e-6 * scale, f"'{path}' was trained with another VAE "
                 f"(scale {state['scale']:.4f}; '{vae_path}' has {scale:.4f}); pass the --vae it was trained with")
    model = UNet(**state["net"]).to(device)
    checkpoints.load_weights(model, state["ema"], path)
    return model.eval(), DDPM(state["config"]["T"], state["config"]["schedule"]).to(device), vae, scale


def train_or_load(cfg: Config, device) -> tuple[UNet, DDPM, VAE, float, torch.Tensor]:
    """Train the VAE (when missing) and the latent UNet, or load both (--sample-only).
    -> (the EMA UNet, the diffusion process, the VAE, its s, the test images)"""
    ckpt, vae_path = os.path.join(cfg.out, "ckpt.pt"), cfg.vae or os.path.join(cfg.out, "vae.pt")
    if cfg.sample_only:                                   # both files first: never train a VAE only to stop
        for path, flag in ((vae_path, "--vae"), (ckpt, "--out")):
            common.check(os.path.isfile(path), f"--sample-only: '{path}' not found; train first (drop "
                         f"--sample-only), or pass the {flag} of a trained run")
        common.prepare_out(cfg.out)
        model, ddpm, vae, scale = load_trained(ckpt, device, vae_path)
    else:
        checkpoints.new_or_resume(ckpt, cfg.resume, cfg.overwrite)   # before any work: nothing is overwritten
        if cfg.resume:                                    # the run to continue is ours, and its VAE is there
            load_trained(ckpt, device, vae_path)
    x_test, _ = common.load_images(cfg.dataset, cfg.data_dir, False, cfg.download, device=device)  # bad: stop now
    if not cfg.sample_only:
        x_train, _ = common.load_images(cfg.dataset, cfg.data_dir, True, cfg.download, device=device)
        vae, scale = ensure_vae(vae_path, x_train, device, resume=cfg.resume, overwrite=cfg.overwrite,
                                epochs=cfg.vae_epochs, base=cfg.vae_base, latent_channels=cfg.latent_channels,
                                kl_weight=cfg.kl_weight, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, amp=cfg.amp)
        z_train = encode_latents(vae, x_train) * scale    # z0 = s * mu(x): unit variance
        print(f"training latents: std {z_train.std().item():.3f} after scaling")
        common.seed_everything(cfg.seed)                  # the same UNet run whether the VAE was trained now or not
        model, ddpm = train(cfg, z_train, vae, scale, ckpt, device)
    check_vae_fits(vae, x_test.shape[1:], vae_path)
    return model, ddpm, vae, scale, x_test


@torch.no_grad()
def vae_figure(vae: VAE, x_test, path: str) -> float:
    """10 originals spread over the test set (image folders are sorted by class) over their reconstructions,
    saved at `path`; -> the test MSE per pixel."""
    x_hat = decode(vae, encode_latents(vae, x_test), 1.0)
    mse = (x_hat - x_test).pow(2).mean().item()
    print(f"VAE test reconstruction error: {mse:.4f} MSE per pixel in [-1, 1] ({len(x_test)} test images)")
    i = torch.linspace(0, len(x_test) - 1, 10, device=x_test.device).long()
    plots.save_labelled_grid(torch.cat([x_test[i], x_hat[i]]), path, 10, ["test image", "VAE output"],
                             f"VAE reconstructions: test MSE {mse:.4f} per pixel in [-1, 1]")
    return mse


def main(argv=None) -> dict:
    """Train (or load, --sample-only, and draw OUT/samples.png); the VAE's reconstructions. -> {recon_mse, scale}"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    model, ddpm, vae, scale, x_test = train_or_load(cfg, device)
    if cfg.sample_only:                                   # training drew its grids as it went (same noise)
        sample_grid(cfg, model, ddpm, vae, scale, device, "samples.png")
    recon_mse = vae_figure(vae, x_test, os.path.join(cfg.out, "vae_reconstructions.png"))
    print(f"figures in {cfg.out}/ (DDIM against DDPM, FD-LeNet: latent_figures.py)")
    return dict(recon_mse=recon_mse, scale=scale)


if __name__ == "__main__":
    main()
