"""Split a training set over clients: IID, Dirichlet(alpha) over labels, k shards each.

Every partitioner is a pure function of (labels, clients, seed).  Each client's share is
then split into its own train and test part with the same label distribution (stratified
per label), which is what personalised evaluation (FedBABU) measures on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from sparsefl.errors import DataError

METHODS = ("iid", "dirichlet", "shards")


@dataclass(frozen=True)
class ClientData:
    train: np.ndarray  # indices into the dataset's training set
    test: np.ndarray


def iid(labels: np.ndarray, clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), clients)]


def dirichlet(labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator,
              min_size: int = 2) -> list[np.ndarray]:
    """Latent Dirichlet allocation over labels (Hsu et al. 2019): for each class, the
    share of each client is drawn from Dir(alpha); redrawn until every client has
    `min_size` examples (at most 100 tries)."""
    classes = np.unique(labels)
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            share = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(np.int64)
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].append(piece)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise DataError(f"dirichlet(alpha={alpha}) could not give each of {clients} clients "
                     f"{min_size} examples from {len(labels)}; use fewer clients or a larger "
                     "alpha")


def shards(labels: np.ndarray, clients: int, per_client: int,
           rng: np.random.Generator) -> list[np.ndarray]:
    """Sort by label, cut into clients*per_client shards, deal them out at random
    (McMahan et al. 2017)."""
    n_shards = clients * per_client
    if n_shards > len(labels):
        raise DataError(f"{n_shards} shards need at least as many examples, have "
                         f"{len(labels)}")
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, n_shards)
    deal = rng.permutation(n_shards).reshape(clients, per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in deal]


def stratified_split(idx: np.ndarray, labels: np.ndarray, test_fraction: float,
                     rng: np.random.Generator) -> ClientData:
    """Per label, the first round(fraction * count) of a shuffle go to test."""
    train, test = [], []
    for c in np.unique(labels[idx]):
        mine = rng.permutation(idx[labels[idx] == c])
        cut = int(round(test_fraction * len(mine)))
        test.append(mine[:cut])
        train.append(mine[cut:])
    return ClientData(np.sort(np.concatenate(train)), np.sort(np.concatenate(test)))


def partition(labels: Tensor | np.ndarray, clients: int, method: str = "dirichlet", *,
              alpha: float = 0.5, shards_per_client: int = 2, test_fraction: float = 0.2,
              seed: int = 0) -> list[ClientData]:
    """Client train/test index sets over a training set's labels."""
    y = labels.numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if clients < 1:
        raise DataError(f"clients must be >= 1, got {clients}")
    if clients > len(y):
        raise DataError(f"{clients} clients but only {len(y)} examples")
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = iid(y, clients, rng)
    elif method == "dirichlet":
        if not alpha > 0:
            raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
        parts = dirichlet(y, clients, alpha, rng)
    elif method == "shards":
        parts = shards(y, clients, shards_per_client, rng)
    else:
        raise DataError(f"unknown partition {method!r}; choose one of {METHODS}")
    return [stratified_split(p, y, test_fraction, rng) for p in parts]
