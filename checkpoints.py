"""Checkpoints: the dict a training loop writes, saved atomically and loaded safely.

A checkpoint is `{kind, net, config, model, ema, opt, step, epoch, losses, rng}` (`kind`: the script
that wrote it; `net`: its network's constructor arguments). `save` writes a temporary file and renames
it, so a run killed while saving never leaves half a file; `load` uses weights_only=True (no pickled
code runs) and says in one line what is wrong with a file; `resume` puts a run back exactly where it
stopped. The loop itself (what goes into the dict, and when) stays in each lesson.
"""
from __future__ import annotations

import os

import torch

import common


def new_or_resume(ckpt: str, resume: bool, overwrite: bool) -> None:
    """Before any work: an existing `ckpt` is continued (--resume) or replaced (--overwrite), never by
    accident. A half-written `ckpt`.tmp (a run killed while saving) is removed."""
    common.prepare_out(os.path.dirname(ckpt) or ".")
    if os.path.isfile(f"{ckpt}.tmp"):
        os.remove(f"{ckpt}.tmp")
        print(f"removed {ckpt}.tmp, half written by an interrupted run")
    if resume:
        common.check(os.path.isfile(ckpt), f"--resume: there is no checkpoint '{ckpt}' to continue; drop --resume")
    else:
        common.check(overwrite or not os.path.exists(ckpt), f"'{ckpt}' already holds a checkpoint; pass --resume "
                     "to continue it, --out to train a new one elsewhere, or --overwrite to replace it")

def save(path: str, **state) -> None:
    """torch.save to a temporary file, then rename: an interruption never leaves a half-written `path`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        torch.save(state, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
    except OSError as e:
        common.die(f"cannot write checkpoint '{path}' ({e.strerror}); pass a --out you can write to")

def load(path: str, device: torch.device | str = "cpu", kind: str | None = None,
         keys: tuple[str, ...] = (), hint: str = "train first, or pass the right path") -> dict:
    """torch.load, weights_only=True (no pickled code runs); `kind`: who must have written it, `keys`: its entries."""
    common.check(os.path.isfile(path), f"checkpoint '{path}' not found; {hint}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        common.die(f"cannot read checkpoint '{path}' ({type(e).__name__}: it is damaged or not a checkpoint); "
                   "pass another file, or train again")
    common.check(isinstance(state, dict), f"'{path}' is not a checkpoint of this codebase; pass another file")
    found = state.get("kind")
    common.check(kind is None or found == kind, f"'{path}' holds " + (f"a {found} checkpoint" if found else
                 "no checkpoint of this codebase") + f", not a {kind} one; pass a {kind} checkpoint")
    missing = [k for k in keys if k not in state]
    common.check(not missing, f"'{path}' lacks {', '.join(missing)}; it is not a finished {kind or 'training'} "
                 "checkpoint: pass another file, or train again")
    return state

def load_weights(model: torch.nn.Module, state_dict: dict, path: str) -> None:
    """model.load_state_dict, with a one-line error that says which network the file holds."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError:
        n = sum(v.numel() for v in state_dict.values())
        have = sum(v.numel() for v in model.state_dict().values())
        common.die(f"the weights in '{path}' ({len(state_dict)} tensors, {n / 1e6:.2f}M numbers) do not fit the "
                   f"network built for them ({have / 1e6:.2f}M numbers{', ' + str(getattr(model, 'config', ''))}); "
                   "use the settings it was trained with")

def rng_state() -> dict:
    """CPU and GPU random states, so a resumed run draws the t, noise and dropout an uninterrupted one would."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

def resume(path: str, device, kind: str, model, ema, opt, cfg=None, same: tuple[str, ...] = (),
           keys: tuple[str, ...] = ()) -> dict:
    """Restore weights, EMA (None: none), optimizer and random state from `path`; the `cfg` fields named
    in `same` must equal the checkpoint's, `keys` it must hold too. -> the checkpoint (step, epoch, losses)."""
    state = load(path, device, kind, keys=("model", "ema", "opt", "step", "epoch", "rng") + tuple(keys))
    for k in same:
        new, old = getattr(cfg, k), state.get("config", {}).get(k)
        common.check(old is None or old == new, f"--{k.replace('_', '-')} is {new} but '{path}' was trained with "
                     f"{old}; resume with the same value, or train a new model into another --out")
    load_weights(model, state["model"], path)
    if ema is not None:
        ema.module.load_state_dict(state["ema"])
        ema.n_averaged.fill_(state["step"])              # the warm-up reads how many updates it has had
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"]["cpu"].cpu())
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    print(f"resumed {path} at epoch {state['epoch']}, step {state['step']}")
    return state

def check_finite(loss: torch.Tensor, step: int, ckpt: str) -> None:
    """Stop on a NaN/inf loss, before it is saved: the last good checkpoint stays on disk."""
    if not torch.isfinite(loss):
        if os.path.isfile(ckpt):
            common.die(f"loss became {loss.item()} at step {step}; '{ckpt}' still holds the last good epoch: "
                       "continue from it with --resume and a lower --lr")
        common.die(f"loss became {loss.item()} at step {step}, before any checkpoint was written; "
                   "start again with a lower --lr")
