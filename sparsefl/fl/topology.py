"""Graphs for decentralized learning and their Metropolis-Hastings combination matrices.

`graph(kind, K)` returns a symmetric boolean adjacency (no self loops): ring, grid (the
most square r x c with r * c = K), erdos_renyi (each edge with probability p, redrawn
until connected), complete.  `metropolis(adj)` gives a_lk = 1 / (1 + max(d_l, d_k)) on
edges and a_kk = 1 - sum of the rest: symmetric, non-negative, rows and columns summing
to 1 (doubly stochastic), which `check_combination` verifies.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

KINDS = ("ring", "grid", "erdos_renyi", "complete")


def _connected(adj: np.ndarray) -> bool:
    seen, stack = {0}, [0]
    while stack:
        for j in np.flatnonzero(adj[stack.pop()]):
            if j not in seen:
                seen.add(int(j))
                stack.append(int(j))
    return len(seen) == len(adj)


def graph(kind: str, agents: int, *, p: float = 0.3, seed: int = 0) -> np.ndarray:
    if agents < 1:
        raise ValueError(f"need at least one agent, got {agents}")
    adj = np.zeros((agents, agents), dtype=bool)
    if kind == "complete":
        adj[:] = True
    elif kind == "ring":
        for k in range(agents):
            adj[k, (k + 1) % agents] = adj[(k + 1) % agents, k] = True
    elif kind == "grid":
        rows = max(r for r in range(1, int(math.isqrt(agents)) + 1) if agents % r == 0)
        cols = agents // rows
        for k in range(agents):
            r, c = divmod(k, cols)
            if c + 1 < cols:
                adj[k, k + 1] = adj[k + 1, k] = True
            if r + 1 < rows:
                adj[k, k + cols] = adj[k + cols, k] = True
    elif kind == "erdos_renyi":
        if not 0 < p <= 1:
            raise ValueError(f"erdos_renyi edge probability must be in (0, 1], got {p}")
        rng = np.random.default_rng(seed)
        for _ in range(1000):
            upper = np.triu(rng.random((agents, agents)) < p, 1)
            adj = upper | upper.T
            if _connected(adj):
                break
        else:
            raise ValueError(f"no connected Erdos-Renyi graph with K={agents}, p={p} in 1000 "
                             "draws; raise p")
    else:
        raise ValueError(f"unknown topology {kind!r}; choose one of {KINDS}")
    np.fill_diagonal(adj, False)
    return adj


def metropolis(adj: np.ndarray) -> Tensor:
    deg = adj.sum(1)
    a = np.zeros(adj.shape, dtype=np.float64)
    for j, k in zip(*np.nonzero(adj)):
        a[j, k] = 1.0 / (1.0 + max(deg[j], deg[k]))
    np.fill_diagonal(a, 1.0 - a.sum(0))
    out = torch.from_numpy(a)
    check_combination(out)
    return out


def check_combination(a: Tensor, atol: float = 1e-12) -> None:
    """Raise unless `a` is square, non-negative and doubly stochastic."""
    if a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"combination matrix must be square, got {tuple(a.shape)}")
    if bool((a < -atol).any()):
        raise ValueError("combination matrix has negative weights")
    ones = torch.ones(a.shape[0], dtype=a.dtype)
    if not (torch.allclose(a.sum(0), ones, atol=atol) and torch.allclose(a.sum(1), ones,
                                                                          atol=atol)):
        raise ValueError("combination matrix is not doubly stochastic")
