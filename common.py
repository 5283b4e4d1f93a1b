"""Small helpers shared by every script: plumbing only, never a method's own math or network.

Conventions used everywhere (stated once, here):
- Images are float tensors in [-1, 1] of shape (N, C, H, W) inside every model; `save_grid`
  converts them back to [0, 1] just before writing a PNG.
- Config is a dataclass at the top of each script; `parse_config` turns every field into a
  command-line flag (`batch_size` -> `--batch-size`, a bool -> `--flag / --no-flag`).
- Checkpoints are dicts `{model, ema, opt, step, config}` written atomically and loaded with
  `weights_only=True`; `config` is a plain dict so that loading stays safe.
- Bad input ends the program with one line, `error: what is wrong; how to fix it` (`die`).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import random
import time
import typing

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel


# ----------------------------------------------------------------------------- errors, config


def die(msg: str) -> typing.NoReturn:
    """Stop with a one-line message (no traceback). Tests catch it as SystemExit."""
    raise SystemExit(f"error: {msg}")


def check(ok: bool, msg: str) -> None:
    """`die(msg)` unless `ok`: for validating user input in one line."""
    if not ok:
        die(msg)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag or value (`--w abc`) is one line, not a usage block."""

    def error(self, message):
        die(f"{message} (see --help)")


def parse_config(cls, argv=None, description: str | None = None):
    """Build an argparse parser from a config dataclass and return a filled-in instance.

    Each field becomes `--field-name`; its default is the dataclass default, its help text is
    `field(metadata={"help": ...})`, and `metadata={"choices": [...]}` restricts the values.
    `metadata={"positional": True}` makes a field a positional argument instead (`cmd VALUE`).
    """
    parser = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(default=default, help=f.metadata.get("help", " "))
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        typ = hints[f.name]
        args = typing.get_args(typ)
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(typ) in (tuple, list):  # e.g. tuple[int, ...] -> --mults 1 2 2
            kw.update(nargs="+", type=args[0])
        elif type(None) in args:  # Optional[X]
            kw["type"] = next(a for a in args if a is not type(None))
        else:
            kw["type"] = typ
        if f.metadata.get("positional"):  # e.g. `evaluate.py SAMPLES.pt`: optional, default kept
            parser.add_argument(f.name, nargs="?", **kw)
        else:
            parser.add_argument(flag, **kw)
    ns = parser.parse_args(argv)
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(ns).items()}
    return cls(**values)


# ----------------------------------------------------------------------------- device, seed, speed


def get_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check(name != "cuda" or torch.cuda.is_available(),
          "--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices) so the same --seed gives the same run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_speed(device: torch.device) -> None:
    """TF32 matmuls/convolutions on Ampere+ GPUs: free speed, no visible change for diffusion."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (no loss scaling needed); a no-op on CPU, where bf16 is slow."""
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=enabled and device.type == "cuda")


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0):
    """AdamW, with the fused CUDA kernel when the model lives on a GPU."""
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn):
    """-> (fn(), wall seconds), waiting for the GPU before reading the clock each time."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------- noise schedules


def make_beta_schedule(name: str, T: int) -> torch.Tensor:
    """beta_1..beta_T (float64) for T steps.

    linear:  beta_t from 1e-4 to 0.02, scaled by 1000/T so other T keep the same total noise
             (Ho et al., 2020).
    cosine:  alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), s = 0.008, and
             beta_t = 1 - alpha_bar(t) / alpha_bar(t-1) clipped at 0.999 (Nichol & Dhariwal, 2021).
    sigmoid: beta_t = sigmoid(linspace(-6, 6)) rescaled to the linear schedule's range
             (Jabri et al., 2022): slow at both ends, fast in the middle.
    """
    scale = 1000 / T
    lo, hi = scale * 1e-4, min(scale * 0.02, 0.999)  # T <= 20 would reach beta = 1: alpha_bar_T = 0
    if name == "linear":
        return torch.linspace(lo, hi, T, dtype=torch.float64)
    if name == "cosine":
        s = 0.008
        t = torch.arange(T + 1, dtype=torch.float64) / T
        alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    if name == "sigmoid":
        return lo + (hi - lo) * torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64))
    die(f"unknown schedule '{name}'; choose linear, cosine or sigmoid")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer.

    emb[:, i] = sin(t * w_i), emb[:, dim/2 + i] = cos(t * w_i), w_i = max_period^(-2i/dim).
    t: (N,) -> (N, dim).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def clip_x0(eps_fn, alpha_bar: torch.Tensor):
    """Wrap a noise predictor eps_fn(x_t, t) so that the clean image it implies,
        x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t),
    is clipped to the data range [-1, 1] and eps recomputed from it. DDPM and DDIM steps are
    functions of x0_hat, so they stop aiming outside the data (guided and undertrained models
    overshoot: "clip_denoised" in Dhariwal & Nichol's code). alpha_bar: (T,), t: (N,) integer steps."""
    def eps(x_t, t):
        ab = alpha_bar[t].view(-1, *([1] * (x_t.dim() - 1)))
        x0_hat = ((x_t - (1 - ab).sqrt() * eps_fn(x_t, t).float()) / ab.sqrt()).clamp(-1, 1)
        return (x_t - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
    return eps


# ----------------------------------------------------------------------------- data


def _to_unit_range(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float in [-1, 1]."""
    return x_uint8.float().div(127.5).sub(1.0)


def load_images(dataset: str, data_dir: str = "data", train: bool = True, download: bool = True,
                image_size: int | None = None, channels: int = 3,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Load a whole dataset into one tensor on `device`: (x, y), x in [-1, 1] of shape (N, C, H, W).

    dataset: 'mnist' or 'cifar10' (torchvision, under data_dir), or the path of a folder in
    ImageFolder layout (`root/<class>/<image>`; `train` then picks `root/train` when it exists,
    else the folder itself). Folder images are resized to `image_size` and kept with `channels`
    channels (1 = grayscale, 3 = RGB). Small datasets fit on the GPU, so training batches are
    sliced from there with no per-step host-to-device copy (see `batches`).
    """
    from torchvision import datasets, transforms  # imported here: torchvision is slow to import

    name = dataset.lower()
    if name in ("mnist", "cifar10"):
        cls = datasets.MNIST if name == "mnist" else datasets.CIFAR10
        try:
            ds = cls(data_dir, train=train, download=download)
        except Exception as e:  # no network, or a broken mirror
            where = os.path.join(data_dir, "MNIST/raw" if name == "mnist" else "cifar-10-batches-py")
            die(f"{dataset} is not under '{where}' and could not be downloaded "
                f"({type(e).__name__}); put the files there, or pass --data-dir to where they are")
        if name == "mnist":
            x = ds.data[:, None]  # (N, 1, 28, 28) uint8
        else:
            x = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # (N, 3, 32, 32) uint8
        x, y = _to_unit_range(x), torch.as_tensor(ds.targets, dtype=torch.long)
    else:
        root = dataset
        check(os.path.isdir(root), f"unknown dataset '{dataset}': use mnist, cifar10 or the path "
              "of an image folder laid out as ROOT/<class>/<image>.png")
        split = os.path.join(root, "train" if train else "test")
        if os.path.isdir(split):
            root = split
        size = image_size or 32
        tf = transforms.Compose([
            transforms.Grayscale(1) if channels == 1 else transforms.Lambda(lambda im: im.convert("RGB")),
            transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])
        try:
            ds = datasets.ImageFolder(root, transform=tf)
        except (FileNotFoundError, OSError) as e:
            die(f"cannot read images from '{root}' ({e}); it needs class sub-folders holding "
                ".png/.jpg files")
        loader = torch.utils.data.DataLoader(ds, batch_size=512, num_workers=min(8, os.cpu_count() or 1))
        xs, ys = zip(*loader)
        x, y = _to_unit_range(torch.cat(xs)), torch.cat(ys)
    if image_size is not None and x.shape[-1] != image_size:
        x = F.interpolate(x, size=image_size, mode="bilinear", antialias=True, align_corners=False)
    return x.to(device), y.to(device)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True,
            generator: torch.Generator | None = None):
    """Yield (x, y) mini-batches sliced from tensors that already live on the training device.

    Drops the last incomplete batch when shuffling (steady shapes for torch.compile); a dataset
    smaller than one batch gives one batch of everything.
    """
    n = len(x)
    batch_size = min(batch_size, n)
    idx = (torch.randperm(n, device="cpu", generator=generator).to(x.device) if shuffle
           else torch.arange(n, device=x.device))
    stop = n - batch_size + 1 if shuffle else n
    for i in range(0, stop, batch_size):
        j = idx[i:i + batch_size]
        yield x[j], y[j]


# ----------------------------------------------------------------------------- distributed (torchrun)


def init_distributed(device_name: str = "auto") -> tuple[int, int, torch.device]:
    """-> (rank, world_size, device). Under `torchrun --nproc_per_node=N` (which sets RANK,
    LOCAL_RANK and WORLD_SIZE) join the process group: NCCL with one GPU per process, gloo on CPU.
    Started plainly it is (0, 1, get_device(device_name)) and no process group is made. The 30-min
    timeout lets the other ranks wait at a barrier while rank 0 does one-off work (e.g. a VAE)."""
    world, device = int(os.environ.get("WORLD_SIZE", "1")), get_device(device_name)
    if world == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        check(local_rank < torch.cuda.device_count(), f"--nproc_per_node is {world} but only "
              f"{torch.cuda.device_count()} GPUs are visible; start one process per GPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         timeout=datetime.timedelta(minutes=30))
    return rank, world, device


def cleanup_distributed() -> None:
    """Leave the process group (if any), so torchrun's processes exit cleanly."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (always, without a process group): one log per torchrun job."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def shard_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, epoch: int, seed: int = 0,
                  rank: int = 0, world: int = 1):
    """`batches` for one rank of `world`: a DistributedSampler shuffles the indices identically on
    every rank (seed + epoch) and hands each rank a disjoint 1/world of them; `batch_size` is per
    rank, and the tensors stay on the device. With world = 1 it is one shuffled pass over the data."""
    sampler = torch.utils.data.DistributedSampler(range(len(x)), num_replicas=world, rank=rank,
                                                  shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    idx = torch.tensor(list(sampler), device=x.device)     # this rank's indices: one copy per epoch
    batch_size = max(1, min(batch_size, len(idx)))
    for i in range(0, len(idx) - batch_size + 1, batch_size):  # drops the last incomplete batch
        j = idx[i:i + batch_size]
        yield x[j], y[j]


def replicas_in_sync(model: torch.nn.Module) -> bool:
    """True when every rank holds exactly rank 0's parameters, as DistributedDataParallel promises
    (it all-reduces the gradients, so identical starts and identical steps stay identical)."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    ref = flat.clone()
    torch.distributed.broadcast(ref, src=0)
    same = torch.tensor(float(torch.equal(flat, ref)), device=flat.device)
    torch.distributed.all_reduce(same, op=torch.distributed.ReduceOp.MIN)
    return bool(same.item())


# ----------------------------------------------------------------------------- EMA


def make_ema(model: torch.nn.Module, decay: float = 0.999, warmup: bool = True) -> AveragedModel:
    """Exponential moving average of the parameters (never the buffers) of `model`.

    theta_ema <- d * theta_ema + (1 - d) * theta. With `warmup`, d = min(decay, (1 + n) / (10 + n))
    after n updates, so a short run's EMA is not stuck near the random initialisation (the usual
    cause of "EMA samples are pure noise").
    """
    def ema_update(ema_params, params, n):
        n = int(n)
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        torch._foreach_lerp_(ema_params, params, 1 - d)

    ema = AveragedModel(model, multi_avg_fn=ema_update, use_buffers=False)
    ema.requires_grad_(False)
    return ema


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str, **state) -> None:
    """torch.save to `path` atomically: write a temporary file, then rename it over the old one,
    so an interruption never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, device: torch.device | str = "cpu", hint: str = "") -> dict:
    """Load a checkpoint written by `save_checkpoint` (weights_only=True: no pickled code runs)."""
    check(os.path.isfile(path), f"checkpoint '{path}' not found; {hint or 'train first, or pass --ckpt'}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        die(f"cannot read checkpoint '{path}' ({type(e).__name__}); delete it and train again")


def load_weights(model: torch.nn.Module, state_dict: dict, path: str) -> None:
    """model.load_state_dict with a one-line error when the checkpoint is of another network."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1].strip() if "\n" in str(e) else str(e)[:120]
        die(f"checkpoint '{path}' does not fit this network ({first}); "
            "sample with the settings it was trained with, or train a new one")


def checkpoint_or_train(path: str, default: str, train_fn, what: str = "base model") -> str:
    """The checkpoint that a script builds on. A `path` given on the command line must exist
    (one-line error otherwise); with none given, `default` is used, and `train_fn()` writes it
    first when it is missing."""
    if path:
        check(os.path.isfile(path), f"{what} checkpoint '{path}' not found; train it first, "
              "or leave the flag out to use (and, when missing, train) the default one")
        return path
    if not os.path.isfile(default):
        print(f"no {what} at '{default}': training it first")
        train_fn()
    return default


def check_finite(loss: torch.Tensor, step: int, ckpt: str) -> None:
    """Stop training with a message on a NaN/inf loss; the last good checkpoint stays on disk."""
    if not torch.isfinite(loss):
        die(f"loss became {loss.item()} at step {step}; lower --lr and restart "
            f"(the last good checkpoint is '{ckpt}', use --resume)")


# ----------------------------------------------------------------------------- training loop


def fit(model: torch.nn.Module, loss_fn, batches_fn, *, epochs: int, ckpt: str,
        device: torch.device, lr: float, warmup_steps: int = 0, ema_decay: float = 0.0,
        resume: bool = False, amp: bool = True, compile: bool = False, on_epoch=None, **extra):
    """The flat training loop that scripts share when their lesson is not the loop itself.

    AdamW with a linear warm-up, EMA when ema_decay > 0, bf16 autocast on CUDA, a NaN guard, the
    epoch time and throughput printed, and one atomic checkpoint per epoch,
    `{model, ema, opt, sched, step, epoch, losses, **extra}` (`ema` = the weights to sample with).
    loss_fn(net, batch) -> scalar loss; batches_fn(epoch) -> iterable of tuples whose first entry
    is a batch of N examples; on_epoch(epoch, net) runs after each save (progress figures).
    resume: continue from `ckpt` (a finished run just returns its model).
    Returns the network to sample with (the EMA copy, in eval mode) and the per-step losses.
    """
    ema = make_ema(model, ema_decay) if ema_decay > 0 else None
    final = ema.module if ema is not None else model
    opt = make_optimizer(model, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    step, start, losses = 0, 0, []
    if resume:
        state = load_checkpoint(ckpt, device, hint="there is nothing to resume; drop --resume")
        load_weights(model, state["model"], ckpt)
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
            ema.n_averaged.fill_(state["step"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, start, losses = state["step"], state["epoch"], state["losses"]
        print(f"resumed from {ckpt} at epoch {start}, step {step}")
    net = torch.compile(model) if compile else model
    for epoch in range(start, epochs):
        model.train()
        t0, epoch_losses, n = time.perf_counter(), [], 0
        for batch in batches_fn(epoch):
            with autocast(device, amp):
                loss = loss_fn(net, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            epoch_losses.append(loss.detach())
            n, step = n + len(batch[0]), step + 1
        mean_loss = torch.stack(epoch_losses).mean()
        check_finite(mean_loss, step, ckpt)  # before saving: the last good checkpoint stays
        sync(device)
        seconds = time.perf_counter() - t0
        losses += torch.stack(epoch_losses).tolist()
        print(f"epoch {epoch + 1:3d}/{epochs}  loss {mean_loss.item():.4f}  {seconds:.1f}s  "
              f"{n / seconds:.0f} img/s")
        save_checkpoint(ckpt, model=model.state_dict(), ema=final.state_dict(), opt=opt.state_dict(),
                        sched=sched.state_dict(), step=step, epoch=epoch + 1, losses=losses, **extra)
        if on_epoch is not None:
            on_epoch(epoch + 1, final.eval())
    return final.eval(), losses


# ----------------------------------------------------------------------------- figures


def save_grid(x: torch.Tensor, path: str, nrow: int = 8, padding: int = 2) -> None:
    """Save images in [-1, 1] as one PNG grid (torchvision's make_grid/save_image)."""
    from torchvision.utils import save_image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_image(((x.detach().float().cpu() + 1) / 2).clamp(0, 1), path, nrow=nrow, padding=padding)


def plot_curves(path: str, curves: dict, xlabel: str = "step", ylabel: str = "loss",
                logy: bool = True, title: str | None = None) -> None:
    """Line plot of named curves, each a list of (x, y) pairs or a list of y values."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        if len(values) and isinstance(values[0], (tuple, list)):
            xs, ys = zip(*values)
        else:
            xs, ys = range(len(values)), values
        ax.plot(xs, ys, label=name, lw=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if len(curves) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def smooth(values: list[float], k: int = 50) -> list[tuple[int, float]]:
    """Running mean over k points of a per-step loss, as (step, value) pairs for plot_curves."""
    if len(values) < k:
        return list(enumerate(values))
    v = np.convolve(np.asarray(values, dtype=np.float64), np.ones(k) / k, mode="valid")
    return list(zip(range(k - 1, len(values)), v.tolist()))


def within_class_diversity(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean pairwise L2 distance between images of the same class, averaged over the classes that
    have at least two images: a diversity number that needs no classifier (it falls when guidance
    pulls every sample of a class onto the same few typical images). x (N, C, H, W), y (N,)."""
    d = [torch.pdist(x[y == k].flatten(1).float()).mean() for k in y.unique() if (y == k).sum() > 1]
    check(len(d) > 0, "diversity needs at least two images of one class")
    return torch.stack(d).mean().item()


def write_table(path: str, header: list[str], rows: list[list]) -> str:
    """Write rows as a markdown table (floats with 3 decimals) to `path` and return its text."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)
