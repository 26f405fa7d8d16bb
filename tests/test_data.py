"""Datasets from files and seeded partitions."""

import gzip
import struct

import numpy as np
import pytest
import torch

from sparsefl import data
from sparsefl.data import sources


def _labels(n=600, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


@pytest.mark.parametrize("method", data.METHODS)
def test_partition_covers_every_example_once_and_is_seeded(method):
    y = _labels()
    parts = data.partition(y, 12, method, alpha=0.3, shards_per_client=3, seed=5)
    every = np.concatenate([np.concatenate([p.train, p.test]) for p in parts])
    assert sorted(every.tolist()) == list(range(len(y)))
    again = data.partition(y, 12, method, alpha=0.3, shards_per_client=3, seed=5)
    assert all(np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test)
               for a, b in zip(parts, again))
    other = data.partition(y, 12, method, alpha=0.3, shards_per_client=3, seed=6)
    assert any(not np.array_equal(a.train, b.train) for a, b in zip(parts, other))


def test_dirichlet_small_alpha_is_skewed_and_large_alpha_is_not():
    y = _labels(5000)

    def mean_max_share(alpha):
        parts = data.partition(y, 10, "dirichlet", alpha=alpha, seed=0)
        shares = [np.bincount(y[np.concatenate([p.train, p.test])], minlength=10).max()
                  / (len(p.train) + len(p.test)) for p in parts]
        return float(np.mean(shares))

    assert mean_max_share(0.05) > 0.6
    assert mean_max_share(1000.0) < 0.2


def test_shards_limit_labels_per_client():
    y = _labels(1000)
    for p in data.partition(y, 20, "shards", shards_per_client=2, seed=1):
        assert len(np.unique(y[np.concatenate([p.train, p.test])])) <= 3  # 2 shards (+1 edge)


def test_client_test_split_has_the_train_label_distribution():
    y = _labels(4000)
    for p in data.partition(y, 5, "dirichlet", alpha=0.5, test_fraction=0.25, seed=2):
        tr = np.bincount(y[p.train], minlength=10)
        te = np.bincount(y[p.test], minlength=10)
        total = tr + te
        assert np.all(np.abs(te - 0.25 * total) <= 0.5 + 1e-9)  # rounded per label


def test_partition_bad_input():
    y = _labels(50)
    with pytest.raises(ValueError, match="unknown partition"):
        data.partition(y, 5, "bogus")
    with pytest.raises(ValueError, match="alpha"):
        data.partition(y, 5, "dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="clients"):
        data.partition(y, 51, "iid")
    with pytest.raises(ValueError, match="shards"):
        data.partition(y, 30, "shards", shards_per_client=2)


def test_shipped_digits_are_scikit_learns():
    sk = pytest.importorskip("sklearn.datasets")
    d = sk.load_digits()
    ours = data.load("digits")
    with np.load(sources.DIGITS_FILE, allow_pickle=False) as f:  # a test, not the package
        assert np.array_equal(f["images"], d.images) and f["images"].dtype == np.uint8
        assert np.array_equal(f["target"], d.target)
    assert len(ours.train_y) + len(ours.test_y) == len(d.target)


def test_digits_is_embedded_and_standardised():
    d = data.load("digits")
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10
    assert len(d.train_y) + len(d.test_y) == 1797
    assert abs(float(d.train_x.mean())) < 1e-4


def _write_idx(path, array, gz):
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_dataset_from_a_directory(tmp_path, gz):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}",
                   rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n), gz)
    d = data.load("mnist", tmp_path)
    assert d.train_x.shape == (30, 1, 28, 28) and d.test_y.shape == (10,)
    assert d.train_y.dtype == torch.int64


def test_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "x"
    bad.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(bad)
    bad.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc")
    with pytest.raises(ValueError, match="needs 5"):
        data.read_idx(bad)
    with pytest.raises(FileNotFoundError, match="data.dir"):
        data.load("mnist", tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("imagenet")


def test_cifar10_binary(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}.bin", 4) for i in range(1, 6)] + [("test_batch.bin", 3)]:
        rec = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], 1)
        (tmp_path / name).write_bytes(rec.astype(np.uint8).tobytes())
    d = data.load("cifar10", tmp_path)
    assert d.train_x.shape == (20, 3, 32, 32) and d.test_x.shape == (3, 3, 32, 32)
    (tmp_path / "test_batch.bin").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="records"):
        data.load("cifar10", tmp_path)


@pytest.mark.skipif(not sources.DEBIAN_FASHION_MNIST.is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_found_in_debian_location():
    d = data.load("fashion-mnist")
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)


def test_subset_and_symmetric_label_noise():
    d = data.load("digits")
    assert data.subset(d) is d
    s = data.subset(d, fraction=0.1, seed=3)
    assert len(s.train_y) == round(0.1 * len(d.train_y)) and torch.equal(s.test_y, d.test_y)
    n = data.subset(d, label_noise=0.4, seed=3)
    flipped = (n.train_y != d.train_y).float().mean()
    assert 0.33 < float(flipped) < 0.47  # every drawn flip changes the class
    assert torch.equal(data.subset(d, label_noise=0.4, seed=3).train_y, n.train_y)
