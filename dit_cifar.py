"""Latent diffusion on CIFAR-10 with a Diffusion Transformer (DiT, Peebles & Xie, 2023), on one GPU,
on CPU, or on N GPUs with torchrun and DistributedDataParallel.

1. latent_diffusion.py's VAE compresses x (3, 32, 32) to z (4, 8, 8); the latents (posterior means)
   are scaled by s = 1 / std(z_train) to unit variance and encoded once, before the DiT's epochs.
2. DDPM on them (ddpm_mnist.py's process): L = || eps - eps_theta(z_t, t, y) ||^2; DDIM samples are
   decoded, x = D(z_0 / s).
3. The DiT: patchify z into T = (8/p)^2 tokens of p*p*4 numbers, embed them linearly, add a fixed
   2-D sin-cos position embedding; transformer blocks conditioned on c = emb(t) + emb(y) by
   adaLN-Zero: (beta, gamma, alpha) = Linear(SiLU(c)) per block, and
       h = LN(x) (1 + gamma) + beta,   x <- x + alpha * Attention(h)   (the same for the MLP).
   That Linear starts at zero: alpha = 0, every block starts as the identity; the final projection
   starts at zero too (eps_theta = 0 at initialisation); unpatchify gives eps.
4. Classifier-free guidance (cfg.py's): in training y becomes the null class K with probability 0.1;
   sampling uses eps_uncond + w (eps_cond - eps_uncond), from one pass of the doubled batch.
5. Multi-GPU: under torchrun each process holds a replica wrapped in DDP (gradients all-reduced, so
   the replicas stay identical); every rank draws the same global batch (--batch-size) and keeps its
   1/N, with its own t, eps and label drops; rank 0 alone trains the VAE, logs and writes files.
Images live in [-1, 1]; DDPM time t is an integer step 0..T-1.

Run (into runs/dit_cifar/; dit_figures.py takes the same flags: a grid per w, loss.png, --eval N):
    python dit_cifar.py                                 # VAE (once), then DiT-S/2
    python dit_cifar.py --model DiT-B/2 --compile       # sizes T (tests), S, B, L; patch 1, 2, 4 or 8
    torchrun --nproc_per_node=4 dit_cifar.py            # the same file on 4 GPUs
    python dit_cifar.py --resume --epochs 400           # continue training the DiT
    python dit_cifar.py --dataset PATH                  # your images: PATH/{train,test}/<class>/<img>
    python -m tools.dit_figures --sample-only --eval 10000    # figures of OUT/ckpt.pt, + FD and accuracy against w
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoints
import common
import plots
from cfg import guided_eps, loss as cfg_loss      # classifier-free guidance: label dropout, eps~, as in cfg.py
from ddpm_mnist import DDPM
from latent_diffusion import VAE, check_vae_fits, decode, encode_latents, ensure_vae, load_vae

KIND = "dit_cifar.py DiT"


@dataclass
class Config(common.RunConfig):
    dataset: str = field(default="cifar10", metadata={"help": "cifar10, or an RGB image folder"})
    vae: str = field(default="", metadata={"help": "VAE checkpoint, trained there when missing (default OUT/vae.pt)"})
    vae_base: int = field(default=64, metadata={"min": 1, "help": "VAE width"})
    latent_channels: int = field(default=4, metadata={"min": 1})
    vae_epochs: int = field(default=20, metadata={"min": 1})
    vae_lr: float = 5e-4
    kl_weight: float = field(default=1e-3, metadata={"min": 0, "help": "weight of the KL term of the VAE loss"})
    model: str = field(default="DiT-S/2", metadata={"help": "DiT-<size>/<patch>, size in S, B, L (the paper's), XS (CPU), T (tests)"})
    T: int = field(default=1000, metadata={"min": 1, "help": "diffusion steps"})
    schedule: str = field(default="linear", metadata={"choices": ["linear", "cosine", "sigmoid"]})
    epochs: int = field(default=200, metadata={"min": 1})
    batch_size: int = field(default=256, metadata={"min": 1, "help": "global batch, split over the processes"})
    lr: float = 2e-4
    warmup_steps: int = field(default=500, metadata={"min": 0})
    ema_decay: float = field(default=0.9999, metadata={"min": 0})
    p_uncond: float = field(default=0.1, metadata={"min": 0, "help": "probability of dropping y to the null class"})
    scale: float = field(default=3.0, metadata={"min": 0, "help": "guidance weight w of the progress grids"})
    ddim_steps: int = field(default=50, metadata={"min": 1})
    sample_every: int = field(default=20, metadata={"min": 1, "help": "epochs between progress grids"})
    out: str = "runs/dit_cifar"
    ckpt: str = field(default="", metadata={"help": "DiT checkpoint (default OUT/ckpt.pt)"})


def check_config(cfg: Config) -> None:
    """The checks that the flags' choices and minimums do not make; fills in the default paths."""
    p = parse_model(cfg.model)["patch"]                               # images are 32x32, latents 8x8:
    common.check(8 % p == 0, f"patch size {p} does not divide the latent size 8; use a patch of 1, 2, 4 or 8, "
                 "e.g. DiT-S/2")
    common.check(cfg.lr > 0 and cfg.vae_lr > 0, f"--lr and --vae-lr must be > 0, got {cfg.lr} and {cfg.vae_lr}")
    common.check(cfg.p_uncond < 1, f"--p-uncond must be < 1 (some labels must stay), got {cfg.p_uncond}")
    common.check(cfg.ddim_steps <= cfg.T, f"--ddim-steps must be at most --T ({cfg.T}), got {cfg.ddim_steps}")
    world = int(os.environ.get("WORLD_SIZE", "1"))                     # set by torchrun
    common.check(cfg.batch_size % world == 0, f"--batch-size {cfg.batch_size} must split evenly over {world} processes")
    cfg.ckpt, cfg.vae = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt"), cfg.vae or os.path.join(cfg.out, "vae.pt")
    common.check(not cfg.resume or os.path.isfile(cfg.vae), f"--resume needs the VAE the DiT was trained "
                 f"with, and '{cfg.vae}' does not exist; pass it with --vae")


# ----------------------------------------------------------------------------- sampling, test loss


@torch.no_grad()
def sample(model: DiT, ddpm: DDPM, vae: VAE, scale: float, y, w: float, steps: int, seed: int):
    """Images (N, 3, 32, 32) of classes y (N,): guided DDIM on the latents, then x = D(z_0 / s)."""
    g = common.generator(y.device, seed)
    z_T = torch.randn((len(y), *model.latent_shape), generator=g, device=y.device)   # (N, 4, 8, 8)
    z0 = ddpm.ddim_sample(guided_eps(model, y, w), z_T.shape, steps, x_T=z_T)
    return decode(vae, z0, scale)


def class_grid(model: DiT, ddpm: DDPM, vae: VAE, scale: float, cfg: Config, name: str) -> None:
    """OUT/name: 8 samples of every class, a row each, at w = --scale (--ddim-steps, noise fixed by --seed)."""
    y = torch.arange(model.null, device=model.pos_embed.device).repeat_interleave(8)
    x = sample(model, ddpm, vae, scale, y, cfg.scale, cfg.ddim_steps, cfg.seed)
    plots.save_labelled_grid(x, os.path.join(cfg.out, name), 8, [f"class {k}" for k in range(model.null)],
                             f"DiT, w = {cfg.scale:g}, DDIM-{cfg.ddim_steps}: 8 samples per class")


@torch.no_grad()
def test_loss(model: DiT, ddpm: DDPM, z, y, seed: int = 0, max_n: int = 2000) -> float:
    """The conditional eps-MSE on held-out latents, with t and eps fixed by the seed."""
    g = common.generator(z.device, seed)
    z, y = z[:max_n], y[:max_n]
    t = torch.randint(0, ddpm.T, (len(z),), generator=g, device=z.device)
    eps = torch.randn(z.shape, generator=g, device=z.device)
    sse = sum(F.mse_loss(model(ddpm.q_sample(a, b, e), b, c).float(), e, reduction="sum")
              for a, b, c, e in zip(z.split(500), t.split(500), y.split(500), eps.split(500)))
    return sse.item() / eps.numel()


def check_fits(state: dict, shape, scale: float, ckpt: str, vae_path: str) -> None:
    """One-line error when the DiT of `state` was trained on the latents of another VAE."""
    want = (state["net"]["in_channels"],) + (state["net"]["input_size"],) * 2       # (C, H, W)
    common.check(tuple(shape) == want and abs(state["scale"] - scale) <= 1e-6 * scale,
                 f"the DiT in '{ckpt}' works on latents {want} (scale {state['scale']:.4f}) but the VAE "
                 f"'{vae_path}' makes {tuple(shape)} (scale {scale:.4f}); pass the --vae it was trained with")


# ----------------------------------------------------------------------------- the DiT


PRESETS = {"S": dict(depth=12, hidden=384, heads=6), "B": dict(depth=12, hidden=768, heads=12),  # the DiT
           "L": dict(depth=24, hidden=1024, heads=16), "T": dict(depth=2, hidden=64, heads=2),   # paper's, + tiny
           "XS": dict(depth=4, hidden=128, heads=4)}                 # the CPU recipe's: 1.3M parameters


def parse_model(name: str) -> dict:
    """'DiT-S/2' -> dict(depth=12, hidden=384, heads=6, patch=2)."""
    m = re.fullmatch(r"DiT-(\w+)/(\d+)", name)
    common.check(m is not None and m.group(1) in PRESETS and int(m.group(2)) >= 1,
                 f"unknown model '{name}'; use DiT-<size>/<patch> with size in {', '.join(PRESETS)}, e.g. DiT-S/2")
    return dict(PRESETS[m.group(1)], patch=int(m.group(2)))


def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, T, p*p*C): non-overlapping p x p patches in row-major order, T = HW/p^2."""
    N, C, H, W = z.shape
    z = z.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (N, H/p, W/p, p, p, C)
    return z.reshape(N, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, p: int, C: int) -> torch.Tensor:
    """(N, T, p*p*C) -> (N, C, H, W), the inverse of `patchify` (square latents)."""
    N, T, _ = x.shape
    n = int(round(T ** 0.5))
    x = x.reshape(N, n, n, p, p, C).permute(0, 5, 1, 3, 2, 4)            # (N, C, H/p, p, W/p, p)
    return x.reshape(N, C, n * p, n * p)


def sincos_pos_embed(n: int, dim: int) -> torch.Tensor:
    """Fixed 2-D position embedding of an n x n token grid: [emb(row), emb(col)] -> (1, n*n, dim)."""
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return torch.cat([common.timestep_embedding(rows.flatten(), dim // 2),
                      common.timestep_embedding(cols.flatten(), dim // 2)], dim=1)[None]


def modulate(x, beta, gamma):
    """Adaptive LayerNorm's affine part, regressed from the condition: x (1 + gamma) + beta."""
    return x * (1 + gamma) + beta


class DiTBlock(nn.Module):
    """Pre-LN transformer block whose LayerNorm scale/shift and residual gates come from c (adaLN-Zero)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"), nn.Linear(4 * hidden, hidden))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))  # zeroed in DiT.initialize_weights

    def forward(self, x, c):                                  # x (N, T, D), c (N, D) -> (N, T, D)
        beta1, gamma1, alpha1, beta2, gamma2, alpha2 = self.adaLN(c)[:, None].chunk(6, dim=-1)  # (N, 1, D)
        h = modulate(self.norm1(x), beta1, gamma1)
        x = x + alpha1 * self.attn(h, h, h, need_weights=False)[0]
        return x + alpha2 * self.mlp(modulate(self.norm2(x), beta2, gamma2))


class FinalLayer(nn.Module):
    """adaLN (shift and scale only), then a linear map from each token to its p*p*C patch values."""

    def __init__(self, hidden: int, patch_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, patch_dim)

    def forward(self, x, c):                                  # (N, T, D), (N, D) -> (N, T, p*p*C)
        beta, gamma = self.adaLN(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), beta, gamma))


class DiT(nn.Module):
    """eps_theta(z_t, t, y): patchify, transformer blocks conditioned by adaLN-Zero, unpatchify.
    Labels are 0..K-1; y = K (`null`) is "no label", for classifier-free guidance."""

    def __init__(self, input_size=8, in_channels=4, num_classes=10, patch=2, hidden=384, depth=12, heads=6):
        super().__init__()
        common.check(input_size % patch == 0, f"patch size {patch} does not divide the latent size "
                     f"{input_size}; pick a model whose /<patch> divides {input_size}, e.g. DiT-S/2")
        self.config = dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                           patch=patch, hidden=hidden, depth=depth, heads=heads)
        self.p, self.C, self.null = patch, in_channels, num_classes          # null: the extra class id K
        self.latent_shape = (in_channels, input_size, input_size)            # (C, H, W) of z
        self.patch_embed = nn.Linear(patch * patch * in_channels, hidden)
        self.register_buffer("pos_embed", sincos_pos_embed(input_size // patch, hidden), persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embed = nn.Embedding(num_classes + 1, hidden)  # the extra row is the null class
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads) for _ in range(depth)])
        self.final = FinalLayer(hidden, patch * patch * in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialisation; the zeros are adaLN-Zero: every gate alpha = 0 (each block is the
        identity) and the final projection is 0 (eps_theta = 0), so training starts from a stable net."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for weight in self.y_embed.weight, self.t_embed[0].weight, self.t_embed[2].weight:
            nn.init.normal_(weight, std=0.02)
        for layer in [b.adaLN[-1] for b in self.blocks] + [self.final.adaLN[-1], self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z, t, y):                               # z (N, C, H, W), t (N,), y (N,)
        x = self.patch_embed(patchify(z, self.p)) + self.pos_embed                # (N, T, D)
        c = self.t_embed(common.timestep_embedding(t, 256)) + self.y_embed(y)     # (N, D)
        for block in self.blocks:
            x = block(x, c)
        return unpatchify(self.final(x, c), self.p, self.C)                       # (N, C, H, W)


# ----------------------------------------------------------------------------- multi-GPU (torchrun)


# ----------------------------------------------------------------------------- training


def train(cfg: Config, z, y, z_test, y_test, vae: VAE, scale: float, rank: int, world: int, device):
    """DDPM with label dropout on the latents z (N, 4, 8, 8) cached on the device. Every rank takes
    its share of each global batch and DDP averages the gradients; rank 0 evaluates the EMA on the
    test latents, logs, and writes one checkpoint per epoch. -> (EMA DiT, DDPM, checkpoint state)."""
    common.seed_everything(cfg.seed)                         # the same DiT whether the VAE was trained or loaded
    model = DiT(z.shape[-1], z.shape[1], int(y.max()) + 1, **parse_model(cfg.model)).to(device)
    ddpm = DDPM(cfg.T, cfg.schedule).to(device)
    net = torch.compile(model) if cfg.compile else model
    net = DDP(net) if world > 1 else net                     # DDP starts by broadcasting rank 0's weights,
    ema = common.make_ema(model, cfg.ema_decay)              # so the EMA comes after
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=device.type == "cuda")
    step, start, losses, test_losses = 0, 0, [], []
    if cfg.resume:                                           # every rank reads the same file
        saved = checkpoints.load(cfg.ckpt, device, KIND, keys=("net", "scale", "test_losses"))
        check_fits(saved, z.shape[1:], scale, cfg.ckpt, cfg.vae)   # before the weights: a one-line reason
        state = checkpoints.resume(cfg.ckpt, device, KIND, model, ema, opt, cfg, same=("T", "schedule", "model"))
        step, start, losses, test_losses = state["step"], state["epoch"], state["losses"], state["test_losses"]
    if rank == 0:
        print(f"{cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{(z.shape[-1] // model.p) ** 2} tokens, {len(z)} latents {tuple(z.shape[1:])} of std "
              f"{z.std().item():.3f}, {world} process(es) on {device}")
    batch = min(cfg.batch_size, len(z))
    for epoch in range(start, cfg.epochs):
        model.train()
        torch.manual_seed(cfg.seed + world * epoch + rank)  # own t, eps, drops per rank; the same after --resume
        t0, epoch_losses = time.perf_counter(), []
        batches = common.batches(z, y, batch, cfg.seed + epoch)                     # the same on every rank
        for z0, y0 in (common.progress(batches, f"epoch {epoch + 1}/{cfg.epochs}") if rank == 0 else batches):
            z0, y0 = z0[rank::world], y0[rank::world]        # this rank's share of the global batch
            common.set_lr(opt, cfg.lr, step, cfg.warmup_steps, cfg.epochs * (len(z) // batch))
            with common.autocast(device, cfg.amp):           # || eps - eps_theta(z_t, t, y~) ||^2, y~: y or null
                loss = cfg_loss(ddpm, net, z0, y0, cfg.p_uncond, model.null)
            opt.zero_grad(set_to_none=True)
            loss.backward()                                  # under DDP: gradients averaged over the ranks
            opt.step()
            ema.update_parameters(model)                     # theta_ema <- d theta_ema + (1 - d) theta
            epoch_losses.append(loss.detach())               # on the device: no sync per step
            step += 1
        epoch_losses = torch.stack(epoch_losses)
        mean = epoch_losses.mean()
        if world > 1:   # one verdict on every rank: a NaN on any rank stops them all (none waits in a collective)
            dist.all_reduce(mean)
            mean /= world                                    # the mean over all ranks' losses
        checkpoints.check_finite(mean, step, cfg.ckpt)            # before saving: the last good epoch stays
        losses += epoch_losses.tolist()
        seconds = time.perf_counter() - t0
        if rank != 0:
            continue
        test_losses.append((step, test_loss(ema.module.eval(), ddpm, z_test, y_test, cfg.seed)))
        print(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {mean.item():.4f}  test {test_losses[-1][1]:.4f}  "
              f"{seconds:.1f}s  {len(epoch_losses) * batch / seconds:.0f} img/s", flush=True)
        checkpoints.save(cfg.ckpt, kind=KIND, net=model.config, config=asdict(cfg), scale=scale,
                         test_losses=test_losses, model=model.state_dict(), ema=ema.module.state_dict(),
                         opt=opt.state_dict(), step=step, epoch=epoch + 1, losses=losses, rng=checkpoints.rng_state())
        if (epoch + 1) % cfg.sample_every == 0 or epoch + 1 == cfg.epochs:   # progress grid
            class_grid(ema.module, ddpm, vae, scale, cfg, f"samples_epoch{epoch + 1:03d}_w{cfg.scale:g}.png")
    if world > 1:
        common.check(common.replicas_in_sync(model), "the DDP replicas diverged; this is a bug, please report it")
        if rank == 0:
            print(f"DDP: the parameters are identical on all {world} ranks")
    return ema.module.eval(), ddpm, dict(config=asdict(cfg), losses=losses, test_losses=test_losses)


def load_trained(ckpt: str, device) -> tuple[DiT, DDPM, dict]:
    """The EMA DiT and diffusion process of a checkpoint written by `train`."""
    state = checkpoints.load(ckpt, device, KIND, keys=("net", "ema", "config", "scale", "losses", "test_losses"),
                             hint="train with `python dit_cifar.py` first, or pass --ckpt")
    model = DiT(**state["net"]).to(device)
    checkpoints.load_weights(model, state["ema"], ckpt)
    return model.eval(), DDPM(state["config"]["T"], state["config"]["schedule"]).to(device), state


def run(cfg: Config):
    """The checks; then, in torchrun's process group if any, the VAE (trained once, on rank 0, when missing)
    and the DiT, trained on every rank or loaded (--sample-only).
    -> on rank 0 (EMA DiT, DDPM, VAE, s, checkpoint state, (test images, latents, labels)), else None"""
    check_config(cfg)
    if cfg.sample_only:
        common.prepare_out(cfg.out)
    else:                                                    # every rank checks: an existing DiT is never replaced
        checkpoints.new_or_resume(cfg.ckpt, cfg.resume, cfg.overwrite)
    rank, world, device = common.init_distributed(cfg.device)
    try:
        common.setup_speed(device)
        if cfg.sample_only:                                  # a missing checkpoint stops here, before any work
            model, ddpm, state = load_trained(cfg.ckpt, device)
        else:
            x, y = common.load_images(cfg.dataset, cfg.data_dir, True, cfg.download, 32, device=device)
            if rank == 0:                                    # the VAE: trained once, on rank 0, when missing
                ensure_vae(cfg.vae, x, device, resume=cfg.resume, overwrite=cfg.overwrite, epochs=cfg.vae_epochs,
                           base=cfg.vae_base, latent_channels=cfg.latent_channels, kl_weight=cfg.kl_weight,
                           batch_size=cfg.batch_size, lr=cfg.vae_lr, seed=cfg.seed, amp=cfg.amp)
            if world > 1:
                dist.barrier()                               # the other ranks wait until it is written
        vae, scale = load_vae(cfg.vae, device)
        x_test, y_test = common.load_images(cfg.dataset, cfg.data_dir, False, cfg.download, 32, device=device)
        check_vae_fits(vae, x_test.shape[1:], cfg.vae)
        z_test = encode_latents(vae, x_test) * scale                                     # z_0 = s mu(x)
        if cfg.sample_only:
            check_fits(state, z_test.shape[1:], scale, cfg.ckpt, cfg.vae)
        else:
            z = encode_latents(vae, x) * scale                        # (N, 4, 8, 8), cached on the device
            model, ddpm, state = train(cfg, z, y, z_test, y_test, vae, scale, rank, world, device)
        return (model, ddpm, vae, scale, state, (x_test, z_test, y_test)) if rank == 0 else None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None) -> None:
    """Train (under torchrun: on every rank), or load with --sample-only and draw OUT/samples_wW.png."""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    trained = run(cfg)
    if trained and cfg.sample_only:                          # rank 0; training drew its grids as it went
        class_grid(*trained[:4], cfg, f"samples_w{cfg.scale:g}.png")


if __name__ == "__main__":
    main()
