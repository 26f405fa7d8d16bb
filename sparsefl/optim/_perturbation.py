"""Holds a model's weights at a perturbed point and brings them back exactly.

Two ways to restore, chosen once:
- "swap" (default): the perturbed weights are written into a persistent shadow buffer
  per parameter and `p.data` is pointed at it; restoring points `p.data` back.  16 bytes
  moved per fp32 parameter for the whole perturb+restore, and the restore is free and
  bit-exact.  Code that holds on to the old `p.data` storage across the step (a flat
  parameter buffer, for example) would not see the perturbation: use "copy" there.
- "copy": perturb in place, keep an exact backup, copy it back (28 bytes/param).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sparsefl import ops

RESTORE_MODES = ("swap", "copy")


class Perturbation:
    def __init__(self, restore: str = "swap", backend: str | None = None) -> None:
        if restore not in RESTORE_MODES:
            raise ValueError(f"restore must be one of {RESTORE_MODES}, got {restore!r}")
        self.restore_mode = restore
        self.backend = backend
        self._spare: dict[Tensor, Tensor] = {}  # param -> buffer for its next perturbed copy
        self._held: dict[Tensor, Tensor] = {}  # param -> exact weights while perturbed

    @property
    def active(self) -> bool:
        return bool(self._held)

    def _buffer(self, p: Tensor) -> Tensor:
        b = self._spare.get(p)
        if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
            b = torch.empty_like(p.data, memory_format=torch.contiguous_format)
            self._spare[p] = b
        return b

    @torch.no_grad()
    def apply(self, params: Sequence[Tensor], grads: Sequence[Tensor], rho: Sequence[float],
              adaptive: Sequence[bool], eta: float, eps: float,
              grads2: Sequence[Tensor] | None = None, rho2: float = 0.0) -> Tensor:
        """Move `params` to the perturbed point; returns the norm(s) the kernel computed."""
        if self.active:
            raise RuntimeError("the weights are already perturbed: call second_step/restore "
                               "before perturbing again")
        data = [p.data for p in params]
        bufs = [self._buffer(p) for p in params]
        swap = self.restore_mode == "swap"
        if grads2 is not None:  # two-direction step (Agnostic-SAM): no adaptive scaling
            if not swap:  # keep the exact weights in bufs, then write the perturbed point
                ops.sam_restore_(bufs, data, backend=self.backend)
            src, dst = (data, bufs) if swap else (bufs, data)
            norms = ops.two_dir_perturb(src, grads, grads2, dst, rho[0] if rho else 0.0, rho2,
                                        eps=eps, backend=self.backend)
        elif swap:
            norms = ops.sam_perturb(data, grads, bufs, rho, adaptive=adaptive, eta=eta, eps=eps,
                                    backend=self.backend)
        else:
            norms = ops.sam_perturb_(data, grads, bufs, rho, adaptive=adaptive, eta=eta, eps=eps,
                                     backend=self.backend)
        if swap:
            for p, b in zip(params, bufs):
                self._held[p] = p.data
                p.data = b
        else:
            self._held = dict(zip(params, bufs))
        return norms

    @torch.no_grad()
    def restore(self) -> None:
        """Put the exact pre-perturbation weights back (no-op when not perturbed)."""
        if not self._held:
            return
        if self.restore_mode == "swap":
            for p, old in self._held.items():
                self._spare[p] = p.data
                p.data = old
        else:
            ops.sam_restore_([p.data for p in self._held], list(self._held.values()),
                             backend=self.backend)
        self._held = {}
