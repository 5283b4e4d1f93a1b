"""Shared pytest fixtures: tiny datasets written in the real file formats, never downloaded.

- `mnist_dir`: a data root holding MNIST/raw/*-idx?-ubyte files (torchvision's own layout) with
  64 training and 32 test digits. Each class k draws a bright bar whose position depends on k, so
  a classifier can actually learn the tiny set.
- `image_folder`: ROOT/{train,test}/<class>/<n>.png|jpg, 32x32 RGB (the ImageFolder layout of the
  offline CIFAR-10 copy).
- `ddpm_ckpt`: a ddpm_mnist.py checkpoint from a one-epoch tiny run, for the scripts that build on
  a trained UNet (trained once per test session).
"""
import hashlib
import os
import struct

import numpy as np
import pytest
import torch

# One intra-op thread: the tests run tiny tensors, for which a second OpenMP thread mostly spin-waits
# (measured on a 2-core machine: tiny convolutions ran many times slower with two).
torch.set_num_threads(1)

N_TRAIN, N_TEST, N_CLASSES = 64, 32, 10


def digest(path) -> str:
    """SHA-256 of a file: tests compare it before and after a run that must not touch the file."""
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def one_line(e) -> str:
    """The text of a caught SystemExit, asserted to be our one-line "error: ..." message."""
    text = str(e.value)
    assert text.startswith("error:") and "\n" not in text, text
    return text


def _digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % N_CLASSES
    x = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(y):
        r = 3 + 2 * k
        x[i, r:r + 3, 4:24] = 255 if k % 2 == 0 else 0   # a bar whose row encodes the class
        x[i, 4:24, r:r + 3] = 200                          # and a column bar
    return x, y.astype(np.uint8)


def write_mnist_idx(raw_dir: str, prefix: str, x: np.ndarray, y: np.ndarray) -> None:
    """The idx format of the original MNIST files: big-endian magic, sizes, then uint8 data."""
    os.makedirs(raw_dir, exist_ok=True)
    with open(os.path.join(raw_dir, f"{prefix}-images-idx3-ubyte"), "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(x), 28, 28) + x.tobytes())
    with open(os.path.join(raw_dir, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
        f.write(struct.pack(">II", 2049, len(y)) + y.tobytes())


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("data"))
    raw = os.path.join(root, "MNIST", "raw")
    write_mnist_idx(raw, "train", *_digits(N_TRAIN, 0))
    write_mnist_idx(raw, "t10k", *_digits(N_TEST, 1))
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> str:
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        for c, name in enumerate(("cat", "dog", "ship")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, size=(32, 32, 3), dtype=np.uint8)
                img[8 * c:8 * c + 8, :, c] = 255
                Image.fromarray(img).save(d / f"{i:04d}.{'jpg' if i % 2 else 'png'}")
    return str(root)


@pytest.fixture(scope="session")
def ddpm_ckpt(mnist_dir, tmp_path_factory) -> str:
    from tools import ddpm_figures                                   # ddpm_mnist.py's training, and the figures of its run

    out = str(tmp_path_factory.mktemp("ddpm_base"))
    ddpm_figures.main(["--data-dir", mnist_dir, "--no-download", "--out", out, "--preset", "tiny",
                       "--T", "50", "--epochs", "1", "--batch-size", "16", "--n-samples", "4", "--no-ddpm-grid",
                       "--sweep-steps", "0", "--ddim-steps", "10", "--device", "cpu"])
    return os.path.join(out, "ckpt.pt")
