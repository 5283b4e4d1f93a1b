"""Speed of ddpm_mnist.py's UNet: training images/s and sampling time, measured the careful way.

Every timing synchronises the GPU before reading the clock, runs warm-up iterations first (cuDNN
autotuning, torch.compile) and reports the median of repeated runs. Inputs are random tensors of
the training shape, so no dataset is needed; the numbers are the model's, not the data loader's
(ddpm_mnist.py keeps the dataset on the GPU, so there is no loader to wait for).

How near the GPU's limit is it? FLOPs per training image are counted (forward and backward, by
torch.utils.flop_counter over the eager UNet), so images/s gives the FLOP/s achieved and, on a GPU whose
dense bf16 peak is known, its fraction of that peak. --trace FILE profiles a few training steps
(torch.profiler) and writes the operations that take the most device time: the share of convolutions,
matmuls and attention says whether the step is bound by arithmetic or by everything around it.

Run:  python -m tools.benchmark                       # MNIST preset, bf16 autocast + channels_last on CUDA
      python -m tools.benchmark --compile             # with torch.compile
      python -m tools.benchmark --trace trace.txt     # and where a training step's time goes
      python -m tools.benchmark --preset cifar --image-size 32 --channels 3
Goal on one H100 (issue 2): an MNIST epoch (60,000 images) of the default UNet in at most 3 s.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

import common
import ddpm_mnist
from tools import report


@dataclass
class Config:
    preset: str = field(default="mnist", metadata={"help": "UNet size", "choices": list(ddpm_mnist.PRESETS)})
    image_size: int = field(default=28, metadata={"min": 1})
    channels: int = field(default=1, metadata={"min": 1})
    batch_size: int = field(default=128, metadata={"help": "training batch", "min": 1})
    train_steps: int = field(default=50, metadata={"help": "timed training steps per repeat", "min": 1})
    sample_batch: int = field(default=64, metadata={"help": "images per sampling batch", "min": 1})
    ddim_steps: int = field(default=50, metadata={"help": "steps of the timed DDIM run", "min": 1})
    T: int = field(default=1000, metadata={"help": "diffusion steps (the timed DDPM run takes all of them)", "min": 1})
    warmup: int = field(default=10, metadata={"help": "untimed training steps first (autotuning, compile)", "min": 0})
    repeats: int = field(default=3, metadata={"help": "timed runs; the median is reported", "min": 1})
    amp: bool = field(default=True, metadata={"help": "bf16 autocast while training on CUDA (sampling runs in float32)"})
    channels_last: bool = field(default=True, metadata={"help": "channels_last memory format on CUDA"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the UNet"})
    trace: str = field(default="", metadata={"help": "write the profile of --trace-steps training steps here"})
    trace_steps: int = field(default=3, metadata={"help": "training steps that --trace profiles", "min": 1})
    peak_tflops: float = field(default=0.0, metadata={"help": "the device's dense bf16 peak (0: from PEAK_TFLOPS "
                               "by the GPU's name; none on a CPU)", "min": 0})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})


# Dense bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by a part of the GPU's name (first match).
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}
MATRIX_OPS = ("conv", "mm", "gemm", "matmul", "linear", "attention", "xmma", "flash", "fmha", "wgrad", "dgrad")
# ^ names of the operations (CPU) and kernels (CUDA) that are convolutions, matmuls and attention


def timed(fn, device, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` runs, with the device synchronised around each."""
    return statistics.median(report.timed(device, fn)[1] for _ in range(repeats))


def main(argv=None) -> dict:
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    common.check(cfg.ddim_steps <= cfg.T, f"--ddim-steps must be in 1..--T ({cfg.T}), got {cfg.ddim_steps}")
    device = common.get_device(cfg.device)
    common.setup_speed(device)
    torch.manual_seed(0)
    model = ddpm_mnist.UNet(cfg.image_size, cfg.channels, **ddpm_mnist.PRESETS[cfg.preset]).to(device)
    fmt = torch.channels_last if cfg.channels_last and device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = torch.compile(model) if cfg.compile else model
    ddpm = ddpm_mnist.DDPM(cfg.T).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    x0 = torch.randn(cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size, device=device).clamp(-1, 1)
    x0 = x0.contiguous(memory_format=fmt)

    def train_steps(n):
        for _ in range(n):
            with common.autocast(device, cfg.amp):
                loss = ddpm.loss(net, x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    train_steps(cfg.warmup)
    sec = timed(lambda: train_steps(cfg.train_steps), device, cfg.repeats)
    ips = cfg.train_steps * cfg.batch_size / sec
    with FlopCounterMode(display=False) as counter:     # one step of the eager UNet, forward and backward
        with common.autocast(device, cfg.amp):
            ddpm.loss(model, x0).backward()
    opt.zero_grad(set_to_none=True)
    flops = counter.get_total_flops() / cfg.batch_size  # per training image
    tflops, name = flops * ips / 1e12, torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = cfg.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
    matrix_share = profile_steps(cfg.trace, lambda: train_steps(cfg.trace_steps), device) if cfg.trace else None

    model.eval()
    def eps(x, t):
        with common.autocast(device, cfg.amp):
            return net(x, t)
    shape = (cfg.sample_batch, cfg.channels, cfg.image_size, cfg.image_size)
    ddpm.ddim_sample(eps, shape, 5)  # warm-up of the sampling shapes
    ddim = timed(lambda: ddpm.ddim_sample(eps, shape, cfg.ddim_steps), device, cfg.repeats)
    ddpm_sec = timed(lambda: ddpm.ddpm_sample(eps, shape), device, max(1, cfg.repeats // 2))

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"device {name}, torch {torch.__version__}, UNet '{cfg.preset}' {params:.2f}M params, "
          f"amp={cfg.amp and device.type == 'cuda'} channels_last={fmt == torch.channels_last} compile={cfg.compile}")
    print(f"{'what':34s} {'value':>12s}")
    rows = {f"train images/s (batch {cfg.batch_size})": f"{ips:,.0f}",
            "60,000-image epoch (s)": f"{60000 / ips:.2f}",
            f"DDIM-{cfg.ddim_steps} sampling, batch {cfg.sample_batch} (s)": f"{ddim:.3f}",
            f"DDPM-{cfg.T} sampling, batch {cfg.sample_batch} (s)": f"{ddpm_sec:.3f}",
            "training GFLOP per image": f"{flops / 1e9:.3f}",
            "achieved TFLOP/s": f"{tflops:.2f}"}
    if peak:
        rows[f"fraction of {peak:g} TFLOP/s peak"] = f"{tflops / peak:.1%}"
    if matrix_share is not None:
        rows["device time in conv/matmul/attn"] = f"{matrix_share:.0%}"
    for k, v in rows.items():
        print(f"{k:34s} {v:>12s}")
    if cfg.trace:
        print(f"the profile of {cfg.trace_steps} training steps: {cfg.trace}")
    return {"images_per_s": ips, "ddim_s": ddim, "ddpm_s": ddpm_sec, "flops_per_image": flops,
            "peak_fraction": tflops / peak if peak else None, "matrix_share": matrix_share}


def profile_steps(path: str, steps, device) -> float:
    """Profile `steps()` and write its 25 entries of most self time on the device to `path` (CUDA kernels on a
    GPU, operations on a CPU); -> the share of that time in MATRIX_OPS (the rest: normalisation, activations,
    copies, the optimizer)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        steps()
        common.sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    where = DeviceType.CUDA if cuda else DeviceType.CPU
    ops = [op for op in prof.key_averages() if op.device_type == where and getattr(op, key) > 0]
    total = sum(getattr(op, key) for op in ops)
    matrix = sum(getattr(op, key) for op in ops if any(m in op.key.lower() for m in MATRIX_OPS))
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=25))
    return matrix / total if total else 0.0


if __name__ == "__main__":
    main()
