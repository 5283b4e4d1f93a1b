"""The course exercises of ddpm_mnist.py and the measurements of a run, each one figure or table.

`python -m tools.ddpm_figures` trains as `python ddpm_mnist.py` does (or loads OUT/ckpt.pt with --sample-only),
with the exercises' options, then writes:
- DDIM and T-step DDPM samples from the same noise (ddim{S}_8x8.png, ddpm_8x8.png, and _4x4.png),
- the test eps-MSE per timestep (loss_per_timestep.png; OUT/per_timestep.json holds it with the
  schedule's alpha_bar_t and log-SNR, for compare_runs.py),
- linear against spherical interpolation of noise (interpolation.png, `slerp`),
- stochastic against deterministic sampling from the same x_T (stochastic_vs_deterministic.png),
- DDIM's step count against quality and wall time, with a DDPM row (ddim_sweep.png/.md/_time.png),
- with --eval N, the FD-LeNet and class histogram of every sampler (eval.md, evaluate.py).
The exercises' options: what the network predicts (--predict eps|x0|v, `PredictDDPM`), how t enters
each block (--time-embed add|concat, `ConcatResBlock`), a black border for 4 levels on 28x28 digits
(--pad-to 32), and a network without convolutions (--arch mlp, `PixelMLP`). Conventions of ddpm_mnist.py:
integer steps t = 0..T-1, images in [-1, 1], EMA weights sample.

Course exercises (each run writes OUT/per_timestep.json; compare_runs.py overlays several runs):
    python -m tools.ddpm_figures --sample-only --eval 10000         # measure ddpm_mnist.py's run in runs/ddpm_mnist
    python -m tools.ddpm_figures --base 32 --mults 1 2 4 --out runs/unet3          # 3 levels [32, 64, 128]
    python -m tools.ddpm_figures --base 64 --mults 1 2 4 8 --pad-to 32 --out runs/unet4  # 4 levels need 32x32
    python -m tools.ddpm_figures --schedule cosine --cosine-clip 0.95 --out runs/cos95
    python -m tools.ddpm_figures --predict x0 --out runs/x0  # or v; --time-embed concat for the other embedding
    python -m tools.ddpm_figures --arch mlp --out runs/mlp   # the toy's MLP on images, against the UNet
    python -m tools.compare_runs --runs runs/ddpm_mnist runs/cos95 runs/x0 --out runs/compare
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import common
import plots
import ddpm_mnist
from tools import report

TRAINED = ("T", "schedule", "cosine_clip", "predict", "time_embed", "pad_to", "arch")   # --sample-only takes the run's


@dataclass
class Config(ddpm_mnist.Config):
    pad_to: int = field(default=0, metadata={"min": 0, "help": "pad with -1 (black) to this size, e.g. 32 so that "
                        "4 UNet levels fit 28x28 MNIST; 0 = no padding"})
    time_embed: str = field(default="add", metadata={"choices": ["add", "concat"], "help": "add: scale and shift "
                            "of the normalised features (ddpm_mnist.ResBlock); concat: maps joined to conv1's input"})
    predict: str = field(default="eps", metadata={"help": "the network's target (see PredictDDPM)",
                                                  "choices": ["eps", "x0", "v"]})
    arch: str = field(default="unet", metadata={"choices": ["unet", "mlp"], "help": "the network: ddpm_mnist's "
                      "UNet, or the toy's kind of MLP over the flattened pixels (PixelMLP, --mlp-hidden wide)"})
    mlp_hidden: int = field(default=512, metadata={"help": "--arch mlp: width of its 3 hidden layers", "min": 1})
    sigma: str = field(default="posterior", metadata={"help": "DDPM sigma_t^2", "choices": ["beta", "posterior"]})
    ddpm_grid: bool = field(default=True, metadata={"help": "the T-step DDPM grids, sweep row and --eval row (2-core "
                            "CPU, 64 images: ~3 min tiny preset, ~35 min mnist UNet)"})
    sweep_steps: tuple[int, ...] = field(default=(10, 20, 50, 100, 1000), metadata={"min": 0, "help": "DDIM step "
                                         "counts of ddim_sweep.png (8 images each; > --T left out; 0 = none)"})
    eval: int = field(default=0, metadata={"min": 0, "help": "score N samples of DDPM and of each sweep step count "
                      "with evaluate.py into OUT/eval.md (0 = off; N x (T + sweep steps) UNet passes)"})


# ----------------------------------------------------------------------------- the exercises' options


class PredictDDPM(ddpm_mnist.DDPM):
    """ddpm_mnist.py's process for a network that predicts eps, x0, or v = sqrt(alpha_bar_t) eps -
    sqrt(1 - alpha_bar_t) x0 (--predict). Each is a fixed linear function of the others given x_t, so all
    three learn the same estimator E[eps | x_t]; only the loss weight over noise levels differs: x0-MSE =
    eps-MSE (1 - ab)/ab and v-MSE = eps-MSE / ab (ab = alpha_bar_t): x0 stresses noisy steps, eps clean
    ones. The samplers always take an eps-predictor: `eps_from` converts the network's output."""

    def __init__(self, T: int = 1000, schedule: str = "linear", cosine_clip: float = 0.999, predict: str = "eps"):
        super().__init__(T, schedule, cosine_clip)
        self.predict = predict

    def loss(self, model, x0):
        """MSE between the true and the predicted target (eps, x0 or v) at a uniform random step t."""
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        ab = self._bc(self.alpha_bar, t)
        target = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[self.predict]
        return F.mse_loss(model(self.q_sample(x0, t, eps), t).float(), target)

    def eps_from(self, model, clip: bool = False):
        """The noise predictor that the network's output implies, given x_t:
        eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)  from x0;   eps = sqrt(ab) v + sqrt(1 - ab) x_t  from v;
        then (clip) the x0_hat it implies clipped to [-1, 1] at every step, as ddpm_mnist.DDPM.eps_from."""
        if self.predict == "eps":
            return super().eps_from(model, clip)

        def eps(x, t):
            ab, out = self._bc(self.alpha_bar, t), model(x, t).float()
            if self.predict == "x0":
                return (x - ab.sqrt() * out) / (1 - ab).sqrt()
            return ab.sqrt() * out + (1 - ab).sqrt() * x                # from v
        return super().eps_from(eps, clip)


class ConcatResBlock(ddpm_mnist.ResBlock):
    """ddpm_mnist's ResBlock with t as t_dim constant maps joined to conv1's input (--time-embed concat), in
    place of the scale and shift after norm2. t survives norm2 only as differences between the channels of a
    group, which `norm`'s groups of 4 or more keep (the zero padding is not what lets it through)."""

    def __init__(self, block: ddpm_mnist.ResBlock):      # the sizes of the block it replaces
        c_in, c_out, t_dim = block.norm1.num_channels, block.conv1.out_channels, block.t_proj.in_features
        super().__init__(c_in, c_out, t_dim, block.drop.p, isinstance(block.attn, ddpm_mnist.SelfAttention))
        self.conv1, self.t_proj = nn.Conv2d(c_in + t_dim, c_out, 3, padding=1), nn.Identity()

    def forward(self, x, emb):                           # x (N, c_in, H, W), emb (N, t_dim)
        h = F.silu(self.norm1(x))
        h = torch.cat([h, emb[:, :, None, None].expand(-1, -1, *h.shape[-2:]).to(h.dtype)], dim=1)  # + t_dim maps
        h = self.conv2(self.drop(F.silu(self.norm2(self.conv1(h)))))
        return self.attn(self.skip(x) + h)               # (N, c_out, H, W)


def concat_time(unet: ddpm_mnist.UNet) -> ddpm_mnist.UNet:
    """Swap every ResBlock of `unet` for a ConcatResBlock of the same sizes, in place (--time-embed concat)."""
    for blocks in [level.blocks for level in unet.downs] + [unet.mid] + [level.blocks for level in unet.ups]:
        for i, block in enumerate(blocks):
            blocks[i] = ConcatResBlock(block)
    unet.config["time_embed"] = "concat"                 # in the checkpoint's "net": loaders rebuild it
    return unet


class PixelMLP(nn.Module):
    """toy_2d.py's kind of network on images (--arch mlp): eps_theta(x_t, t) from the C*H*W pixels, flattened,
    joined to t's sinusoidal embedding, through 3 hidden layers. It is told nothing about space: a pixel's
    neighbours are just other inputs, and what it learns at one place it must learn again at every other.
    The UNet's convolutions share their weights across positions and see neighbourhoods."""

    def __init__(self, image_size: int = 28, channels: int = 1, hidden: int = 512, t_dim: int = 128):
        super().__init__()
        self.config = dict(arch="mlp", image_size=image_size, channels=channels, hidden=hidden, t_dim=t_dim)
        d, self.t_dim = channels * image_size ** 2, t_dim
        self.net = nn.Sequential(nn.Linear(d + t_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, d))

    def forward(self, x, t):                             # x (N, C, H, W), t (N,) -> eps (N, C, H, W)
        h = torch.cat([x.flatten(1), common.timestep_embedding(t, self.t_dim).to(x.dtype)], dim=1)
        return self.net(h).view_as(x)


def make_unet(time_embed: str = "add", arch: str = "unet", **net) -> nn.Module:
    """The network a checkpoint's "net" describes: ddpm_mnist.UNet(**net), with ConcatResBlocks for
    time_embed "concat"; or a PixelMLP for arch "mlp"."""
    if arch == "mlp":
        return PixelMLP(**net)
    unet = ddpm_mnist.UNet(**net)
    return concat_time(unet) if time_embed == "concat" else unet


def pad(x, size: int):
    """A border of -1 (black, MNIST's background) around (N, C, H, W) images up to size x size (0: none)."""
    common.check(x.shape[-1] <= size or not size, f"--pad-to {size} is smaller than the images "
                 f"({x.shape[-1]}x{x.shape[-1]}); pass a larger size or leave --pad-to out")
    p = size - x.shape[-1] if size else 0
    return F.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2), value=-1.0) if p else x


def crop(x, size: int):
    """The centre size x size of (N, C, H, W) images: undoes `pad`."""
    p = (x.shape[-1] - size) // 2
    return x[..., p:p + size, p:p + size]


def load_trained(path: str, device) -> tuple[ddpm_mnist.UNet, PredictDDPM, dict]:
    """Any checkpoint of ddpm_mnist.py's `train`, the exercises' included: -> (EMA network in eval mode,
    its process, the whole state)."""
    state = checkpoints.load(path, device, ddpm_mnist.KIND, keys=("net", "ema", "config"),
                             hint="train one with `python -m tools.ddpm_figures` first")
    c = state["config"]
    model = make_unet(**state["net"]).to(device)
    checkpoints.load_weights(model, state["ema"], path)
    ddpm = PredictDDPM(c["T"], c["schedule"], c.get("cosine_clip", 0.999), c.get("predict", "eps"))
    return model.eval(), ddpm.to(device), state


# ----------------------------------------------------------------------------- measurements


@torch.no_grad()
def test_loss_per_timestep(model, ddpm, x_test, bins: int = 20, max_images: int = 2000, seed: int = 0):
    """Test eps-MSE of the noise predictor `model` with one random t per image, averaged overall and
    within `bins` bins of t: -> (mean, [(bin centre t, mean), ...])."""
    g = common.generator(x_test.device, seed)
    x0 = x_test[:max_images]
    t = torch.randint(0, ddpm.T, (len(x0),), device=x0.device, generator=g)
    eps = torch.randn(x0.shape, device=x0.device, generator=g)
    per_image = torch.cat([((model(ddpm.q_sample(a, b, c), b).float() - c) ** 2).flatten(1).mean(1)
                           for a, b, c in zip(x0.split(256), t.split(256), eps.split(256))])
    idx = (t * bins // ddpm.T)
    curve = [((i + 0.5) * ddpm.T / bins, per_image[idx == i].mean().item()) for i in range(bins) if (idx == i).any()]
    return per_image.mean().item(), curve


def slerp(z0, z1, alpha):
    """Spherical interpolation: keeps interpolated Gaussian noise at the norm the model expects.
    Noise of d pixels lies on the shell ||z|| ~ sqrt(d); the linear midpoint of two independent
    draws has norm ~ sqrt(d / 2), a noise level the model never saw: the linear path leaves the shell."""
    omega = torch.acos((z0.flatten() @ z1.flatten() / (z0.norm() * z1.norm())).clamp(-1, 1))
    return (torch.sin((1 - alpha) * omega) * z0 + torch.sin(alpha * omega) * z1) / torch.sin(omega)


def make_figures(cfg: Config, model, ddpm: PredictDDPM, device) -> dict:
    """Cheap: test loss per timestep (+ OUT/per_timestep.json for compare_runs.py), DDIM grids, noise
    interpolation. Expensive, each timed and optional: the DDPM grids and stochastic_vs_deterministic.png
    (--no-ddpm-grid), the DDIM step sweep (--sweep-steps), --eval N. -> {test_loss, eval: score_sweep rows}"""
    out, n, T, c = cfg.out, cfg.n_samples, ddpm.T, model.config
    shape, S = (c["channels"], c["image_size"], c["image_size"]), cfg.ddim_steps
    eps_model = ddpm.eps_from(model, cfg.clip)                   # every sampler below takes eps_theta
    gen = functools.partial(common.generator, device, cfg.seed, 1)   # the samplers' z: the same everywhere
    x_T = torch.randn((n, *shape), device=device, generator=common.generator(device, cfg.seed))
    x_raw, _ = ddpm_mnist.load_data(cfg, device, train=False)
    # the network's own eps (never clipped: --clip is the samplers' business), the objective it was trained on
    test_loss, per_t = test_loss_per_timestep(ddpm.eps_from(model), ddpm, pad(x_raw, cfg.pad_to), seed=cfg.seed)
    print(f"test loss {test_loss:.4f} (eps-MSE of the network, {min(len(x_raw), 2000)} test images)")
    plots.plot_curves(os.path.join(out, "loss_per_timestep.png"), {"test loss": per_t}, xlabel="t",
                      ylabel="test eps-MSE", title=f"test eps-MSE per t (mean {test_loss:.4f}); t = 0: clean data")
    ab = ddpm.alpha_bar.cpu().double()
    logsnr = [math.log(ab[int(t)] / (1 - ab[int(t)])) for t, _ in per_t]  # log(alpha_bar / (1 - alpha_bar)), bin centre
    record = dict(config={k: getattr(cfg, k) for k in ("schedule", "cosine_clip", "predict", "T", "time_embed")},
                  net=model.config, alpha_bar=ab.tolist(), t=[t for t, _ in per_t], logsnr=logsnr,
                  loss=[v for _, v in per_t], test_loss=test_loss, fd={})
    save_record(out, record)

    x, sec = report.timed(device, lambda: ddpm.ddim_sample(eps_model, x_T.shape, S, cfg.eta, x_T=x_T, generator=gen()))
    print(f"DDIM grid: {S} steps x {n} images in {sec:.1f}s")
    grids = {f"ddim{S}": (x, f"DDIM, {S} steps, eta {cfg.eta:g}")}
    if cfg.ddpm_grid:
        print(f"DDPM grid: {T} steps x {n} images (--no-ddpm-grid skips it) ...", flush=True)
        x, sec = report.timed(device, lambda: ddpm.ddpm_sample(eps_model, x_T.shape, cfg.sigma, x_T=x_T,
                                                              generator=gen()))
        print(f"DDPM grid: {T} steps x {n} images in {sec:.1f}s")
        grids["ddpm"] = (x, f"DDPM, {T} steps, sigma_t^2 {cfg.sigma}")
    for name, (x, title) in grids.items():                       # the same x_T: compare them image by image
        plots.save_labelled_grid(x, os.path.join(out, f"{name}_8x8.png"), 8, [], f"{title}: {len(x)} samples, EMA weights")
        plots.save_labelled_grid(x[:16], os.path.join(out, f"{name}_4x4.png"), 4, [], title)
    # row 1 spherical, row 2 linear: the linear midpoints leave the noise shell (see slerp)
    a = torch.linspace(0, 1, 10, device=device)
    z = torch.stack([slerp(x_T[0], x_T[1], w) for w in a] + [(1 - w) * x_T[0] + w * x_T[1] for w in a])
    print(f"interpolation: ||z|| = {x_T[0].norm():.1f} and {x_T[1].norm():.1f} at the ends, midpoint "
          f"{z[4:6].flatten(1).norm(dim=1).mean():.1f} spherical, {z[14:16].flatten(1).norm(dim=1).mean():.1f} linear")
    x = ddpm.ddim_sample(eps_model, z.shape, S, x_T=z)
    plots.save_labelled_grid(x, os.path.join(out, "interpolation.png"), 10, ["spherical", "linear"],
                             f"from one noise vector to another (columns: weight 0 to 1), decoded by DDIM-{S}")
    if cfg.ddpm_grid:
        # 3 runs from the same k x_T: DDPM draws fresh noise z at every step (the 3 copies in one batch
        # draw different z, as 3 seeds would), DDIM with eta = 0 has none: the same digit each run.
        k = min(4, n)                                    # images per run
        print(f"stochastic vs deterministic: DDPM {T} steps x {3 * k} images ...", flush=True)
        stoch = ddpm.ddpm_sample(eps_model, (3 * k, *shape), cfg.sigma, x_T=x_T[:k].repeat(3, 1, 1, 1), generator=gen())
        det = [ddpm.ddim_sample(eps_model, (k, *shape), S, 0.0, x_T=x_T[:k], generator=gen()) for r in range(3)]
        print(f"  DDPM runs differ by {(stoch[:k] - stoch[k:2 * k]).abs().mean():.3f} per pixel, "
              f"DDIM runs by {(det[0] - det[1]).abs().mean():.3f}")
        plots.save_labelled_grid(torch.cat([torch.cat([stoch[k * r:k * (r + 1)], det[r]]) for r in range(3)]),
                                 os.path.join(out, "stochastic_vs_deterministic.png"), 2 * k, ["run 1", "run 2", "run 3"],
                                 f"the same {k} noise images, 3 runs: DDPM-{T} (left {k}: new z each run), "
                                 f"DDIM-{S}, eta 0 (right {k})")

    sweep, m = sorted({s for s in cfg.sweep_steps if 1 <= s <= T}), min(8, n)
    if sweep:  # the same m noise images through each step count: one row each, and its wall time
        print(f"DDIM sweep: {' + '.join(map(str, sweep))} steps x {m} images (--sweep-steps sets them) ...", flush=True)
        rows, times = [], []
        for steps in sweep:
            x, sec = report.timed(device, lambda: ddpm.ddim_sample(eps_model, x_T[:8].shape, steps, x_T=x_T[:8]))
            rows.append(x)
            times.append((steps, sec))
            print(f"DDIM {steps:4d} steps: {sec:.2f}s per batch of {m}")
        table = [["DDIM", s, sec] for s, sec in times]
        curves = {"DDIM": times}
        if cfg.ddpm_grid:  # the last row: DDPM through all T steps from the same x_T
            x, sec = report.timed(device, lambda: ddpm.ddpm_sample(eps_model, x_T[:8].shape, cfg.sigma, x_T=x_T[:8],
                                                                  generator=gen()))
            rows.append(x)
            table.append(["DDPM", T, sec])
            curves["DDPM"] = [(T, sec)]
            print(f"DDPM {T:4d} steps: {sec:.2f}s per batch of {m}")
        names = [f"DDIM-{s}" for s in sweep] + [f"DDPM-{T}"] * cfg.ddpm_grid
        plots.save_labelled_grid(torch.cat(rows), os.path.join(out, "ddim_sweep.png"), m, names,
                                 f"the same {m} noise images through each sampler and step count")
        report.write_table(os.path.join(out, "ddim_sweep.md"), ["sampler", "steps", f"seconds per batch of {m}"], table)
        plots.plot_curves(os.path.join(out, "ddim_sweep_time.png"), curves, xlabel="steps",
                          ylabel="seconds per batch", title=f"sampling steps vs wall time ({m} images)")
    rows = []
    if cfg.eval:  # opt-in: the same sweep, measured (FD in a cached classifier's features, see evaluate.py)
        from tools import evaluate
        ev = evaluate.Evaluator(cfg.dataset, cfg.data_dir, cfg.download, device,
                                image_size=cfg.image_size or None, channels=cfg.channels)
        size = x_raw.shape[-1]  # scored without the --pad-to border

        def ddpm_all(z, g):
            return crop(ddpm.ddpm_sample(eps_model, z.shape, cfg.sigma, x_T=z, generator=g), size)

        def ddim(steps, z, g):
            return crop(ddpm.ddim_sample(eps_model, z.shape, steps, cfg.eta, x_T=z, generator=g), size)
        samplers = {("DDPM", T): ddpm_all} if cfg.ddpm_grid else {}
        samplers |= {("DDIM", s): functools.partial(ddim, s) for s in sweep}
        rows = evaluate.score_sweep(ev, samplers, cfg.eval, shape, device, os.path.join(out, "eval.md"), cfg.seed)
        save_record(out, record | {"fd": {f"{r['sampler']} {r['steps']}": r["fd"] for r in rows}})
    return dict(test_loss=test_loss, eval=rows)


def save_record(out: str, record: dict) -> None:
    """OUT/per_timestep.json: what compare_runs.py overlays (alpha_bar, per-timestep loss, FD)."""
    with open(os.path.join(out, "per_timestep.json"), "w") as f:
        json.dump(record, f)


def main(argv=None) -> dict:
    """Train as ddpm_mnist.py does, with the exercises' options (or load, --sample-only), then the figures
    above. -> make_figures' results"""
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    ddpm_mnist.check_config(cfg)
    common.check(cfg.eval != 1, "--eval must be 0 (off) or >= 2 samples, got 1")
    device, ckpt = common.get_device(cfg.device), cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    common.prepare_out(cfg.out)
    if cfg.sample_only:
        model, ddpm, state = load_trained(ckpt, device)  # a missing or foreign file stops here
        cfg = replace(cfg, **{k: v for k, v in state["config"].items() if k in TRAINED})  # the run as trained
        common.check(cfg.ddim_steps <= ddpm.T, f"--ddim-steps must be in 1..{ddpm.T} (the T of '{ckpt}'), "
                     f"got {cfg.ddim_steps}")
    else:
        checkpoints.new_or_resume(ckpt, cfg.resume, cfg.overwrite)  # never replace a trained model by mistake
    common.seed_everything(cfg.seed)
    common.setup_speed(device)
    if not cfg.sample_only:
        x_train = pad(ddpm_mnist.load_data(cfg, device)[0], cfg.pad_to)
        if cfg.arch == "mlp":
            model = PixelMLP(x_train.shape[-1], x_train.shape[1], cfg.mlp_hidden)
        else:
            model = make_unet(cfg.time_embed, **ddpm_mnist.unet_kwargs(cfg, x_train))
        ddpm = PredictDDPM(cfg.T, cfg.schedule, cfg.cosine_clip, cfg.predict)
        model, ddpm = ddpm_mnist.train(cfg, model, ddpm, x_train, device,
                                       same=ddpm_mnist.SAME + ("predict", "time_embed", "pad_to", "arch", "mlp_hidden"))
    results = make_figures(cfg, model, ddpm, device)
    print(f"figures in {cfg.out}/")
    return results


if __name__ == "__main__":
    main()
