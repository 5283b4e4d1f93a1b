"""Latent diffusion on CIFAR-10 with a Diffusion Transformer (DiT, Peebles & Xie, 2023), on one
GPU, on CPU, or on N GPUs with torchrun and DistributedDataParallel.

1. latent_diffusion.py's VAE compresses x (3, 32, 32) to z (4, 8, 8), 12x fewer numbers. The
   latents (posterior means) are scaled by s = 1 / std(z_train) to unit variance, like the noise
   they are mixed with, and encoded once: the DiT's epochs never run the encoder.
2. DDPM on the scaled latents (ddpm_mnist.py's process, unchanged): z_t = sqrt(alpha_bar_t) z_0 +
   sqrt(1 - alpha_bar_t) eps, L = || eps - eps_theta(z_t, t, y) ||^2; DDIM samples, x = D(z_0 / s).
3. The DiT: patchify z into T = (8/p)^2 tokens of p*p*4 numbers, embed them linearly, add a fixed
   2-D sin-cos position embedding; transformer blocks conditioned on c = emb(t) + emb(y) by
   adaLN-Zero: (beta, gamma, alpha) = Linear(SiLU(c)) per block, and
       h = LN(x) (1 + gamma) + beta,   x <- x + alpha * Attention(h)   (the same for the MLP).
   That Linear starts at zero, so alpha = 0 and every block starts as the identity; the final
   projection starts at zero too (eps_theta = 0 at initialisation); unpatchify gives eps.
4. Classifier-free guidance (cfg.py's functions): in training y becomes the null class (id K =
   number of classes) with probability 0.1; sampling uses eps_uncond + w (eps_cond - eps_uncond),
   both from one forward pass of the doubled batch (w = 1 is the plain conditional model).
5. Multi-GPU: under torchrun every process holds a replica wrapped in DistributedDataParallel
   (gradients all-reduced, so the replicas stay identical), a DistributedSampler gives each rank
   its shard of every epoch, seeds differ per rank (own t, eps, label drops), and rank 0 alone
   logs and writes files. --batch-size is global. The VAE is trained once, on rank 0.

Run:
    python dit_cifar.py                                 # VAE (once), DiT-S/2, figures in runs/dit_cifar/
    python dit_cifar.py --model DiT-B/2 --compile       # sizes T (tests), S, B, L; patch 1, 2, 4 or 8
    torchrun --nproc_per_node=4 dit_cifar.py            # the same file on 4 GPUs
    python dit_cifar.py --sample-only                   # figures from OUT/ckpt.pt and the VAE
    python dit_cifar.py --resume --epochs 400           # continue training the DiT
    python dit_cifar.py --sample-only --eval 10000      # + evaluate.py's FD and accuracy against w
    python dit_cifar.py --dataset PATH                  # your images: PATH/{train,test}/<class>/<img>
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import latent_diffusion
from cfg import class_rows, guided_eps, loss as cfg_loss
from ddpm_mnist import DDPM
from latent_diffusion import VAE, decode, encode_latents, load_vae


@dataclass
class Config:
    dataset: str = field(default="cifar10", metadata={"help": "cifar10, or an RGB image folder"})
    data_dir: str = field(default="data", metadata={"help": "root of the torchvision datasets"})
    download: bool = field(default=True, metadata={"help": "download cifar10 when missing"})
    vae_ckpt: str = field(default="", metadata={"help": "VAE checkpoint, trained when missing (default OUT/vae.pt)"})
    vae_base: int = field(default=64, metadata={"help": "VAE base channels"})
    latent_channels: int = 4
    vae_epochs: int = 20
    vae_lr: float = 5e-4
    kl_weight: float = field(default=1e-3, metadata={"help": "beta of the VAE's KL term"})
    model: str = field(default="DiT-S/2", metadata={"help": "DiT-<size>/<patch>, size in " + ", ".join("TSBL")})
    T: int = field(default=1000, metadata={"help": "number of diffusion steps"})
    schedule: str = field(default="linear", metadata={"choices": ["linear", "cosine", "sigmoid"]})
    epochs: int = 200
    batch_size: int = field(default=256, metadata={"help": "global batch, split over the processes"})
    lr: float = 2e-4
    warmup_steps: int = 500
    ema_decay: float = 0.9999
    p_uncond: float = field(default=0.1, metadata={"help": "probability of dropping y to the null class"})
    w: float = field(default=3.0, metadata={"help": "guidance weight of the progress grids"})
    ws: tuple[float, ...] = field(default=(1.0, 3.0, 5.0, 7.5), metadata={"help": "guidance weights of the figures"})
    ddim_steps: int = 50
    n_per_class: int = field(default=8, metadata={"help": "samples per class row in the grids"})
    sample_every: int = field(default=20, metadata={"help": "epochs between progress grids"})
    eval: int = field(default=0, metadata={"help": "samples per w for evaluate.py (0 = off; costs len(ws) x N x ddim-steps)"})
    out: str = "runs/dit_cifar"
    ckpt: str = field(default="", metadata={"help": "DiT checkpoint (default OUT/ckpt.pt)"})
    resume: bool = False
    sample_only: bool = field(default=False, metadata={"help": "load the checkpoints and make figures, no training"})
    seed: int = 0
    device: str = "auto"
    amp: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the DiT"})


# ----------------------------------------------------------------------------- the VAE (latent_diffusion.py's)


def get_vae(cfg: Config, x, rank: int, world: int, device) -> tuple[VAE, float]:
    """(VAE, latent scale s) from --vae-ckpt, trained there first when missing, by latent_diffusion.py's
    `ensure_vae` on rank 0 alone (it is cheap next to the DiT); the other ranks wait, then load it."""
    if rank == 0:
        vae, scale = latent_diffusion.ensure_vae(latent_diffusion.Config(
            dataset=cfg.dataset, vae=cfg.vae_ckpt, vae_epochs=cfg.vae_epochs, vae_base=cfg.vae_base,
            latent_channels=cfg.latent_channels, beta=cfg.kl_weight, batch_size=cfg.batch_size,
            lr=cfg.vae_lr, seed=cfg.seed, out=cfg.out, amp=cfg.amp), x, device)
    if world > 1:
        torch.distributed.barrier()                        # rank 0 has written the VAE
    return (vae, scale) if rank == 0 else load_vae(cfg.vae_ckpt, device)


# ----------------------------------------------------------------------------- the DiT


PRESETS = {  # the model sizes of the DiT paper (Table 1), plus a tiny one for tests
    "T": dict(depth=2, hidden=64, heads=2),
    "S": dict(depth=12, hidden=384, heads=6),
    "B": dict(depth=12, hidden=768, heads=12),
    "L": dict(depth=24, hidden=1024, heads=16),
}


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


# ----------------------------------------------------------------------------- sampling and test loss


@torch.no_grad()
def sample(model: DiT, ddpm: DDPM, vae: VAE, scale: float, y, w: float, steps: int, seed: int, amp: bool = True):
    """Images (N, 3, 32, 32) of classes y (N,): guided DDIM on the latents, then x = D(z_0 / s)."""
    g = torch.Generator(y.device).manual_seed(seed)
    z_T = torch.randn((len(y), *model.latent_shape), generator=g, device=y.device)   # (N, 4, 8, 8)
    with common.autocast(y.device, amp):
        z0 = ddpm.ddim_sample(guided_eps(model, y, w), z_T.shape, steps, x_T=z_T)
    return decode(vae, z0, scale)


@torch.no_grad()
def test_loss(model: DiT, ddpm: DDPM, z, y, seed: int = 0, max_n: int = 2000) -> float:
    """The conditional eps-MSE on held-out latents, with t and eps fixed by the seed."""
    g = torch.Generator(z.device).manual_seed(seed)
    z, y = z[:max_n], y[:max_n]
    t = torch.randint(0, ddpm.T, (len(z),), generator=g, device=z.device)
    eps = torch.randn(z.shape, generator=g, device=z.device)
    sse = sum(F.mse_loss(model(ddpm.q_sample(a, b, e), b, c).float(), e, reduction="sum")
              for a, b, c, e in zip(z.split(500), t.split(500), y.split(500), eps.split(500)))
    return sse.item() / eps.numel()


def check_fits(state: dict, shape, scale: float, ckpt: str, vae_path: str) -> None:
    """One-line error when the DiT of `state` was trained on the latents of another VAE."""
    want = (state["dit"]["in_channels"],) + (state["dit"]["input_size"],) * 2       # (C, H, W)
    common.check(tuple(shape) == want and abs(state["scale"] - scale) <= 1e-6 * scale,
                 f"the DiT in '{ckpt}' works on latents {want} (scale {state['scale']:.4f}) but the VAE "
                 f"'{vae_path}' makes {tuple(shape)} (scale {scale:.4f}); pass the --vae-ckpt it was trained with")


# ----------------------------------------------------------------------------- training


def train(cfg: Config, z, y, z_test, y_test, vae: VAE, scale: float, rank: int, world: int, device):
    """The DDPM loss with label dropout, on latents z (N, 4, 8, 8) cached on the device. Each rank
    takes its shard of every epoch and DDP averages the gradients; rank 0 evaluates the EMA on the
    test latents, logs, and writes one checkpoint per epoch. -> (EMA DiT, DDPM, checkpoint state)."""
    model = DiT(z.shape[-1], z.shape[1], int(y.max()) + 1, **parse_model(cfg.model)).to(device)
    ddpm = DDPM(cfg.T, cfg.schedule).to(device)
    net = torch.compile(model) if cfg.compile else model
    net = DDP(net) if world > 1 else net                     # DDP starts by broadcasting rank 0's weights,
    ema = common.make_ema(model, cfg.ema_decay)              # so the EMA copy is made after it
    opt = common.make_optimizer(model, cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    state = dict(step=0, epoch=0, losses=[], test_losses=[])
    if cfg.resume:                                           # every rank reads the same file
        state = common.load_checkpoint(cfg.ckpt, device, hint="there is nothing to resume; drop --resume")
        check_fits(state, z.shape[1:], scale, cfg.ckpt, cfg.vae_ckpt)
        common.check(state["dit"] == model.config, f"'{cfg.ckpt}' holds a {state['config']['model']}; "
                     f"resume with --model {state['config']['model']}")
        common.load_weights(model, state["model"], cfg.ckpt)
        ema.module.load_state_dict(state["ema"])
        ema.n_averaged.fill_(state["step"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        common.print0(f"resumed from {cfg.ckpt} at epoch {state['epoch']}, step {state['step']}")
    n_params, tokens = sum(p.numel() for p in model.parameters()), (z.shape[-1] // model.p) ** 2
    common.print0(f"{cfg.model}: {n_params / 1e6:.2f}M parameters, {tokens} tokens, {len(z)} latents "
                  f"{tuple(z.shape[1:])}, {world} process(es) on {device}")
    step, losses = state["step"], state["losses"]
    for epoch in range(state["epoch"], cfg.epochs):
        model.train()
        t0, epoch_losses = time.perf_counter(), []
        for z0, y0 in common.shard_batches(z, y, cfg.batch_size // world, epoch, cfg.seed, rank, world):
            with common.autocast(device, cfg.amp):
                loss = cfg_loss(ddpm, net, z0, y0, cfg.p_uncond, model.null)
            opt.zero_grad(set_to_none=True)
            loss.backward()                                  # under DDP: gradients averaged over ranks
            opt.step()
            sched.step()
            ema.update_parameters(model)
            epoch_losses.append(loss.detach())
            step += 1
        mean_loss = torch.stack(epoch_losses).mean()
        common.check_finite(mean_loss, step, cfg.ckpt)
        common.sync(device)
        seconds = time.perf_counter() - t0
        losses += torch.stack(epoch_losses).tolist()
        if rank != 0:
            continue
        state["test_losses"].append((step, test_loss(ema.module.eval(), ddpm, z_test, y_test, cfg.seed)))
        print(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {mean_loss.item():.4f}  test {state['test_losses'][-1][1]:.4f}"
              f"  {seconds:.1f}s  {len(epoch_losses) * cfg.batch_size / seconds:.0f} img/s", flush=True)
        state.update(model=model.state_dict(), ema=ema.module.state_dict(), opt=opt.state_dict(),
                     sched=sched.state_dict(), step=step, epoch=epoch + 1, losses=losses,
                     config=asdict(cfg), dit=model.config, scale=scale)
        common.save_checkpoint(cfg.ckpt, **state)
        if (epoch + 1) % cfg.sample_every == 0 or epoch + 1 == cfg.epochs:
            x = sample(ema.module, ddpm, vae, scale, class_rows(range(model.null), 8, device), cfg.w,
                       cfg.ddim_steps, cfg.seed, cfg.amp)
            common.save_grid(x, os.path.join(cfg.out, f"samples_epoch{epoch + 1:03d}_w{cfg.w:g}.png"), nrow=8)
    if world > 1:
        common.check(common.replicas_in_sync(model), "the DDP replicas diverged; this is a bug, please report it")
        common.print0(f"DDP: the parameters are identical on all {world} ranks")
    return ema.module.eval(), ddpm, state                    # state: that of the last checkpoint


def load_trained(ckpt: str, device) -> tuple[DiT, DDPM, dict]:
    """The EMA DiT and diffusion process of a checkpoint written by `train`."""
    state = common.load_checkpoint(ckpt, device, hint="train with `python dit_cifar.py` first, or pass --ckpt")
    common.check("dit" in state and "ema" in state, f"'{ckpt}' is not a dit_cifar.py checkpoint")
    model = DiT(**state["dit"]).to(device)
    common.load_weights(model, state["ema"], ckpt)
    return model.eval(), DDPM(state["config"]["T"], state["config"]["schedule"]).to(device), state


# ----------------------------------------------------------------------------- figures


def make_figures(cfg: Config, model: DiT, ddpm: DDPM, vae: VAE, scale: float, state: dict,
                 x_test, z_test, y_test, device) -> None:
    """VAE reconstructions and error, the loss curves and final test loss, one guidance grid per w
    (one row per class, the same noise for every w) with its sampling time, and with --eval N
    evaluate.py's FD and class accuracy against w (eval.md, eval.png)."""
    latent_diffusion.vae_figure(cfg, vae, x_test)
    print(f"latent scale factor s = 1 / std(z_train) = {scale:.4f}")
    final = test_loss(model, ddpm, z_test, y_test, cfg.seed)
    print(f"final test loss (EMA DiT, {min(len(z_test), 2000)} test latents): {final:.4f}")
    common.plot_curves(os.path.join(cfg.out, "loss.png"), {"train": common.smooth(state["losses"]),
                       "test (EMA)": state["test_losses"]}, title=f"{state['config']['model']}: final test loss {final:.4f}")
    y = class_rows(range(model.null), cfg.n_per_class, device)                     # (K * n_per_class,)
    for w in cfg.ws:
        x, seconds = common.timed(device, lambda: sample(model, ddpm, vae, scale, y, w, cfg.ddim_steps, cfg.seed, cfg.amp))
        common.save_grid(x, os.path.join(cfg.out, f"cfg_w{w:g}.png"), nrow=cfg.n_per_class)
        print(f"w = {w:g}: {len(y)} images ({cfg.ddim_steps} DDIM steps, then the decoder) in {seconds:.2f}s")
    if cfg.eval > 0:
        import evaluate  # imported here: its classifier is trained (and cached) on first use
        ev = evaluate.Evaluator(cfg.dataset, cfg.data_dir, cfg.download, str(device))
        y = torch.arange(cfg.eval, device=device) % model.null                      # balanced classes
        rows = []
        for w in cfg.ws:
            x = torch.cat([sample(model, ddpm, vae, scale, b, w, cfg.ddim_steps, cfg.seed + i, cfg.amp)
                           for i, b in enumerate(y.split(1000))])
            rows.append([w, ev.fd(x), ev.accuracy(x, y)])
        print(common.write_table(os.path.join(cfg.out, "eval.md"), ["w", ev.name, "class accuracy"], rows))
        common.plot_curves(os.path.join(cfg.out, "eval.png"), {ev.name: [(r[0], r[1]) for r in rows]},
                           xlabel="guidance weight w", ylabel=ev.name, logy=False,
                           title=f"{cfg.eval} samples per w; accuracy {', '.join(f'{r[2]:.2f}' for r in rows)}")
    print(f"figures in {cfg.out}/")


def main(argv=None) -> None:
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    parse_model(cfg.model)                                   # an unknown preset stops here, before any work
    cfg.ckpt, cfg.vae_ckpt = cfg.ckpt or f"{cfg.out}/ckpt.pt", cfg.vae_ckpt or f"{cfg.out}/vae.pt"
    common.check(min(cfg.epochs, cfg.vae_epochs, cfg.batch_size, cfg.n_per_class, cfg.sample_every) >= 1,
                 "--epochs, --vae-epochs, --batch-size, --n-per-class and --sample-every must be >= 1")
    common.check(1 <= cfg.ddim_steps <= cfg.T, f"--ddim-steps must be in 1..--T ({cfg.T}), got {cfg.ddim_steps}")
    common.check(0 <= cfg.p_uncond < 1 and cfg.eval >= 0, "--p-uncond must be in [0, 1) and --eval >= 0")
    rank, world, device = common.init_distributed(cfg.device)
    try:
        common.check(cfg.batch_size % world == 0, f"--batch-size {cfg.batch_size} must split evenly over {world} processes")
        common.seed_everything(cfg.seed + rank)              # own t, eps and label drops on every rank
        common.setup_speed(device)
        os.makedirs(cfg.out, exist_ok=True)
        x_test, y_test = common.load_images(cfg.dataset, cfg.data_dir, False, cfg.download, 32, device=device)
        if cfg.sample_only:
            model, ddpm, state = load_trained(cfg.ckpt, device)
            vae, scale = load_vae(cfg.vae_ckpt, device)
            z_test = encode_latents(vae, x_test) * scale                             # (N, 4, 8, 8)
            check_fits(state, z_test.shape[1:], scale, cfg.ckpt, cfg.vae_ckpt)
        else:
            x, y = common.load_images(cfg.dataset, cfg.data_dir, True, cfg.download, 32, device=device)
            vae, scale = get_vae(cfg, x, rank, world, device)
            z, z_test = encode_latents(vae, x) * scale, encode_latents(vae, x_test) * scale  # z_0 = s mu(x)
            common.print0(f"{len(z)} training latents {tuple(z.shape[1:])} cached on {device}, std {z.std().item():.3f}")
            model, ddpm, state = train(cfg, z, y, z_test, y_test, vae, scale, rank, world, device)
        if rank == 0:                                        # figures: one process is enough
            make_figures(cfg, model, ddpm, vae, scale, state, x_test, z_test, y_test, device)
    finally:
        common.cleanup_distributed()


if __name__ == "__main__":
    main()
