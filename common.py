"""Tiny helpers shared by every script: plumbing only, never a method's loop, network or math.

Conventions used everywhere (stated once, here):
- Images are float tensors in [-1, 1] of shape (N, C, H, W) inside every model; `save_grid`
  converts them back to [0, 1] just before writing a PNG.
- Config is a dataclass at the top of each script; `parse_config` turns every field into a
  command-line flag (`batch_size` -> `--batch-size`, a bool -> `--flag / --no-flag`), and
  `metadata={"min": 1}` makes it refuse smaller values in one line.
- Checkpoints are dicts written atomically and loaded with `weights_only=True`:
  `{kind, net, config, model, ema, opt, step, epoch, losses, rng}`; `kind` names the script that
  wrote it, `net` the constructor arguments of its network, so loaders can say what a file holds.
- Bad input ends the program with one line, `error: what is wrong; how to fix it` (`die`).
"""
from __future__ import annotations

import argparse
import dataclasses
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
    if not ok:
        die(msg)


class _Parser(argparse.ArgumentParser):
    def error(self, message):                              # a bad flag or value is one line, not a usage block
        die(f"{message} (see --help)")


def make_parser(cls, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the config dataclass `cls`: `--field-name`,
    its default the dataclass default (shown by --help). Field metadata: "help" (text), "choices"
    (allowed values), "min" (checked by `parse_config`), "positional" (`cmd VALUE`, not a flag)."""
    parser = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
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
    """Parse the command line into an instance of the config dataclass `cls` (see make_parser);
    a value below a field's "min" stops with one line."""
    values = vars(make_parser(cls, description).parse_args(argv))
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
    for f in dataclasses.fields(cls):
        lo, v = f.metadata.get("min"), values[f.name]
        if lo is not None and v is not None:
            for x in (v if isinstance(v, tuple) else (v,)):
                check(x >= lo and math.isfinite(x), f"--{f.name.replace('_', '-')} must be >= {lo}, got {x}")
    return cls(**values)


@dataclasses.dataclass
class RunConfig:
    """The flags every training script has; each script's Config extends it with the method's own
    knobs (and overrides `out`). Defaults are the ones meant for one GPU."""
    data_dir: str = dataclasses.field(default="data", metadata={"help": "root of the torchvision datasets"})
    download: bool = dataclasses.field(default=True, metadata={"help": "download mnist/cifar10 when missing"})
    out: str = dataclasses.field(default="runs", metadata={"help": "folder of the checkpoints and figures"})
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue the run in --out (up to --epochs)"})
    overwrite: bool = dataclasses.field(default=False, metadata={"help": "replace the run in --out with a new one"})
    sample_only: bool = dataclasses.field(default=False, metadata={"help": "load the trained model, make the "
                                                                          "figures, train nothing"})
    seed: int = dataclasses.field(default=0, metadata={"help": "the same seed gives the same batches, noise, samples"})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    amp: bool = dataclasses.field(default=True, metadata={"help": "bf16 autocast while training on CUDA (sampling "
                                                                  "runs in float32)"})
    compile: bool = dataclasses.field(default=False, metadata={"help": "torch.compile the trained network"})


# ----------------------------------------------------------------------------- device, seed, speed


def get_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; 'cpu', 'cuda' or 'cuda:N' otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        die(f"unknown --device '{name}'; use auto, cpu or cuda")
    check(device.type in ("cpu", "cuda"), f"unknown --device '{name}'; use auto, cpu or cuda")
    check(device.type == "cpu" or torch.cuda.is_available(),
          f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices) so the same --seed gives the same run."""
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def generator(device, seed: int, stream: int = 0) -> torch.Generator:
    """A new generator for one random stream of a sampling run: stream 0 draws x_T, stream 1 the noise z
    a stochastic sampler adds at each step. Two streams, because one seed drawn twice would make the
    first z equal x_T; the same seed gives the same streams, so the same --seed gives the same samples."""
    return torch.Generator(device).manual_seed(seed + 1_000_003 * stream)


def setup_speed(device: torch.device) -> None:
    """TF32 matmuls/convolutions on Ampere+ GPUs: free speed, no visible change for diffusion."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (no loss scaling needed); a no-op on CPU, where bf16 is slow. For training
    steps only: every sampler, figure and evaluation runs in float32 (TF32 on Ampere+ GPUs), so a grid
    and the FD beside it always describe the same sampler."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0):
    """AdamW, with the fused CUDA kernel when the model lives on a GPU."""
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)


def set_lr(opt: torch.optim.Optimizer, lr: float, step: int, warmup_steps: int, total_steps: int) -> None:
    """The learning rate of step `step`: a linear warm-up to `lr` over w = min(warmup_steps,
    total_steps // 5) steps (a short run warms up for a fifth of its steps, never all of them)."""
    w = max(1, min(warmup_steps, total_steps // 5))
    for group in opt.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / w)


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


def progress(iterable, desc: str = "", total: int | None = None):
    """A tqdm progress bar, shown only on a terminal (tests and CI logs stay short)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=None, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------- noise schedules


def make_beta_schedule(name: str, T: int) -> torch.Tensor:
    """beta_t for the integer steps t = 0..T-1 (float64).

    linear:  beta from 1e-4 to 0.02, scaled by 1000/T so other T keep the same total noise
             (Ho et al., 2020).
    cosine:  alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), s = 0.008, and
             beta_t = 1 - alpha_bar(t+1) / alpha_bar(t) clipped at 0.999 (Nichol & Dhariwal, 2021).
    sigmoid: beta_t = sigmoid(linspace(-6, 6)) rescaled to the linear schedule's range
             (Jabri et al., 2022): slow at both ends, fast in the middle.
    """
    scale = 1000 / T
    lo, hi = scale * 1e-4, min(scale * 0.02, 0.999)  # T <= 20 would reach beta = 1: alpha_bar = 0
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
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer: (N,) -> (N, dim),
    emb[:, i] = sin(t w_i), emb[:, dim/2 + i] = cos(t w_i), w_i = max_period^(-2i/dim)."""
    w = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t.float()[:, None] * w[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


# ----------------------------------------------------------------------------- data


def load_images(dataset: str, data_dir: str = "data", train: bool = True, download: bool = True,
                image_size: int | None = None, channels: int = 3,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A whole dataset as one tensor on `device` (small datasets fit on a GPU: no per-batch copies):
    (x, y), x in [-1, 1] of shape (N, C, H, W). dataset: 'mnist' or 'cifar10' (torchvision, under
    data_dir), or a folder ROOT/<class>/<image> (ROOT/train and ROOT/test when they exist), whose
    images are resized to `image_size` (default 32) with `channels` channels."""
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
    """Shuffled (x, y) mini-batches of tensors that already live on the training device, in an
    order fixed by `seed` (pass seed + epoch: a resumed run sees the same batches); y = None (no
    labels) gives (x, None). The last incomplete batch is dropped (steady shapes for torch.compile);
    a dataset smaller than one batch gives one batch of everything."""
    n, batch_size = len(x), min(batch_size, len(x))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    for i in range(0, n - batch_size + 1, batch_size):
        j = idx[i:i + batch_size]
        yield x[j], (None if y is None else y[j])


# ----------------------------------------------------------------------------- EMA


def make_ema(model: torch.nn.Module, decay: float = 0.999, warmup: bool = True) -> AveragedModel:
    """Exponential moving average of the parameters (never the buffers): theta_ema <- d theta_ema +
    (1 - d) theta. With `warmup`, d = min(decay, (1 + n) / (10 + n)) after n updates, so a short
    run's EMA is not stuck near the random initialisation ("EMA samples are pure noise")."""
    def ema_update(ema_params, params, n):
        d = min(decay, (1 + int(n)) / (10 + int(n))) if warmup else decay
        torch._foreach_lerp_(ema_params, params, 1 - d)
    return AveragedModel(model, multi_avg_fn=ema_update, use_buffers=False).requires_grad_(False)


# ----------------------------------------------------------------------------- output folder, checkpoints


def prepare_out(out: str) -> None:
    """Create the output folder, or stop in one line when it cannot hold our files."""
    check(not os.path.exists(out) or os.path.isdir(out), f"--out '{out}' is a file; pass a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        die(f"cannot create --out '{out}' ({e.strerror}); pass a folder you can write to")
    check(os.access(out, os.W_OK), f"cannot write to --out '{out}'; pass a folder you can write to")


def new_or_resume(ckpt: str, resume: bool, overwrite: bool) -> None:
    """Before any work: a training run never replaces a checkpoint by accident. An existing `ckpt`
    is continued (--resume) or replaced (--overwrite); otherwise the run stops here, in one line.
    A half-written `ckpt`.tmp (a run killed while saving; `ckpt` itself is the last whole one) goes."""
    prepare_out(os.path.dirname(ckpt) or ".")
    if os.path.isfile(f"{ckpt}.tmp"):
        os.remove(f"{ckpt}.tmp")
        print(f"removed {ckpt}.tmp, half written by an interrupted run")
    if resume:
        check(os.path.isfile(ckpt), f"--resume: there is no checkpoint '{ckpt}' to continue; drop --resume")
    else:
        check(overwrite or not os.path.exists(ckpt), f"'{ckpt}' already holds a checkpoint; pass --resume "
              "to continue it, --out to train a new one elsewhere, or --overwrite to replace it")


def save_checkpoint(path: str, **state) -> None:
    """torch.save to `path` atomically: write a temporary file, then rename it over the old one,
    so an interruption never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        torch.save(state, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
    except OSError as e:
        die(f"cannot write checkpoint '{path}' ({e.strerror}); pass a --out you can write to")


def load_checkpoint(path: str, device: torch.device | str = "cpu", kind: str | None = None,
                    keys: tuple[str, ...] = (), hint: str = "train first, or pass the right path") -> dict:
    """Load a checkpoint written by `save_checkpoint` (weights_only=True: no pickled code runs).
    `kind`: the script that must have written it; `keys`: entries it must hold."""
    check(os.path.isfile(path), f"checkpoint '{path}' not found; {hint}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        die(f"cannot read checkpoint '{path}' ({type(e).__name__}: it is damaged or not a checkpoint); "
            "pass another file, or train again")
    check(isinstance(state, dict), f"'{path}' is not a checkpoint of this codebase; pass another file")
    if kind is not None:
        found = state.get("kind")
        check(found == kind, f"'{path}' holds " + (f"a {found} checkpoint" if found else "no checkpoint of this "
              "codebase") + f", not a {kind} one; pass a {kind} checkpoint")
    missing = [k for k in keys if k not in state]
    check(not missing, f"'{path}' lacks {', '.join(missing)}; it is not a finished {kind or 'training'} "
          "checkpoint: pass another file, or train again")
    return state


def load_weights(model: torch.nn.Module, state_dict: dict, path: str) -> None:
    """model.load_state_dict, with a one-line error that says which network the file holds."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError:
        n = sum(v.numel() for v in state_dict.values())
        have = sum(v.numel() for v in model.state_dict().values())
        die(f"the weights in '{path}' ({len(state_dict)} tensors, {n / 1e6:.2f}M numbers) do not fit the "
            f"network built for them ({have / 1e6:.2f}M numbers{', ' + str(getattr(model, 'config', ''))}); "
            "use the settings it was trained with")


class Run:
    """What a training loop carries from step to step, so that the loop shows only the lesson's step:
    the trained `model`, its EMA copy `ema` (the weights that sample), the optimizer `opt` (AdamW unless
    given), the `step` and `epoch` counts, the step `losses`, and the checkpoint `ckpt` of `kind` that
    every epoch ends in. `add` counts a step; `end_epoch` is the NaN guard, the loss line and the
    atomic checkpoint; `resume` brings all of it back, with the random-number state."""

    def __init__(self, model, ckpt: str, kind: str, device, lr: float, ema_decay: float = 0.999, opt=None):
        self.model, self.ckpt, self.kind, self.device = model, ckpt, kind, device
        self.ema, self.opt = make_ema(model, ema_decay), opt if opt is not None else make_optimizer(model, lr)
        self.step, self.epoch, self.losses = 0, 0, []

    def resume(self, cfg, same: tuple[str, ...] = (), keys: tuple[str, ...] = ()) -> dict:
        """Continue from `ckpt`: weights, EMA, optimizer moments and the random-number state come back,
        so the resumed run draws the t, noise and dropout an uninterrupted one would. The fields of `cfg`
        named in `same` (those that define the model or the process, e.g. T) must equal the checkpoint's;
        the learning rate is the current --lr (the loop sets it every step); `keys`: the entries the
        lesson adds that must be there too. -> the checkpoint, for those entries"""
        state = load_checkpoint(self.ckpt, self.device, self.kind,
                                keys=("model", "ema", "opt", "step", "epoch", "rng") + tuple(keys))
        for k in same:
            new, old = getattr(cfg, k), state.get("config", {}).get(k)
            check(old is None or old == new, f"--{k.replace('_', '-')} is {new} but '{self.ckpt}' was trained with "
                  f"{old}; resume with the same value, or train a new model into another --out")
        load_weights(self.model, state["model"], self.ckpt)
        self.ema.module.load_state_dict(state["ema"])
        self.ema.n_averaged.fill_(state["step"])
        self.opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"]["cpu"].cpu())
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        self.step, self.epoch, self.losses = state["step"], state["epoch"], state["losses"]
        print(f"resumed {self.ckpt} at epoch {self.epoch}, step {self.step}")
        return state

    def millions(self, model=None) -> float:
        """Parameters of `model` (default: the trained one), in millions."""
        return sum(p.numel() for p in (self.model if model is None else model).parameters()) / 1e6

    def new_epoch(self, name: str, unit: str = "img/s") -> None:
        """An epoch begins: its name and throughput unit for the loss line, its clock, its step losses."""
        self.name, self.unit, self.epoch_losses, self.n, self.t0 = name, unit, [], 0, time.perf_counter()

    def add(self, loss: torch.Tensor, n: int) -> None:
        """One optimizer step done: its loss (kept on the device: no sync per step), n examples, the count."""
        self.epoch_losses.append(loss.detach())
        self.n, self.step = self.n + n, self.step + 1

    def end_epoch(self, mean=None, quiet: bool = False, save: bool = True, **extra) -> None:
        """The NaN guard (before saving: the last good checkpoint stays), the line of the mean loss, time
        and throughput, the history, then (save) the checkpoint with `extra` entries (`net`, `config`...).
        `mean` (dit_cifar.py: the mean over the ranks) replaces the epoch's own in the guard and the line."""
        losses = torch.stack(self.epoch_losses)
        mean = losses.mean() if mean is None else mean
        check_finite(mean, self.step, self.ckpt)
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0
        if not quiet:
            print(f"{self.name}  loss {mean.item():.4f}  {self.seconds:.1f}s  {self.n / self.seconds:.0f} {self.unit}",
                  flush=True)
        self.losses, self.epoch = self.losses + losses.tolist(), self.epoch + 1
        if save:
            self.save(**extra)

    def save(self, **extra) -> None:
        """The atomic checkpoint: `extra` and all that `resume` needs."""
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        save_checkpoint(self.ckpt, kind=self.kind, **extra, model=self.model.state_dict(),
                        ema=self.ema.module.state_dict(), opt=self.opt.state_dict(), step=self.step,
                        epoch=self.epoch, losses=self.losses, rng=rng)


def check_finite(loss: torch.Tensor, step: int, ckpt: str) -> None:
    """Stop on a NaN/inf loss, before it is saved: the last good checkpoint stays on disk."""
    if not torch.isfinite(loss):
        if os.path.isfile(ckpt):
            die(f"loss became {loss.item()} at step {step}; '{ckpt}' still holds the last good epoch: "
                "continue from it with --resume and a lower --lr")
        die(f"loss became {loss.item()} at step {step}, before any checkpoint was written; "
            "start again with a lower --lr")


# ----------------------------------------------------------------------------- figures and tables


def save_grid(x: torch.Tensor, path: str, nrow: int = 8, padding: int = 2) -> None:
    """Save images in [-1, 1] as one PNG grid (torchvision's make_grid/save_image)."""
    from torchvision.utils import save_image

    save_image(((x.detach().float().cpu() + 1) / 2).clamp(0, 1), path, nrow=nrow, padding=padding)


def figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """-> (fig, axes) of matplotlib's plt.subplots, drawn off-screen (the Agg backend: no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(nrows, ncols, **kwargs)


def save_figure(fig, path: str, dpi: int = 120, grid: bool = True, legend: float = 8) -> None:
    """A light grid and a legend (font size `legend`, 0: none) on every panel that labels something,
    a tight layout, the PNG, and the figure closed."""
    import matplotlib.pyplot as plt
    for ax in fig.axes:
        if grid:
            ax.grid(alpha=0.3)
        if legend and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_curves(path: str, curves: dict, xlabel: str = "step", ylabel: str = "loss",
                logy: bool = True, title: str | None = None) -> None:
    """Line plot of named curves, each a list of (x, y) pairs or a list of y values."""
    fig, ax = figure(figsize=(6, 4))
    for name, values in curves.items():
        xs, ys = zip(*values) if len(values) and isinstance(values[0], (tuple, list)) else (range(len(values)), values)
        ax.plot(xs, ys, label=name, lw=1.2)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title or "", yscale="log" if logy else "linear")
    save_figure(fig, path, legend=10 if len(curves) > 1 else 0)


def smooth(values: list[float], k: int = 50) -> list[tuple[int, float]]:
    """Running mean over k points of a per-step loss, as (step, value) pairs for plot_curves."""
    if len(values) < k:
        return list(enumerate(values))
    v = np.convolve(np.asarray(values, dtype=np.float64), np.ones(k) / k, mode="valid")
    return list(zip(range(k - 1, len(values)), v.tolist()))


def markdown_table(header: list[str], rows: list[list], float_format: str = ".3f") -> str:
    """Rows as a markdown table; floats formatted with `float_format` (3 decimals by default)."""
    def cell(v):
        return format(v, float_format) if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def write_table(path: str, header: list[str], rows: list[list]) -> str:
    """Write rows as a markdown table (floats with 3 decimals) to `path` and return its text."""
    text = markdown_table(header, rows)
    with open(path, "w") as f:
        f.write(text + "\n")
    return text

