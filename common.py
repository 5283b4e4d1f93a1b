"""Tiny helpers shared by the lessons: plumbing only, never a method's loop, network or math.

Conventions (stated once, here): images are (N, C, H, W) floats in [-1, 1] inside every model
(`save_grid` converts once, when writing). Each script's Config is a dataclass whose fields are its
flags (`parse_config`). Bad input stops with one line, `error: what is wrong; how to fix it` (`die`).
Checkpoints (atomic save, safe load, exact resume) have their own module, checkpoints.py.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import random
import re
import typing
from dataclasses import MISSING, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

# ---------------------------------------------------------------------------- errors and flags
def die(msg: str) -> typing.NoReturn:
    """Stop with a one-line message, no traceback (tests catch it as SystemExit)."""
    raise SystemExit(f"error: {msg}")

def check(ok: bool, msg: str) -> None:
    """One input check: stop with `msg` unless `ok`."""
    if not ok:
        die(msg)

class _Parser(argparse.ArgumentParser):
    def error(self, message):                              # a bad flag or value is one line, not a usage block
        die(f"{message} (see --help)")

def make_parser(cls, description: str | None = None) -> argparse.ArgumentParser:
    """One `--field-name` flag per field of the dataclass `cls`, its default the field's. Field metadata:
    "help", "choices", "min" (checked by `parse_config`), "positional" (`cmd VALUE`, not a flag)."""
    parser = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        kw = dict(default=default, help=f.metadata.get("help", "default: %(default)s"))
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        typ, args = hints[f.name], typing.get_args(hints[f.name])
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(typ) in (tuple, list):      # tuple[int, ...] -> --steps 1 2 4
            kw.update(nargs="+", type=args[0])
        else:                                              # X, or X | None
            kw["type"] = next(a for a in args if a is not type(None)) if type(None) in args else typ
        if f.metadata.get("positional"):                  # one optional value, or a tuple's one or more
            parser.add_argument(f.name, **{"nargs": "?", **kw})
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), **kw)
    return parser

def parse_config(cls, argv=None, description: str | None = None):
    """The command line as an instance of the dataclass `cls`; a value below a field's "min" stops."""
    values = vars(make_parser(cls, description).parse_args(argv))
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
    for f in fields(cls):
        lo, v = f.metadata.get("min"), values[f.name]
        if lo is not None and v is not None:
            for x in (v if isinstance(v, tuple) else (v,)):
                check(x >= lo and math.isfinite(x), f"--{f.name.replace('_', '-')} must be >= {lo}, got {x}")
    return cls(**values)

@dataclass
class RunConfig:
    """The flags every training script has; its Config adds the method's own (and overrides `out`)."""
    data_dir: str = field(default="data", metadata={"help": "root of the torchvision datasets"})
    download: bool = field(default=True, metadata={"help": "download mnist/cifar10 when missing"})
    out: str = field(default="runs", metadata={"help": "folder of the checkpoints and figures"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out (up to --epochs)"})
    overwrite: bool = field(default=False, metadata={"help": "replace the run in --out with a new one"})
    sample_only: bool = field(default=False, metadata={"help": "load the trained model, draw, train nothing"})
    seed: int = field(default=0, metadata={"help": "the same seed gives the same batches, noise, samples"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    amp: bool = field(default=True, metadata={"help": "bf16 autocast while training on CUDA (sampling runs "
                                                      "in float32)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the trained network"})

# ---------------------------------------------------------------------------- device, seed, speed, progress, processes
def get_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; 'cpu', 'cuda' or 'cuda:N' otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check(re.fullmatch(r"cpu|cuda(:\d+)?", name) is not None, f"unknown --device '{name}'; use auto, cpu or cuda")
    check(name == "cpu" or torch.cuda.is_available(), f"--device {name} was asked for but no CUDA GPU is visible; "
          "use --device cpu")
    return torch.device(name)

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices), so the same --seed gives the same run."""
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)

def generator(device, seed: int, stream: int = 0) -> torch.Generator:
    """A generator for one random stream of a sampler: 0 draws x_T, 1 the noise z added at each step
    (one stream drawn twice would make the first z equal x_T)."""
    return torch.Generator(device).manual_seed(seed + 1_000_003 * stream)

def setup_speed(device: torch.device) -> None:
    """TF32 matmuls/convolutions on Ampere+ GPUs: free speed, no visible change for diffusion."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast for training steps on CUDA (a no-op on CPU, where bf16 is slow). Samplers, figures
    and evaluations run in float32, so a grid and the FD beside it describe the same sampler."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")

def set_lr(opt: torch.optim.Optimizer, lr: float, step: int, warmup_steps: int, total_steps: int) -> None:
    """Linear warm-up to `lr` over min(warmup_steps, total_steps // 5) steps (never a whole short run)."""
    w = max(1, min(warmup_steps, total_steps // 5))
    for group in opt.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / w)

def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def progress(iterable, desc: str = "", total: int | None = None):
    """A tqdm progress bar, shown only on a terminal (tests and CI logs stay short)."""
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, disable=None, leave=False, dynamic_ncols=True)

def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """-> (rank, world, device). Under torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE) join its group:
    NCCL with one GPU per process, gloo on CPU; the 30-min timeout covers rank 0 training the VAE."""
    world, device = int(os.environ.get("WORLD_SIZE", "1")), get_device(device_name)
    if world == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        check(local_rank < torch.cuda.device_count(), f"--nproc_per_node is {world} but only "
              f"{torch.cuda.device_count()} GPUs are visible; start one process per GPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    return rank, world, device

def replicas_in_sync(model: torch.nn.Module) -> bool:
    """True when every rank holds exactly rank 0's parameters, as DDP promises (the same start, and
    all-reduced gradients, so every optimizer step is the same on every rank)."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    same = torch.tensor(float(torch.equal(flat, ref)), device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())

# ---------------------------------------------------------------------------- schedules, time embedding
def make_beta_schedule(name: str, T: int) -> torch.Tensor:
    """beta_t for t = 0..T-1 (float64): linear (Ho et al., 2020), cosine (Nichol & Dhariwal, 2021) or
    sigmoid (Jabri et al., 2022: slow at both ends, fast in the middle)."""
    scale = 1000 / T                                 # other T keep the same total noise
    lo, hi = scale * 1e-4, min(scale * 0.02, 0.999)  # T <= 20 would reach beta = 1: alpha_bar = 0
    if name == "linear":
        return torch.linspace(lo, hi, T, dtype=torch.float64)
    if name == "cosine":                             # beta_t = 1 - alpha_bar(t+1) / alpha_bar(t), at most 0.999
        s = 0.008
        t = torch.arange(T + 1, dtype=torch.float64) / T
        alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    if name == "sigmoid":                            # sigmoid(linspace(-6, 6)) rescaled to the linear range
        return lo + (hi - lo) * torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64))
    die(f"unknown schedule '{name}'; choose linear, cosine or sigmoid")

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoids of (possibly fractional) timesteps: (N,) -> (N, dim), [sin(t w_i), cos(t w_i)]."""
    w = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t.float()[:, None] * w[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

# ---------------------------------------------------------------------------- data
def load_images(dataset: str, data_dir: str = "data", train: bool = True, download: bool = True,
                image_size: int | None = None, channels: int = 3,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A whole dataset as (x, y) on `device` (no per-batch copies), x (N, C, H, W) in [-1, 1]: 'mnist',
    'cifar10' (torchvision, under data_dir) or a folder ROOT/<class>/<image> (ROOT/train and ROOT/test
    when they exist) resized to `image_size` (default 32) with `channels` channels."""
    from torchvision import datasets, transforms  # imported here: torchvision is slow to import
    name = dataset.lower()
    if name in ("mnist", "cifar10"):
        try:
            ds = (datasets.MNIST if name == "mnist" else datasets.CIFAR10)(data_dir, train=train, download=download)
        except Exception as e:  # no network, or a broken mirror
            where = os.path.join(data_dir, "MNIST/raw" if name == "mnist" else "cifar-10-batches-py")
            die(f"{dataset} is not under '{where}' and could not be downloaded ({type(e).__name__}); "
                "put the files there, or pass --data-dir to where they are")
        x = ds.data[:, None] if name == "mnist" else torch.from_numpy(ds.data).permute(0, 3, 1, 2)
        y = torch.as_tensor(ds.targets, dtype=torch.long)
    else:
        check(os.path.isdir(dataset), f"unknown dataset '{dataset}': use mnist, cifar10 or the path "
              "of an image folder laid out as ROOT/<class>/<image>.png")
        split = os.path.join(dataset, "train" if train else "test")
        root, size = (split if os.path.isdir(split) else dataset), image_size or 32
        tf = transforms.Compose([
            transforms.Grayscale(1) if channels == 1 else transforms.Lambda(lambda im: im.convert("RGB")),
            transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])
        try:
            ds = datasets.ImageFolder(root, transform=tf)
            workers = min(8, os.cpu_count() or 1) if len(ds) > 5000 else 0   # small folders: no processes to start
            xs, ys = zip(*torch.utils.data.DataLoader(ds, batch_size=512, num_workers=workers))
        except Exception as e:  # no class folders, or an image PIL cannot decode (the message names it)
            die(f"cannot read the images under '{root}': {' '.join(str(e).split())[-200:]}; it needs class "
                "sub-folders of readable .png/.jpg files (remove or replace broken ones)")
        x, y = torch.cat(xs), torch.cat(ys)
    x = x.float().div(127.5).sub(1.0)                     # uint8 [0, 255] -> float [-1, 1]
    if image_size and x.shape[-1] != image_size:
        x = F.interpolate(x, size=image_size, mode="bilinear", antialias=True, align_corners=False)
    return x.to(device), y.to(device)

def batches(x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 128, seed: int = 0):
    """Shuffled (x, y) mini-batches (y None: (x, None)) in an order fixed by `seed` (seed + epoch: a resumed
    run sees the same batches). The last incomplete one is dropped (steady shapes for torch.compile)."""
    n, batch_size = len(x), min(batch_size, len(x))  # a dataset smaller than a batch: one batch of all
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    for i in range(0, n - batch_size + 1, batch_size):
        j = idx[i:i + batch_size]
        yield x[j], (None if y is None else y[j])

# ---------------------------------------------------------------------------- EMA, output folder
def make_ema(model: torch.nn.Module, decay: float = 0.999, warmup: bool = True) -> AveragedModel:
    """EMA of the parameters, never the buffers: theta_ema <- d theta_ema + (1 - d) theta. `warmup`: d =
    min(decay, (1 + n) / (10 + n)) after n updates, so a short run's EMA does not stay near the init."""
    def ema_update(ema_params, params, n):
        d = min(decay, (1 + int(n)) / (10 + int(n))) if warmup else decay
        for p_ema, p in zip(ema_params, params):
            p_ema.lerp_(p, 1 - d)
    return AveragedModel(model, multi_avg_fn=ema_update, use_buffers=False).requires_grad_(False)

def prepare_out(out: str) -> None:
    """Create the output folder, or stop in one line when it cannot hold our files."""
    check(not os.path.exists(out) or os.path.isdir(out), f"--out '{out}' is a file; pass a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        die(f"cannot create --out '{out}' ({e.strerror}); pass a folder you can write to")
    check(os.access(out, os.W_OK), f"cannot write to --out '{out}'; pass a folder you can write to")
