"""Offline sample quality: a Frechet distance in a small classifier's features, and class counts.

The classifier is trained here on the dataset itself; besides the distance it gives the accuracy of
class-conditional samples and the class histogram of unconditional ones (mode coverage);
`within_class_diversity` measures how different the samples of one class are, with no classifier.

FID (Heusel et al., 2017) fits a Gaussian to Inception-v3 features of real and of generated images
and reports the Frechet (2-Wasserstein) distance between the two Gaussians:
    FD = ||mu_r - mu_g||^2 + Tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^(1/2))
Inception weights must be downloaded, and ImageNet features say little about 28x28 digits. So the
same formula (torchmetrics' `FrechetInceptionDistance`, with our network as its custom feature
extractor) is applied to the penultimate layer of a classifier trained on the dataset itself:
    "FD-LeNet"  for 1-channel data (MNIST): a LeNet-style CNN, 128 features, >= 99% test accuracy
    "FD-ResNet" for RGB data (CIFAR-10) on a GPU: a ResNet-9, 512 features, >= 90% test accuracy
    "FD-CNN"    for RGB data on a CPU: LeNet's stages at width 32, 128 features, trained in minutes
The numbers are *not* FID and are not comparable with published FIDs; they compare runs of this
codebase with each other, at the same N and against the same test split. The classifier is trained
on the real training split the first time it is needed and cached in `checkpoints/`, under a name
that holds a hash of the test images (a different copy of a dataset gets its own classifier) and,
when --classifier-epochs is given, the epochs (another length trains another classifier). A cache
file that is damaged or not an evaluate.py classifier is replaced by a new one. It trains from its
own seed: the same classifier whichever script needs it first, and the caller's RNG untouched.
Values scored by two different classifiers differ by ~10% (docs/evaluate.md): compare under one classifier.

Calibration, printed beside every score, each between two sets of half the test split's size:
two random halves of the real test set (the floor: sampling noise alone), real training images
against a half (what a model that reproduced its training set would score), and a blurred half
against the other half (what "visibly worse" looks like). FD grows as N shrinks: compare equal N.

Images are in [-1, 1], like everywhere in this codebase (images in [0, 1] get a warning).

Run:
    python -m tools.evaluate SAMPLES.pt --dataset mnist      # a (N, C, H, W) tensor in [-1, 1], or a dict
                                                       # {'x': images, 'y': requested labels (long)}
    python -m tools.evaluate --references --dataset mnist    # what a score means: FD of reference sets
    python -m tools.ddpm_figures --sample-only --eval 10000   # DDPM and the DDIM step sweep, scored
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance

import checkpoints
import common
from tools import report

KIND = "evaluate.py classifier"


@dataclass
class Config:
    samples: str = field(default="", metadata={"positional": True, "help": "a .pt file: images (N, C, H, W) "
                         "in [-1, 1], or a dict {'x': images, 'y': requested labels}"})
    dataset: str = field(default="mnist", metadata={"help": "mnist, cifar10, or an image folder"})
    data_dir: str = field(default="data", metadata={"help": "root of the torchvision datasets"})
    download: bool = field(default=True, metadata={"help": "download mnist/cifar10 when missing"})
    image_size: int = field(default=0, metadata={"min": 0, "help": "image folders only: resize to this (0 = 32)"})
    channels: int = field(default=3, metadata={"choices": [1, 3], "help": "image folders only: 1 (gray) or 3 (RGB)"})
    cache_dir: str = field(default="checkpoints", metadata={"help": "where the classifier is cached"})
    arch: str = field(default="auto", metadata={"choices": ["auto", "lenet", "cnn", "resnet"], "help": "the metric's "
                      "classifier (auto: LeNet for 1 channel; for RGB the ResNet-9 on a GPU, the small CNN on a CPU)"})
    classifier_epochs: int | None = field(default=None, metadata={"min": 1, "help": "classifier epochs (default: "
                                          "per RECIPES); a new value trains (and caches) another classifier"})
    calibrate: bool = field(default=True, metadata={"help": "print the calibration distances too"})
    references: bool = field(default=False, metadata={"help": "print the FD of reference sets (training images, "
                             "blurred, shifted, half the classes, noise) instead of scoring samples"})
    batch_size: int = field(default=500, metadata={"min": 1, "help": "images per forward pass when scoring"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu or cuda"})


# ----------------------------------------------------------------------------- data


def cache_key(dataset: str, x_test: torch.Tensor) -> str:
    """'mnist_1a2b3c4d': a safe file name from the dataset and a hash of its test images, so two
    copies of a dataset (MNIST vs MNIST-8k, a folder at another size) never share a classifier."""
    name = dataset.lower() if dataset.lower() in ("mnist", "cifar10") else os.path.basename(os.path.normpath(dataset))
    digest = hashlib.sha1(str(tuple(x_test.shape)).encode() + x_test.cpu().numpy().tobytes()).hexdigest()
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', name)[:40]}_{digest[:8]}"


def augment(x: torch.Tensor, pad: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to `pad` pixels (zero padding = black in [-1, 1]), and a random
    horizontal flip for natural images (never for digits). x: (N, C, H, W)."""
    N, C, H, W = x.shape
    dev = x.device
    xp = F.pad(x, (pad,) * 4, value=-1.0)                               # (N, C, H+2p, W+2p)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, N, 1), generator=g).to(dev)  # shifts, (N, 1) each
    rows, cols = torch.arange(H, device=dev) + dy, torch.arange(W, device=dev) + dx  # (N, H), (N, W)
    x = xp[torch.arange(N, device=dev)[:, None, None, None], torch.arange(C, device=dev)[None, :, None, None],
           rows[:, None, :, None], cols[:, None, None, :]]              # (N, C, H, W)
    if flip:
        x = torch.where((torch.rand(N, generator=g) < 0.5).to(x.device)[:, None, None, None], x.flip(3), x)
    return x


def blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian blur (kernel of about 4 sigma): the calibration's 'visibly worse' images."""
    from torchvision.transforms.functional import gaussian_blur

    k = 2 * math.ceil(2 * sigma) + 1
    return gaussian_blur(x, [k, k], [sigma, sigma])


# ----------------------------------------------------------------------------- classifiers


def conv_bn(c_in: int, c_out: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Classifier(nn.Module):
    """`body`: images (N, C, H, W) in [-1, 1] -> penultimate features (N, num_features), the
    features of the Frechet distance; `head`: features -> logits (N, num_classes)."""

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


class LeNet(Classifier):
    """LeNet-style CNN for digits: two 5x5 conv-pool stages, then 128 features."""

    def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.config = dict(arch="lenet", channels=channels, num_classes=num_classes, width=width)
        self.num_features = 128
        self.body = nn.Sequential(conv_bn(channels, width, 5), nn.MaxPool2d(2),          # (N, w, H/2, W/2)
                                  conv_bn(width, 2 * width, 5), nn.MaxPool2d(2),         # (N, 2w, H/4, W/4)
                                  nn.AdaptiveAvgPool2d(7), nn.Flatten(),                 # (N, 2w * 49)
                                  nn.Linear(2 * width * 49, 128), nn.ReLU())             # (N, 128)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, num_classes))


class Residual(nn.Sequential):
    def forward(self, x):                                # x + f(x), f = the layers given
        return x + super().forward(x)


class ResNet(Classifier):
    """ResNet-9 (Page, 2018, the fast CIFAR-10 DAWNBench net), 8 * width = 512 features."""

    def __init__(self, channels: int = 3, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.config = dict(arch="resnet", channels=channels, num_classes=num_classes, width=width)
        w = width
        self.num_features = 8 * w

        def res(c):                                                            # a residual pair of conv-BN-ReLU
            return Residual(conv_bn(c, c), conv_bn(c, c))
        self.body = nn.Sequential(
            conv_bn(channels, w),                                              # (N, w, H, W)
            conv_bn(w, 2 * w), nn.MaxPool2d(2), res(2 * w),                    # (N, 2w, H/2, W/2)
            conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),                            # (N, 4w, H/4, W/4)
            conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), res(8 * w),                # (N, 8w, H/8, W/8)
            nn.AdaptiveMaxPool2d(1), nn.Flatten())                             # (N, 8w)
        self.head = nn.Linear(8 * w, num_classes)

    def forward(self, x):                                # logits scaled by 1/8, as in Page's ResNet-9:
        return self.head(self.body(x)) * 0.125           # keeps the high-learning-rate steps stable


class CNN(LeNet):
    """The CPU metric for RGB images (CIFAR-10 without a GPU): LeNet's two conv-pool stages at width 32,
    128 features; trains in minutes on a CPU, where the ResNet-9 would take an hour."""

    def __init__(self, channels: int = 3, num_classes: int = 10, width: int = 32):
        super().__init__(channels, num_classes, width)
        self.config["arch"] = "cnn"


NETS = {"lenet": LeNet, "cnn": CNN, "resnet": ResNet}

# Training recipe per network: batch size, peak learning rate, random shift in pixels, flips, and a
# default length of about `steps` optimizer steps, clamped to [min_epochs, max_epochs] epochs
# (MNIST: 4 epochs of 60k images, 13 of MNIST-8k; CIFAR-10: 21 epochs).
RECIPES = {
    "lenet": dict(batch_size=128, lr=0.05, pad=2, flip=False, steps=800, min_epochs=4, max_epochs=15),
    "cnn": dict(batch_size=128, lr=0.05, pad=2, flip=True, steps=4000, min_epochs=4, max_epochs=15),
    "resnet": dict(batch_size=512, lr=0.2, pad=4, flip=True, steps=2000, min_epochs=10, max_epochs=40),
}
NAMES = {"lenet": "FD-LeNet", "cnn": "FD-CNN", "resnet": "FD-ResNet"}


def default_epochs(arch: str, n_train: int) -> int:
    r = RECIPES[arch]
    steps_per_epoch = max(1, n_train // r["batch_size"])
    return min(r["max_epochs"], max(r["min_epochs"], math.ceil(r["steps"] / steps_per_epoch)))


@torch.no_grad()
def predict(net: nn.Module, x: torch.Tensor, device, batch_size: int = 500) -> torch.Tensor:
    """Class ids (N,) of images x (N, C, H, W), in chunks so memory stays flat."""
    return torch.cat([net(c.to(device)).argmax(1).cpu() for c in x.split(batch_size)])


def train_classifier(net: nn.Module, x, y, epochs: int, device, seed: int = 0) -> None:
    """SGD with Nesterov momentum and a one-cycle learning rate; x, y already on `device`."""
    r = RECIPES[net.config["arch"]]
    steps_per_epoch = max(1, len(x) // r["batch_size"])
    opt = torch.optim.SGD(net.parameters(), lr=r["lr"], momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, r["lr"], total_steps=epochs * steps_per_epoch, pct_start=0.25)
    g = torch.Generator().manual_seed(seed)                          # the augmentations' randomness
    net.train()
    for epoch in range(epochs):
        t0, losses = time.perf_counter(), []
        batches = common.batches(x, y, r["batch_size"], seed + epoch)
        for xb, yb in common.progress(batches, f"classifier epoch {epoch + 1}/{epochs}"):
            with common.autocast(device):
                loss = F.cross_entropy(net(augment(xb, r["pad"], r["flip"], g)).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach())
        common.sync(device)
        print(f"  classifier epoch {epoch + 1}/{epochs}  loss {torch.stack(losses).mean().item():.4f}  "
              f"{len(losses) * min(r['batch_size'], len(x)) / (time.perf_counter() - t0):.0f} img/s")
    net.eval()


# ----------------------------------------------------------------------------- the metric


class Features(nn.Module):
    """The classifier's penultimate layer as torchmetrics' custom feature extractor:
    images (N, C, H, W) in [-1, 1] -> features (N, D) in float64 (small sets need the precision)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features      # so torchmetrics needs no dummy forward

    def forward(self, x):
        return self.classifier.features(x).double()

    def train(self, mode: bool = True):                  # never BatchNorm in training mode
        return super().train(False)


class Evaluator:
    """Scores generated images (float, [-1, 1], (N, C, H, W)) against the real test split of `dataset`."""

    def __init__(self, dataset: str = "mnist", data_dir: str = "data", download: bool = True, device="cpu",
                 image_size: int | None = None, channels: int = 3, *, cache_dir: str = "checkpoints",
                 classifier_epochs: int | None = None, batch_size: int = 500, arch: str = "auto"):
        self.device, self.batch_size, self._calibration, self._warned = torch.device(device), batch_size, None, False
        self._data = dict(data_dir=data_dir, download=download, image_size=image_size, channels=channels)
        self.x_test, self.y_test = common.load_images(dataset, train=False, **self._data)
        self.dataset, self.shape = dataset, tuple(self.x_test.shape[1:])
        if arch == "auto":   # digits: LeNet; RGB: the ResNet-9 on a GPU, the small CNN on a CPU
            arch = "lenet" if self.shape[0] == 1 else "resnet" if self.device.type == "cuda" else "cnn"
        self.arch = arch
        epochs = f"_e{classifier_epochs}" if classifier_epochs else ""   # another length, another classifier
        suffix = "" if arch == ("lenet" if self.shape[0] == 1 else "resnet") else f"_{arch}"   # others: own file
        self.path = os.path.join(cache_dir, f"fd_classifier_{cache_key(dataset, self.x_test)}{suffix}{epochs}.pt")
        self.classifier = self._load_or_train(classifier_epochs)
        self.num_classes = self.classifier.config["num_classes"]
        self.name = NAMES[self.classifier.config["arch"]]
        self.features = Features(self.classifier)
        # statistics of the real test images (feature mean and covariance): computed once, kept
        self.metric = FrechetInceptionDistance(self.features, reset_real_features=False).to(self.device)
        self._update(self.metric, self.x_test, real=True)

    def _load_or_train(self, epochs: int | None) -> nn.Module:
        """The cached classifier, or a new one trained on the training split (then cached). A cache
        file that is damaged or holds something else is replaced."""
        if os.path.isfile(self.path):
            try:
                state = torch.load(self.path, map_location=self.device, weights_only=True)
            except Exception:
                state = None
            if isinstance(state, dict) and state.get("kind") == KIND and {"net", "model"} <= set(state) \
                    and state["net"].get("arch") == self.arch:
                net = NETS[state["net"]["arch"]](**{k: v for k, v in state["net"].items() if k != "arch"})
                checkpoints.load_weights(net, state["model"], self.path)
                return net.to(self.device).eval()
            print(f"the classifier cache '{self.path}' is damaged or not an {KIND}: training a new one there")
        cache_dir = os.path.dirname(self.path) or "."
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as e:
            common.die(f"cannot create --cache-dir '{cache_dir}' ({e.strerror}); pass a folder you can write to")
        common.check(os.access(cache_dir, os.W_OK), f"cannot write to --cache-dir '{cache_dir}'; pass a folder you "
                     "can write to")
        x, y = common.load_images(self.dataset, train=True, device=self.device, **self._data)
        arch = self.arch
        epochs = epochs or default_epochs(arch, len(x))
        print(f"training the {arch} classifier of the metric on {len(x)} images of {self.dataset} "
              f"({epochs} epochs on {self.device}); it is cached in {self.path}")
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(0)   # its own seed: the same classifier whatever ran before; the caller's RNG untouched
            net = NETS[arch](channels=x.shape[1], num_classes=int(y.max()) + 1).to(self.device)
            train_classifier(net, x, y, epochs, self.device)
        acc = (predict(net, self.x_test, self.device) == self.y_test).float().mean().item()
        print(f"classifier: test accuracy {100 * acc:.2f}% ({len(self.x_test)} images), {time.perf_counter() - t0:.0f}s")
        checkpoints.save(self.path, kind=KIND, net=net.config, model=net.state_dict(),
                         config=dict(dataset=self.dataset, epochs=epochs), test_accuracy=acc)
        return net

    def _update(self, metric, x, real: bool) -> None:
        for chunk in x.split(self.batch_size):
            metric.update(chunk.to(self.device), real=real)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        common.check(torch.is_tensor(x) and x.dim() == 4 and tuple(x.shape[1:]) == self.shape,
                     f"images must be (N, {', '.join(map(str, self.shape))}) to match {self.dataset}, "
                     f"got {tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        common.check(len(x) >= 2, f"a Frechet distance needs >= 2 images, got {len(x)}")
        bad = (~torch.isfinite(x.float())).flatten(1).any(1).sum().item()
        common.check(bad == 0, f"the samples contain NaN or inf ({bad} of {len(x)} images): the sampler "
                     "diverged; sample from an earlier checkpoint, or with fewer steps or a lower guidance scale")
        if not self._warned and x.min() >= 0 and x.max() <= 1:
            self._warned = True
            print(f"warning: the samples lie in [0, 1] (min {x.min():.2f}, max {x.max():.2f}), but this codebase's "
                  "images are in [-1, 1]; if they are [0, 1] images, score 2 * x - 1 instead")
        return x.float()

    def fd(self, x) -> float:
        """Frechet distance between generated x and the real test images (lower is better)."""
        self.metric.reset()                              # forgets the generated images only
        self._update(self.metric, self._check(x), real=False)
        return self.metric.compute().item()

    def fd_between(self, x_a, x_b) -> float:
        """Frechet distance between two image sets; symmetric in x_a and x_b."""
        metric = FrechetInceptionDistance(self.features).to(self.device)
        self._update(metric, self._check(x_a), real=True)
        self._update(metric, self._check(x_b), real=False)
        return metric.compute().item()

    def accuracy(self, x, y) -> float:
        """Share of x that the classifier assigns to the requested classes y (N,), integer ids 0..K-1."""
        x, y = self._check(x), torch.as_tensor(y).cpu()
        common.check(y.shape == (len(x),), f"need one label per image: {len(x)} images, labels {tuple(y.shape)}")
        common.check(not y.is_floating_point() and not y.is_complex() and y.dtype != torch.bool,
                     f"labels must be integer class ids (torch.long), got {y.dtype}; save y as y.long()")
        K = self.num_classes
        common.check(bool(((y >= 0) & (y < K)).all()), f"labels must be class ids 0..{K - 1} of {self.dataset}, "
                     f"got values in {y.min().item()}..{y.max().item()}")
        return (predict(self.classifier, x, self.device, self.batch_size) == y).float().mean().item()

    def histogram(self, x) -> list[int]:
        """Class counts of x: a missing class (0) is a dropped mode."""
        pred = predict(self.classifier, self._check(x), self.device, self.batch_size)
        return torch.bincount(pred, minlength=self.num_classes).tolist()

    def calibration(self, sigma: float = 1.0, seed: int = 0) -> dict[str, float]:
        """Reference values, each between two sets of half the test split's size: two random halves
        of the test split (the floor), real training images against a half (what a model that
        reproduced its training set would score), and a blurred half against the other half."""
        if self._calibration is None:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(len(self.x_test), generator=g)
            a, b = self.x_test[idx[: len(idx) // 2]], self.x_test[idx[len(idx) // 2:]]
            x_train, _ = common.load_images(self.dataset, train=True, **self._data)
            train = x_train[torch.randperm(len(x_train), generator=g)[:len(a)]]
            self._calibration = {"real halves": self.fd_between(a, b), "train vs test": self.fd_between(train, b),
                                 f"blurred (sigma {sigma:g} px)": self.fd_between(blur(a, sigma), b)}
        return self._calibration

    def references(self, seed: int = 0) -> dict[str, float]:
        """What a score means: the FD against the real test images of reference sets as large as the
        test split. Real training images (a random draw), the test images blurred or shifted, the
        training images of half the classes (half the modes dropped), and uniform noise."""
        g = torch.Generator().manual_seed(seed)
        x, y = common.load_images(self.dataset, train=True, **self._data)
        t, half = self.x_test, self.num_classes // 2

        def draw(pool):                                  # as many images as the test split, at random
            return pool[torch.randperm(len(pool), generator=g)[:len(t)]]
        sets = {"real training images": draw(x), "test images blurred, sigma 0.5 px": blur(t, 0.5),
                "test images blurred, sigma 1 px": blur(t, 1.0), "test images shifted by 2 px":
                torch.roll(t, (2, 2), dims=(2, 3)), f"training images of classes 0-{half - 1} only": draw(x[y < half]),
                "uniform noise": torch.rand(t.shape, generator=g) * 2 - 1}
        return {name: self.fd(s) for name, s in sets.items()}

    def describe(self) -> str:
        """One line: what the score compares, and the calibration values beside it."""
        cal = ", ".join(f"{k} {v:.3f}" for k, v in self.calibration().items())
        n = len(self.x_test)
        return f"{self.name} vs the {n} real test images of {self.dataset}; calibration ({n // 2} vs {n - n // 2}): {cal}"


def coverage(hist: list[int]) -> str:
    """'10/10 classes, 8.1-12.0%': classes present, and the smallest and largest share."""
    n = sum(hist)
    return f"{sum(h > 0 for h in hist)}/{len(hist)} classes, {100 * min(hist) / n:.1f}-{100 * max(hist) / n:.1f}%"


def within_class_diversity(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean pairwise L2 distance between images of the same class, averaged over the classes that
    have at least two images: a diversity number that needs no classifier (it falls when guidance
    pulls every sample of a class onto the same few typical images). x (N, C, H, W), y (N,)."""
    d = [torch.pdist(x[y == k].flatten(1).float()).mean() for k in y.unique() if (y == k).sum() > 1]
    common.check(len(d) > 0, "diversity needs at least two images of one class")
    return torch.stack(d).mean().item()


# ----------------------------------------------------------------------------- sweeps for the scripts


def score_sweep(ev: Evaluator, samplers: dict, n: int, shape: tuple, device, path: str | None = None,
                seed: int = 0, batch_size: int = 500) -> list[dict]:
    """Draw n samples from each sampler and score them: the (sampler, steps, seconds, FD, metric) table.

    samplers: {(name, steps): fn(x_T, generator) -> x_0}. Every sampler starts from the same x_T
    (and gets the same generator for its own noise), in chunks of `batch_size` so memory stays flat.
    Writes the table as markdown to `path`.
    """
    rows = []
    print(f"scoring {n} samples per sampler with {ev.describe()}")
    for (name, steps), sample in samplers.items():
        g_T, g = common.generator(device, seed), common.generator(device, seed, stream=1)
        xs, seconds = [], 0.0
        for k in common.progress(range(0, n, batch_size), f"{name} {steps} steps"):
            x_T = torch.randn((min(batch_size, n - k), *shape), device=device, generator=g_T)
            x, dt = report.timed(device, lambda: sample(x_T, g).float().clamp(-1, 1).cpu())
            xs.append(x)
            seconds += dt
        x = torch.cat(xs)
        rows.append(dict(sampler=name, steps=steps, seconds=seconds, fd=ev.fd(x), classes=coverage(ev.histogram(x)),
                         metric=ev.name))
        print(f"{name} {steps:5d} steps  {seconds:8.1f}s  {ev.name} {rows[-1]['fd']:8.3f}  {rows[-1]['classes']}")
    if path:
        report.write_table(path, ["sampler", "steps", "seconds", ev.name, "classes found, smallest-largest share"],
                           [[r["sampler"], r["steps"], r["seconds"], r["fd"], r["classes"]] for r in rows])
        with open(path, "a") as f:
            f.write(f"\nN = {n} samples per row; seconds = sampling time on {device}; {ev.describe()}.\n")
    return rows


# ----------------------------------------------------------------------------- command line


def load_samples(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A .pt file holding images (N, C, H, W) in [-1, 1] (uint8 in [0, 255] is converted), or a
    dict {'x': images, 'y': requested labels}. Checked here, before any classifier is trained."""
    common.check(os.path.isfile(path), f"samples file '{path}' not found; save generated images with "
                 "torch.save(x, PATH), x of shape (N, C, H, W) in [-1, 1]")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        common.die(f"cannot read '{path}' ({type(e).__name__}); it must be a torch.save'd tensor or dict")
    x, y = (obj.get("x"), obj.get("y")) if isinstance(obj, dict) else (obj, None)
    common.check(torch.is_tensor(x), f"'{path}' holds no image tensor; save a tensor or a dict {{'x': ..., 'y': ...}}")
    common.check(x.numel() > 0, f"'{path}' holds an empty tensor {tuple(x.shape)}; save the generated images, "
                 "(N, C, H, W) with N >= 2")
    x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()
    common.check(x.dim() == 4, f"samples must be (N, C, H, W), got shape {tuple(x.shape)}")
    common.check(not x.isnan().any(), f"the samples contain NaN ({x.isnan().flatten(1).any(1).sum()} of {len(x)} "
                 "images): the sampler diverged; sample from an earlier checkpoint, or with fewer steps or a lower "
                 "guidance scale")
    common.check(x.min() >= -1.01 and x.max() <= 1.01, f"samples must lie in [-1, 1], got [{x.min():.2f}, "
                 f"{x.max():.2f}]; images in [0, 255] must be saved as uint8")
    if y is not None:
        y = torch.as_tensor(y)
        common.check(not y.is_floating_point(), f"the labels 'y' in '{path}' must be integer class ids "
                     f"(torch.long), got {y.dtype}; save y.long()")
    return x, y


def main(argv=None) -> None:
    cfg = common.parse_config(Config, argv, description=__doc__.splitlines()[0])
    common.check(bool(cfg.samples) or cfg.references, "give the samples file: python -m tools.evaluate SAMPLES.pt "
                 "--dataset mnist (or --references for the reference table)")
    device = common.get_device(cfg.device)
    x, y = load_samples(cfg.samples) if cfg.samples else (None, None)
    ev = Evaluator(cfg.dataset, cfg.data_dir, cfg.download, device, cfg.image_size or None, cfg.channels,
                   cache_dir=cfg.cache_dir, classifier_epochs=cfg.classifier_epochs, batch_size=cfg.batch_size, arch=cfg.arch)
    if cfg.references:
        print(report.markdown_table(["reference set", ev.name], [[k, v] for k, v in ev.references().items()], ".1f"))
        print(ev.describe())
        return
    accuracy = ev.accuracy(x, y) if y is not None else None          # first: it checks the labels
    t0 = time.perf_counter()
    print(f"{ev.name} {ev.fd(x):.3f}  ({len(x)} samples, scored in {time.perf_counter() - t0:.1f}s)")
    hist = ev.histogram(x)
    print(f"class histogram {hist}  ({coverage(hist)})")
    if accuracy is not None:
        print(f"accuracy on the requested classes {100 * accuracy:.2f}%")
    print(ev.describe() if cfg.calibrate else f"{ev.name} vs the {len(ev.x_test)} real test images of {cfg.dataset}")


if __name__ == "__main__":
    main()
