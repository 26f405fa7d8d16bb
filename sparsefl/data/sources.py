"""Datasets read from local files only (nothing is downloaded at run time).

- digits: scikit-learn's 8x8 digits, shipped in this package (sparsefl/data/digits.npz,
  uint8 arrays; tests check them against scikit-learn's copy), a fixed seeded 80/20
  train/test split.
- mnist, fashion-mnist: IDX files (optionally .gz) in a directory; Fashion-MNIST falls
  back to Debian's /usr/share/datasets/fashion-mnist (package dataset-fashion-mnist).
- cifar10, cifar100: the binary distribution (data_batch_*.bin / train.bin ...), read
  byte by byte; never the pickled "python version".

Images come back as float32 tensors (N, C, H, W), scaled to [0, 1] then standardised
with the training set's per-channel mean and std; labels as int64.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sparsefl.errors import DataError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
NAMES = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100")


@dataclass(frozen=True)
class Dataset:
    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def subset(ds: Dataset, fraction: float = 1.0, label_noise: float = 0.0,
           seed: int = 0) -> Dataset:
    """A seeded fraction of the training set, with symmetric label noise: each kept
    training label is, with probability `label_noise`, replaced by a uniformly drawn
    *different* class.  The test set is untouched."""
    if fraction >= 1.0 and label_noise <= 0.0:
        return ds
    gen = torch.Generator().manual_seed(seed)
    x, y = ds.train_x, ds.train_y
    if fraction < 1.0:
        keep = torch.randperm(len(y), generator=gen)[:max(1, int(round(fraction * len(y))))]
        x, y = x[keep.sort().values], y[keep.sort().values]
    if label_noise > 0.0:
        flip = torch.rand(len(y), generator=gen) < label_noise
        shift = torch.randint(1, ds.num_classes, (len(y),), generator=gen)
        y = torch.where(flip, (y + shift) % ds.num_classes, y)
    return Dataset(ds.name, x, y, ds.test_x, ds.test_y, ds.num_classes)


def load(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load a dataset by name; `data_dir` holds the files (not needed for digits)."""
    if name == "digits":
        return _digits()
    if name in ("mnist", "fashion-mnist"):
        return _idx(name, _find_dir(name, data_dir))
    if name in ("cifar10", "cifar100"):
        return _cifar(name, _find_dir(name, data_dir))
    raise DataError(f"unknown dataset {name!r}; choose one of {NAMES}")


def _find_dir(name: str, data_dir: str | Path | None) -> Path:
    if data_dir:
        d = Path(data_dir).expanduser()
        if not d.is_dir():
            raise FileNotFoundError(f"data.dir {str(d)!r} is not a directory")
        return d
    if name == "fashion-mnist" and DEBIAN_FASHION_MNIST.is_dir():
        return DEBIAN_FASHION_MNIST
    hint = " (apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else ""
    raise FileNotFoundError(f"dataset {name!r} needs data.dir pointing at its files{hint}")


def _standardise(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


DIGITS_FILE = Path(__file__).with_name("digits.npz")


def _digits() -> Dataset:
    # scikit-learn's 8x8 digits (UCI, CC BY 4.0) as uint8 arrays in the package: the same
    # values as sklearn.datasets.load_digits() without importing scikit-learn (~0.9 s)
    with zipfile.ZipFile(DIGITS_FILE) as z:  # an .npz: .npy members, read without pickle
        images, target = (np.lib.format.read_array(z.open(f"{k}.npy"), allow_pickle=False)
                          for k in ("images", "target"))
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    tr, te = perm[:cut], perm[cut:]
    xtr, xte = _standardise(x[tr], x[te])
    return Dataset("digits", xtr, y[tr], xte, y[te], 10)


# ------------------------------------------------------------------ IDX (MNIST) -------

def _open(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.suffix == ".gz" else raw


def _idx_file(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                 stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{stem}[.gz] not found in {directory}")


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (unsigned bytes only, which is what MNIST-like sets use)."""
    raw = _open(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX element type 0x{raw[2]:02x} is not unsigned byte")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(shape)) if shape else 1
    if len(raw) != header + count:
        raise DataError(f"{path}: IDX body has {len(raw) - header} bytes, shape {shape} "
                         f"needs {count}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx(name: str, d: Path) -> Dataset:
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_idx_file(d, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_idx_file(d, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{d}: {split} images {images.shape} and labels {labels.shape} "
                             "do not match")
        arrays[split] = (torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1),
                         torch.from_numpy(labels.astype(np.int64)))
    xtr, xte = _standardise(arrays["train"][0], arrays["test"][0])
    return Dataset(name, xtr, arrays["train"][1], xte, arrays["test"][1], 10)


# ------------------------------------------------------------------ CIFAR binary ------

def _cifar_records(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    rec = label_bytes + 3072
    if raw.size % rec:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {rec}-byte "
                         "records")
    raw = raw.reshape(-1, rec)
    return raw[:, label_bytes:].reshape(-1, 3, 32, 32), raw[:, label_bytes - 1]


def _cifar(name: str, d: Path) -> Dataset:
    if name == "cifar10":
        sub = d / "cifar-10-batches-bin" if (d / "cifar-10-batches-bin").is_dir() else d
        train_files = [sub / f"data_batch_{i}.bin" for i in range(1, 6)]
        test_files, label_bytes, classes = [sub / "test_batch.bin"], 1, 10
    else:
        sub = d / "cifar-100-binary" if (d / "cifar-100-binary").is_dir() else d
        train_files, test_files = [sub / "train.bin"], [sub / "test.bin"]
        label_bytes, classes = 2, 100
    out = []
    for files in (train_files, test_files):
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{name}: missing {', '.join(missing)}")
        xs, ys = zip(*(_cifar_records(f, label_bytes) for f in files))
        x = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)
        y = torch.from_numpy(np.concatenate(ys).astype(np.int64))
        if int(y.max()) >= classes:
            raise DataError(f"{name}: label {int(y.max())} >= {classes}")
        out.append((x, y))
    xtr, xte = _standardise(out[0][0], out[1][0])
    return Dataset(name, xtr, out[0][1], xte, out[1][1], classes)
