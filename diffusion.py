"""The course's graded interface to ddpm_mnist.py: `from diffusion import DiffusionModel, DiffusionProcess`.

DiffusionModel is ddpm_mnist.py's UNet, model(x, t) -> eps (x's shape), t an integer step in
[0, noise_steps). Its time_embed argument says how t gets in: "add" (the default, ddpm_mnist.py's: a scale
and a shift of each block's normalised features) or "concat" (the assignment's wording: the time step goes
in through ONE embedding layer, nn.Embedding(noise_steps, d), whose d numbers are concatenated with the
features of every block as d constant maps). DiffusionProcess holds the DDPM process of ddpm_mnist.py,
an AdamW optimizer and a device: add_noise(x, t) -> (x_t, eps), train_step(x) -> loss (a float),
sample(n, steps) -> images in [-1, 1] (DDPM through every step, or DDIM in `steps`, x0_hat clipped as
the script samples). Tensors come back on the device of the tensors given (add_noise), or on the
process's device (sample, which is given none).

What is the script's and what is not: the loss is ddpm_mnist.py's own (eps-MSE at a uniform random t)
and so are the samplers, but the training recipe is plainer. train_step uses a constant learning
rate (2e-4: no warm-up), no EMA (sample() uses the trained weights themselves) and no bf16 autocast,
so the same number of steps gives noisier samples than `python ddpm_mnist.py`.

Example (10 epochs of MNIST with the default UNet: run it on a GPU):

    import common, plots
    from diffusion import DiffusionProcess
    process = DiffusionProcess(image_size=28, channels=1, device="auto")        # a new DiffusionModel()
    x_train, _ = common.load_images("mnist", "data", device=process.device)  # (60000, 1, 28, 28) in [-1, 1]
    for epoch in range(10):
        for x, _ in common.batches(x_train, batch_size=128, seed=epoch):
            loss = process.train_step(x)
        print(f"epoch {epoch + 1}: loss {loss:.4f}")
    images = process.sample(16, steps=50)                  # DDIM-50; steps=None: all 1000 DDPM steps
    plots.save_grid(images, "samples.png", nrow=4)
"""
from __future__ import annotations

import torch
import torch.nn as nn

import common
from tools.ddpm_figures import concat_time
from ddpm_mnist import DDPM, PRESETS, UNet


class DiffusionModel(UNet):
    """The noise predictor eps_theta(x_t, t): ddpm_mnist.py's UNet of the given preset. time_embed="concat":
    t -> one embedding layer (noise_steps x 4 base numbers, in place of the sinusoid and its MLP) -> those
    numbers concatenated with every residual block's features (ddpm_figures.ConcatResBlock)."""

    def __init__(self, image_size: int = 28, channels: int = 1, preset: str = "mnist", time_embed: str = "add",
                 noise_steps: int = 1000):
        common.check(preset in PRESETS, f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
        common.check(time_embed in ("add", "concat"), f"unknown time_embed '{time_embed}'; choose add or concat")
        super().__init__(image_size, channels, **PRESETS[preset])
        if time_embed == "concat":
            concat_time(self)                            # every block: [features, t_dim maps of emb] -> conv1
            self.time_mlp = nn.Embedding(noise_steps, 4 * self.base)   # the one embedding layer: t -> emb (N, t_dim)

    def embed_time(self, t):                             # t (N,) integer steps -> (N, t_dim)
        if isinstance(self.time_mlp, nn.Embedding):
            return self.time_mlp(t)
        return super().embed_time(t)


class DiffusionProcess:
    """DDPM training and sampling of `model` (a new DiffusionModel when None) on `device`
    ('auto': CUDA when there is one, else the CPU)."""

    def __init__(self, image_size: int = 28, channels: int = 1, noise_steps: int = 1000,
                 schedule: str = "linear", model=None, lr: float = 2e-4, device="auto"):
        self.device = common.get_device(device) if isinstance(device, str) else torch.device(device)
        self.shape = (channels, image_size, image_size)
        self.model = (model if model is not None else DiffusionModel(image_size, channels)).to(self.device)
        rows = getattr(getattr(self.model, "time_mlp", None), "num_embeddings", noise_steps)  # "concat": a table
        common.check(rows >= noise_steps, f"the model's time embedding has {rows} rows, fewer than noise_steps; "
                     f"build it with DiffusionModel(..., noise_steps={noise_steps})")
        self.ddpm = DDPM(noise_steps, schedule).to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0, fused=self.device.type == "cuda")

    def add_noise(self, x, t):
        """-> (x_t, eps) on x's device: x_t = sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) eps, eps ~ N(0, I)."""
        eps = torch.randn_like(x)
        ab = self.ddpm.alpha_bar.to(x.device)[t.to(x.device)].view(-1, *([1] * (x.dim() - 1)))
        return ab.sqrt() * x + (1 - ab).sqrt() * eps, eps

    def train_step(self, x) -> float:
        """One AdamW step on || eps - eps_theta(x_t, t) ||^2 at a random t for each image of x."""
        self.model.train()
        loss = self.ddpm.loss(self.model, x.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()

    @torch.no_grad()
    def sample(self, n: int, steps: int | None = None, generator=None, clip: bool = True) -> torch.Tensor:
        """n images (n, C, H, W) in [-1, 1] on the process's device: DDPM when steps is None, else DDIM in
        `steps` steps, with x0_hat clipped to [-1, 1] at every step unless clip=False (as ddpm_mnist.py's
        --clip). The model is put in eval mode to sample and left in the mode it was in."""
        was_training = self.model.training
        self.model.eval()
        eps = self.ddpm.eps_from(self.model, clip)
        try:
            if steps is None:
                return self.ddpm.ddpm_sample(eps, (n, *self.shape), generator=generator)
            return self.ddpm.ddim_sample(eps, (n, *self.shape), steps, generator=generator)
        finally:
            self.model.train(was_training)
