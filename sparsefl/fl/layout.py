"""The flat index space a model's state travels in.

Every floating-point parameter and buffer that clients and server exchange gets a slice
[offset, offset + numel) of one flat vector, in state_dict order.  Prunable tensors
(Linear/Conv2d weights) are sent sparse; the others (biases, BatchNorm) dense.  Frozen
tensors (FedBABU's head) do not travel at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparsefl.nn import prunable


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    offset: int
    prunable: bool
    is_buffer: bool

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


class Layout:
    """Flat vectors live on `device` (the run's: model, global vector, server state)."""

    def __init__(self, model: nn.Module, frozen: set[str] = frozenset(),
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        prune = {n for n, _ in prunable(model)}
        params = {n for n, _ in model.named_parameters()}
        self.entries: list[Entry] = []
        offset = 0
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or name in frozen:
                continue
            self.entries.append(Entry(name, tuple(t.shape), offset, name in prune,
                                      name not in params))
            offset += t.numel()
        self.numel = offset
        self.prunable_numel = sum(e.numel for e in self.entries if e.prunable)

    def flatten(self, model: nn.Module) -> Tensor:
        state = model.state_dict()
        return torch.cat([state[e.name].detach().reshape(-1).float().to(self.device)
                          for e in self.entries]) if self.entries else self.zeros()

    def zeros(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """A zero vector of the flat space, on the layout's device."""
        return torch.zeros(self.numel, dtype=dtype, device=self.device)

    @torch.no_grad()
    def load(self, model: nn.Module, flat: Tensor) -> None:
        state = model.state_dict()
        for e in self.entries:
            state[e.name].copy_(flat[e.offset:e.offset + e.numel].view(e.shape))

    def grad_flat(self, model: nn.Module) -> Tensor:
        """Parameter gradients in the flat space (0 for buffers and missing grads)."""
        params = dict(model.named_parameters())
        out = self.zeros()
        for e in self.entries:
            p = params.get(e.name)
            if p is not None and p.grad is not None:
                out[e.offset:e.offset + e.numel] = p.grad.detach().reshape(-1).float()
        return out

    def mask(self, *, prunable: bool | None = None, buffer: bool | None = None) -> Tensor:
        """Boolean over the flat space selecting entries of the given kind."""
        m = self.zeros(torch.bool)
        for e in self.entries:
            if (prunable is None or e.prunable == prunable) and \
                    (buffer is None or e.is_buffer == buffer):
                m[e.offset:e.offset + e.numel] = True
        return m

    def prunable_entries(self) -> list[Entry]:
        return [e for e in self.entries if e.prunable]
