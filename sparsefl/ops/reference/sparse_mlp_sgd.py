"""Reference (plain torch) for sparse_mlp_sgd: a client's local SGD training of a sparse
Powerprop MLP (Linear, ReLU, ..., Linear), every step of every epoch in one call.

Per step, on the batch B = order[epoch][i : i + batch_size]:
  forward   h_0 = x[B]; z_l = h_l theta_l^T + b_l; h_{l+1} = relu(z_l) (not after the last),
            theta = omega |omega|^(beta - 1)
  pruning   p_l = h_l with all but its top-k |entries| zeroed (k = keep_count(|B| * C_l,
            density_l), ties to the lower flat index; density >= 1 keeps all)
  loss      mean cross-entropy of z_L against y[B]
  backward  domega_l = (dz_l^T p_l) * beta |omega|^(beta - 1) on the support S_l (the
            rowptr/cols pattern), 0 elsewhere; db_l = sum dz_l;
            dz_{l-1} = (dz_l theta_l) * [h_l > 0]
  SGD       each parameter right after its gradient (torch.optim.SGD, dampening 0, no
            Nesterov): g = grad + wd * p; with momentum buf = g at the first step, else
            momentum * buf + g, g = buf; p -= lr * g

Every nonzero of omega must lie in S (else ValueError: the support is stale).  omegas and
biases are updated in place; returns the loss of every step (float32) and 0 (the seconds
of activation pruning, which only the native kernel measures).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from sparsefl.ops.reference.topk import keep_count, topk_mask

OP = "sparsefl.sparse_mlp_sgd"


def support_mask(rowptr: Tensor, cols: Tensor, shape: tuple[int, int]) -> Tensor:
    rows = torch.repeat_interleave(torch.arange(shape[0]), rowptr.diff())
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[rows, cols.long()] = True
    return mask


def check(x: Tensor, y: Tensor, order: Tensor, batch_size: int, omegas: Sequence[Tensor],
          biases: Sequence[Tensor], betas: Sequence[float], rowptrs: Sequence[Tensor],
          cols: Sequence[Tensor], act_densities: Sequence[float], lr: float, momentum: float,
          weight_decay: float) -> list[Tensor]:
    """The checks every backend makes; returns the support masks."""
    n_layers = len(omegas)
    if not n_layers or any(len(s) != n_layers for s in (biases, betas, rowptrs, cols,
                                                        act_densities)):
        raise ValueError(f"{OP}: omegas, biases, betas, rowptrs, cols and densities need one "
                         "entry per layer")
    if x.dtype != torch.float32:
        raise TypeError(f"{OP}: x must be float32, got {x.dtype} (other dtypes train "
                        "through the layers' own path)")
    if x.dim() != 2:
        raise ValueError(f"{OP}: x must be a (samples, features) tensor")
    n = x.shape[0]
    if y.shape != (n,) or y.dtype != torch.int64:
        raise ValueError(f"{OP}: y must be int64 with one label per sample")
    if order.dim() != 2 or order.shape[1] != n or order.dtype != torch.int64:
        raise ValueError(f"{OP}: order must be int64 (epochs, samples)")
    if batch_size < 1:
        raise ValueError(f"{OP}: batch size must be >= 1")
    if lr < 0 or momentum < 0 or weight_decay < 0:
        raise ValueError(f"{OP}: lr, momentum and weight decay must be >= 0")
    if order.numel() and (int(order.min()) < 0 or int(order.max()) >= n):
        raise ValueError(f"{OP}: order holds indices outside [0, {n})")
    masks = []
    cin = x.shape[1]
    for i, (w, b, beta, rp, c) in enumerate(zip(omegas, biases, betas, rowptrs, cols)):
        if w.dtype != torch.float32 or (b.numel() and b.dtype != torch.float32):
            raise TypeError(f"{OP}: layer {i}'s weight and bias must be float32")
        if w.dim() != 2:
            raise ValueError(f"{OP}: layer {i}'s weight must be a matrix")
        if w.shape[1] != cin:
            raise ValueError(f"{OP}: layer {i} takes {w.shape[1]} features but gets {cin}")
        if b.numel() and b.shape != (w.shape[0],):
            raise ValueError(f"{OP}: layer {i}'s bias must hold {w.shape[0]} entries")
        if not beta >= 1.0:
            raise ValueError(f"{OP}: beta must be >= 1")
        if rp.shape != (w.shape[0] + 1,) or rp.dtype != torch.int64 or c.dtype != torch.int32 \
                or int(rp[0]) != 0 or int(rp[-1]) != c.numel() or bool((rp.diff() < 0).any()):
            raise ValueError(f"{OP}: layer {i}'s support must be rowptr int64 "
                             f"[{w.shape[0] + 1}] spanning int32 cols")
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= w.shape[1]):
            raise ValueError(f"{OP}: layer {i}'s support columns must be in [0, {w.shape[1]})")
        mask = support_mask(rp, c, tuple(w.shape))
        if int(mask.sum()) != c.numel():
            raise ValueError(f"{OP}: layer {i}'s support columns must be ascending per row")
        escaped = int(((w.detach() != 0) & ~mask).sum())
        if escaped:
            raise ValueError(f"sparsefl: {escaped} nonzero weights of layer {i} lie outside "
                             "the support packed by set_compute(); the weights changed since "
                             "(a new model was loaded?): call set_compute(model, ...) again")
        masks.append(mask)
        cin = w.shape[0]
    classes = omegas[-1].shape[0]
    if n and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"{OP}: a label is outside [0, {classes})")
    return masks


@torch.no_grad()
def sparse_mlp_sgd(x: Tensor, y: Tensor, order: Tensor, batch_size: int,
                   omegas: Sequence[Tensor], biases: Sequence[Tensor], betas: Sequence[float],
                   rowptrs: Sequence[Tensor], cols: Sequence[Tensor],
                   act_densities: Sequence[float], lr: float, momentum: float,
                   weight_decay: float) -> tuple[Tensor, int]:
    masks = check(x, y, order, batch_size, omegas, biases, betas, rowptrs, cols,
                  act_densities, lr, momentum, weight_decay)
    n, last = x.shape[0], len(omegas) - 1
    buf_w: list[Tensor | None] = [None] * len(omegas)
    buf_b: list[Tensor | None] = [None] * len(omegas)
    losses = []

    def update(p: Tensor, grad: Tensor, bufs: list, i: int) -> None:
        g = grad + weight_decay * p
        if momentum:
            g = bufs[i] = g.clone() if bufs[i] is None else momentum * bufs[i] + g
        p.sub_(lr * g)

    for perm in order:
        for s in range(0, n, batch_size):
            b = perm[s:s + batch_size]
            h, inputs, kept, thetas = x[b], [], [], []
            for i, (w, bias, beta, d) in enumerate(zip(omegas, biases, betas, act_densities)):
                if torch.isnan(h).any():
                    raise ValueError(f"{OP}: input contains NaN (a layer's input went "
                                     "non-finite)")
                k = keep_count(h.numel(), d) if d < 1 else h.numel()
                inputs.append(h)
                kept.append(h * topk_mask([h], k)[0])
                thetas.append(w * w.abs().pow(beta - 1.0))
                z = F.linear(h, thetas[-1], bias if bias.numel() else None)
                h = torch.relu(z) if i < last else z
            losses.append(F.cross_entropy(z, y[b]))
            dz = (torch.softmax(z, 1) - F.one_hot(y[b], z.shape[1]).float()) / len(b)
            for i in range(last, -1, -1):
                w, bias = omegas[i], biases[i]
                slope = betas[i] * w.abs().pow(betas[i] - 1.0)
                gw = (dz.t() @ kept[i]) * slope * masks[i]
                gb = dz.sum(0)
                if i > 0:
                    dz = (dz @ thetas[i]) * (inputs[i] > 0)
                update(w, gw, buf_w, i)
                if bias.numel():
                    update(bias, gb, buf_b, i)
    return (torch.stack(losses) if losses else torch.empty(0)), 0
