"""A client's local SGD training of a sparse Powerprop MLP, every step in one call.

    losses, act_seconds = sparse_mlp_sgd(x, y, order, batch_size, omegas, biases, betas,
                                         supports, act_densities, lr, momentum, weight_decay)

omegas and biases are updated in place, exactly as autograd + torch.optim.SGD would
update them through the layers' sparse path (Powerprop chain rule, activation pruning of
each layer's saved input, the support fixed); `order` holds one permutation of the samples
per epoch.  On a small MLP a step's arithmetic is a few microseconds and the framework's
fixed cost per step ~150 us, so this is what makes a sparse client step cheaper than a
dense one (docs/benchmarks.md).  Definition: sparsefl/ops/reference/sparse_mlp_sgd.py.
Backends: reference (plain torch), cpp (csrc/cpu/sparse_mlp_sgd.cpp).  No CUDA or Triton
kernel: on a GPU the layer-by-layer path runs.  Registered as torch.ops.sparsefl.sparse_mlp_sgd.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sparsefl.ops import _backend
from sparsefl.ops.reference import sparse_mlp_sgd as _ref
from sparsefl.ops.reference.sparse_conv import Support

__all__ = ["sparse_mlp_sgd"]

_lib = torch.library.Library("sparsefl", "FRAGMENT")
_lib.define("sparse_mlp_sgd(Tensor x, Tensor y, Tensor order, int batch_size, "
            "Tensor(a!)[] omegas, Tensor(b!)[] biases, float[] betas, Tensor[] rowptrs, "
            "Tensor[] cols, float[] act_densities, float lr, float momentum, "
            "float weight_decay, str backend) -> (Tensor, int)")


def _impl(x, y, order, batch_size, omegas, biases, betas, rowptrs, cols, act_densities, lr,
          momentum, weight_decay, backend):
    args = (x, y, order, batch_size, omegas, biases, betas, rowptrs, cols, act_densities,
            lr, momentum, weight_decay)
    if _backend.resolve(backend, [x], native_op="sparse_mlp_sgd", triton=False) == "cpp":
        return torch.ops.sparsefl_C.sparse_mlp_sgd(*args)
    return _ref.sparse_mlp_sgd(*args)


_lib.impl("sparse_mlp_sgd", _impl, "CompositeExplicitAutograd")


@torch.library.register_fake("sparsefl::sparse_mlp_sgd", lib=_lib)
def _(x, y, order, batch_size, omegas, biases, betas, rowptrs, cols, act_densities, lr,
      momentum, weight_decay, backend):
    steps = order.shape[0] * (-(-x.shape[0] // batch_size))
    return x.new_empty(steps), 0


def sparse_mlp_sgd(x: Tensor, y: Tensor, order: Tensor, batch_size: int,
                   omegas: Sequence[Tensor], biases: Sequence[Tensor | None],
                   betas: Sequence[float], supports: Sequence[Support],
                   act_densities: Sequence[float], lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0, *,
                   backend: str | None = None) -> tuple[Tensor, float]:
    """Train in place; returns (loss of every step, seconds spent on activation pruning).
    x: (samples, features) float32; y: int64 labels; order: int64 (epochs, samples);
    act_densities: the fraction of each layer's input kept for its weight gradient
    (>= 1: all)."""
    dense = [t.detach() for t in omegas]
    bias = [b.detach() if b is not None else x.new_empty(0) for b in biases]
    losses, ns = torch.ops.sparsefl.sparse_mlp_sgd(
        x.detach().contiguous(), y.contiguous(), order.contiguous(), int(batch_size), dense,
        bias, [float(b) for b in betas], [s.rowptr for s in supports],
        [s.cols for s in supports], [float(d) for d in act_densities], float(lr),
        float(momentum), float(weight_decay), _backend.requested(backend))
    # the in-place writes happened below autograd: tell it the parameters changed
    torch.autograd.graph.increment_version([t for t in (*omegas, *biases) if t is not None])
    return losses, ns * 1e-9
