"""Local SGD of a sparse Powerprop MLP as one kernel call (sparsefl.ops.sparse_mlp_sgd).

    run = fused_sgd(model)              # None unless the model qualifies
    if run is not None:
        losses, act_seconds = run(x, y, orders, batch_size, lr, momentum, weight_decay)

A model qualifies when set_compute found it to be a chain [Flatten], Linear, (ReLU,
Linear)* whose every layer computes sparse in C++ (the `sparse_chain` forward), every
parameter is one of those layers' weights and biases and trains, it is in training mode,
float32 on the CPU, and no hook watches a layer (a hook would see nothing of the fused
steps).  Then the whole local training runs inside the kernel, with the same arithmetic
as autograd through the sparse layers plus torch.optim.SGD (tests/test_fused_sgd.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from sparsefl.nn.sparse_compute import live_chain
from sparsefl.ops.sparse_mlp_sgd import sparse_mlp_sgd

Runner = Callable[[Tensor, Tensor, Tensor, int, float, float, float], tuple[Tensor, float]]


def fused_sgd(model: nn.Module) -> Runner | None:
    """A function that trains `model` in place with plain SGD in one call, or None when
    the model does not qualify (see the module docstring)."""
    chain = live_chain(model)
    if chain is None or not model.training or not torch.is_grad_enabled():
        return None
    layers, flat = chain[:2]
    params = []
    for m in layers:  # the chain's layers are sparse and native (set_compute)
        if m.weight.dtype != torch.float32 or not m.weight.requires_grad \
                or (m.bias is not None and not m.bias.requires_grad):
            return None
        params += [m.weight] + ([m.bias] if m.bias is not None else [])
    if sum(1 for p in model.parameters()) != len(params):
        return None  # a parameter outside the chain (e.g. a norm layer) would not train

    def run(x: Tensor, y: Tensor, orders: Tensor, batch_size: int, lr: float,
            momentum: float, weight_decay: float) -> tuple[Tensor, float]:
        if x.dtype != torch.float32 or x.device.type != "cpu" or (not flat and x.dim() != 2):
            raise ValueError("fused SGD: x must be float32 on the CPU (2-D unless the model "
                             "flattens)")
        return sparse_mlp_sgd(
            x.reshape(x.shape[0], -1), y, orders, batch_size, [m.weight for m in layers],
            [m.bias for m in layers], [m.beta for m in layers],
            [m._spec.support for m in layers],
            [m.act_density if m._pruning() else 1.0 for m in layers], lr, momentum,
            weight_decay)

    return run
