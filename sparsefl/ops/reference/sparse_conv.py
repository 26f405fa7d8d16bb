"""Reference (plain torch) for the sparse Powerprop layer ops: the oracle of the C++ kernels.

A Powerprop weight omega is used as theta = sign(omega)|omega|^beta, restricted to its
support S (a `Support`, the nonzeros of omega when it was packed).  The three ops:

    sparse_conv_forward(x, omega, beta, S, bias, stride, padding)
        = conv2d(x, theta_S, bias, stride, padding)                      (float32 math)
    sparse_act_pack(x, k, kernel, stride, padding) -> (ptr, q, v)
        the inputs the weight gradient reads: the same k entries topk_compress(x) keeps
        (k = -1: every nonzero), grouped per (batch tile of 16 images, channel, phase
        (a, b) = ((h + ph) % sh, (w + pw) % sw)), each as q = (u * Wq + v) * 16 + n % 16
        with (u, v) = ((h + ph) // sh, (w + pw) // sw), Wq = (KW-1)//sw + (W-1+pw)//sw + 1,
        and its value (float32); within a group by image, then (u, v)
    sparse_conv_backward(dy, pack, omega, beta, S, x_shape, stride, padding)
        dx     = conv2d_input(x_shape, theta_S, dy)
        domega = conv2d_weight(x_pruned, dy) * beta|omega|^(beta-1) on S, 0 elsewhere

Linear layers are the 1x1 case (x as (B, C, 1, 1)).  Bad input raises ValueError or
TypeError with the same meaning as the C++ kernels (csrc/cpu/sparse_conv/).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

LANES = 16  # images per batch tile (= L in csrc/cpu/sparse_conv/sparse_conv.h)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Support(NamedTuple):
    """The packed support of a weight (Co, C, KH, KW) or (Co, C).

    rowptr int64 [Co + 1], cols int32: per output channel, the flat column
    (ci * KH * KW + kh * KW + kw) of every nonzero, ascending.
    cptr int64 [C + 1], cent int32: the same nonzeros grouped by input channel, each as
    its flat weight index co * C * KH * KW + col.
    """

    rowptr: Tensor
    cols: Tensor
    cptr: Tensor
    cent: Tensor

    @property
    def nnz(self) -> int:
        return int(self.cols.numel())


def _as4d(w: Tensor) -> Tensor:
    return w if w.dim() == 4 else w.reshape(w.shape[0], -1, 1, 1)


def pack_support(omega: Tensor) -> Support:
    """The support (nonzeros) of omega, in both groupings the kernels read."""
    if omega.dim() not in (2, 4):
        raise ValueError(f"sparsefl.pack_support: weight must be 2-D or 4-D, got {omega.dim()}-D")
    w = _as4d(omega.detach())
    co, c = w.shape[0], w.shape[1]
    kk = w.shape[2] * w.shape[3]
    k = c * kk
    if co * k >= 2**31:
        raise ValueError("sparsefl.pack_support: weight has 2^31 or more entries")
    nz = (w.reshape(co, k) != 0).nonzero()
    rows, cols = nz[:, 0], nz[:, 1]
    dev = w.device
    rowptr = torch.zeros(co + 1, dtype=torch.int64, device=dev)
    rowptr[1:] = torch.bincount(rows, minlength=co).cumsum(0)
    ci = cols // kk
    order = torch.sort(ci, stable=True).indices
    cptr = torch.zeros(c + 1, dtype=torch.int64, device=dev)
    cptr[1:] = torch.bincount(ci, minlength=c).cumsum(0)
    cent = (rows * k + cols)[order].to(torch.int32)
    return Support(rowptr, cols.to(torch.int32), cptr, cent)


def _check_float(t: Tensor, op: str, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} is {type(t).__name__}, not a Tensor")
    if t.dtype not in DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: float32, float16, "
                        "bfloat16")


def _check_operands(t: Tensor, name: str, omega: Tensor, beta: float, op: str) -> None:
    """A float tensor and the weight of the same dtype, and beta >= 1 (finite)."""
    _check_float(t, op, name)
    _check_float(omega, op, "weight")
    if t.dtype != omega.dtype:
        raise TypeError(f"{op}: {name} is {t.dtype} but weight is {omega.dtype}")
    if not (beta >= 1.0 and beta < float("inf")):
        raise ValueError(f"{op}: beta must be >= 1, got {beta}")


def _check_geometry(x_shape, w: Tensor, stride, padding, op: str) -> tuple[int, int]:
    if len(x_shape) != 4:
        raise ValueError(f"{op}: input must be 4-D (N, C, H, W), got {len(x_shape)} dims")
    if w.dim() != 4:
        raise ValueError(f"{op}: weight must be 4-D (Co, C, KH, KW), got {w.dim()} dims")
    if len(stride) != 2 or len(padding) != 2:
        raise ValueError(f"{op}: stride and padding must have 2 entries")
    n, c, h, wd = x_shape
    kh, kw = w.shape[2], w.shape[3]
    if w.shape[1] != c:
        raise ValueError(f"{op}: weight has {w.shape[1]} input channels, input has {c}")
    if min(c, h, wd) < 1:
        raise ValueError(f"{op}: empty spatial or channel dimension")
    if min(stride) < 1:
        raise ValueError(f"{op}: stride must be >= 1")
    if not (0 <= padding[0] <= kh - 1 and 0 <= padding[1] <= kw - 1):
        raise ValueError(f"{op}: padding must lie in [0, kernel - 1], got {tuple(padding)}")
    if h + 2 * padding[0] < kh or wd + 2 * padding[1] < kw:
        raise ValueError(f"{op}: the kernel is larger than the padded input")
    return ((h + 2 * padding[0] - kh) // stride[0] + 1,
            (wd + 2 * padding[1] - kw) // stride[1] + 1)


def _check_csr(ptr: Tensor, ent: Tensor, rows: int, limit: int, op: str, what: str) -> None:
    if ptr.dtype != torch.int64 or ent.dtype != torch.int32:
        raise TypeError(f"{op}: {what} pointer must be int64 and entries int32")
    if ptr.dim() != 1 or ent.dim() != 1 or ptr.numel() != rows + 1:
        raise ValueError(f"{op}: {what} pointer has {ptr.numel()} entries, expected {rows + 1}")
    if int(ptr[0]) != 0 or int(ptr[-1]) != ent.numel() or bool((ptr[1:] < ptr[:-1]).any()):
        raise ValueError(f"{op}: {what} pointer must ascend from 0 to the entry count")
    if ent.numel() and (int(ent.min()) < 0 or int(ent.max()) >= limit):
        raise ValueError(f"{op}: {what} entries must lie in [0, {limit})")
    group = torch.repeat_interleave(torch.arange(rows, device=ptr.device), ptr.diff())
    same = group[1:] == group[:-1]
    if bool((same & (ent[1:] <= ent[:-1])).any()):
        raise ValueError(f"{op}: {what} entries must be strictly ascending within each group "
                         "(no repeats)")


def theta_and_slope(omega: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(theta, dtheta/domega) in float32: omega|omega|^(beta-1) and beta|omega|^(beta-1)."""
    w = omega.float()
    e = beta - 1.0
    a = w.abs()
    t = {0.25: lambda: a.sqrt().sqrt(), 0.5: a.sqrt, 0.0: lambda: torch.ones_like(a),
         1.0: lambda: a}.get(e, lambda: a.pow(e))()
    return w * t, t * beta


def support_mask(omega: Tensor, support: Support) -> Tensor:
    w = _as4d(omega)
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    mask[support.cent.long()] = True
    return mask.view(w.shape)


def sparse_conv_forward(x: Tensor, omega: Tensor, beta: float, rowptr: Tensor, cols: Tensor,
                        bias: Tensor | None, stride, padding) -> Tensor:
    op = "sparsefl.sparse_conv_forward"
    _check_operands(x, "input", omega, beta, op)
    _check_geometry(tuple(x.shape), omega, stride, padding, op)
    co = omega.shape[0]
    _check_csr(rowptr, cols, co, omega[0].numel(), op, "support rows")
    if bias is not None:
        _check_float(bias, op, "bias")
        if bias.dim() != 1 or bias.numel() != co:
            raise ValueError(f"{op}: bias must have {co} entries")
    theta, _ = theta_and_slope(omega, beta)
    mask = torch.zeros(omega.numel(), dtype=torch.bool, device=omega.device)
    rows = torch.repeat_interleave(torch.arange(co, device=omega.device), rowptr.diff())
    mask[rows * omega[0].numel() + cols.long()] = True
    theta = theta * mask.view(omega.shape)
    b = None if bias is None else bias.float()
    return F.conv2d(x.float(), theta, b, tuple(stride), tuple(padding)).to(x.dtype)


def _pack_geometry(x_shape, kernel, stride, padding, op: str) -> int:
    """Wq, after the checks the C++ kernel makes."""
    if len(x_shape) != 4:
        raise ValueError(f"{op}: input must be 4-D (N, C, H, W)")
    if len(kernel) != 2 or len(stride) != 2 or len(padding) != 2:
        raise ValueError(f"{op}: kernel, stride and padding must have 2 entries")
    if min(kernel) < 1 or min(stride) < 1:
        raise ValueError(f"{op}: kernel and stride must be >= 1")
    if not (0 <= padding[0] < kernel[0] and 0 <= padding[1] < kernel[1]):
        raise ValueError(f"{op}: padding must lie in [0, kernel - 1]")
    if min(x_shape[1:]) < 1:
        raise ValueError(f"{op}: empty channel or spatial dim")
    return (kernel[1] - 1) // stride[1] + (x_shape[3] - 1 + padding[1]) // stride[1] + 1


def sparse_act_pack(x: Tensor, k: int, kernel, stride, padding,
                    tau: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """k >= 0: the k largest |x| (ties to the lower flat index); k = -1: every nonzero, or
    with a threshold tau every entry with |x| >= tau (SparsyFed's first-batch rule)."""
    from sparsefl.ops.reference.topk import topk_compress

    op = "sparsefl.sparse_act_pack"
    _check_float(x, op, "input")
    wq = _pack_geometry(tuple(x.shape), kernel, stride, padding, op)
    if not -1 <= k <= x.numel():
        raise ValueError(f"{op}: k = {k} is outside [-1, {x.numel()}]")
    if tau is not None:
        if k != -1:
            raise ValueError(f"{op}: give k = -1 with a threshold tau (got k = {k})")
        if math.isnan(tau):
            raise ValueError(f"{op}: tau is NaN")
    n, c, h, w = x.shape
    (sh, sw), (ph, pw) = stride, padding
    nt = -(-n // LANES)
    flat = x.reshape(-1)
    if tau is not None:
        if torch.isnan(flat).any():
            raise ValueError(f"{op}: input contains NaN")
        idx = (flat.float().abs() >= tau).nonzero().flatten()
    elif k == -1:
        if torch.isnan(flat).any():
            raise ValueError(f"{op}: input contains NaN")
        idx = flat.nonzero().flatten()
    else:
        idx = topk_compress([x], [], k)[0]
    img, ch, hw = idx // (c * h * w), (idx // (h * w)) % c, idx % (h * w)
    hh, ww = hw // w + ph, hw % w + pw
    group = (((img // LANES) * c + ch) * sh + hh % sh) * sw + ww % sw
    q = ((hh // sh) * wq + ww // sw) * LANES + img % LANES
    # within a group: image-major, then pixel (the order the kernel reads x in)
    order = torch.sort(group * 2**36 + (q % LANES) * 2**31 + q // LANES).indices
    groups = nt * c * sh * sw
    ptr = torch.zeros(groups + 1, dtype=torch.int64, device=x.device)
    ptr[1:] = torch.bincount(group, minlength=groups).cumsum(0)
    return ptr, q[order].to(torch.int32), flat[idx[order]].float()


def _unpack_positions(ptr: Tensor, q: Tensor, x_shape, kernel, stride, padding):
    """(image, channel, h, w) of each packed entry (int64 tensors)."""
    n, c, h, w = x_shape
    (sh, sw), (ph, pw) = stride, padding
    wq = (kernel[1] - 1) // sw + (w - 1 + pw) // sw + 1
    group = torch.repeat_interleave(torch.arange(ptr.numel() - 1, device=q.device), ptr.diff())
    b, a = group % sw, (group // sw) % sh
    ch, tile = (group // (sw * sh)) % c, group // (sw * sh * c)
    pix, lane = q.long() // LANES, q.long() % LANES
    return tile * LANES + lane, ch, (pix // wq) * sh + a - ph, (pix % wq) * sw + b - pw


def unpack_act(ptr: Tensor, q: Tensor, v: Tensor, x_shape, kernel, stride=(1, 1),
               padding=(0, 0)) -> Tensor:
    """The dense pruned input (N, C, H, W) float32 a pack stands for."""
    n, c, h, w = x_shape
    img, ch, hh, ww = _unpack_positions(ptr, q, x_shape, kernel, stride, padding)
    out = torch.zeros(n * c * h * w, dtype=torch.float32, device=q.device)
    out[((img * c + ch) * h + hh) * w + ww] = v
    return out.view(n, c, h, w)


def sparse_conv_backward(dy: Tensor, xptr: Tensor, xq: Tensor, xv: Tensor, omega: Tensor,
                         beta: float, rowptr: Tensor, cols: Tensor, cptr: Tensor, cent: Tensor,
                         x_shape, stride, padding,
                         need_dx: bool, need_dw: bool) -> tuple[Tensor | None, Tensor | None]:
    op = "sparsefl.sparse_conv_backward"
    _check_operands(dy, "grad_output", omega, beta, op)
    oh, ow = _check_geometry(tuple(x_shape), omega, stride, padding, op)
    n, c, h, w = x_shape
    co, kh, kw = omega.shape[0], omega.shape[2], omega.shape[3]
    if tuple(dy.shape) != (n, co, oh, ow):
        raise ValueError(f"{op}: grad_output has shape {tuple(dy.shape)}, expected "
                         f"{(n, co, oh, ow)}")
    _check_csr(rowptr, cols, co, omega[0].numel(), op, "support rows")
    _check_csr(cptr, cent, c, omega.numel(), op, "support columns")
    if cols.numel() != cent.numel():
        raise ValueError(f"{op}: support rows and columns hold different entry counts")
    ci_of = (cent.long() % omega[0].numel()) // (kh * kw)
    if bool((ci_of != torch.repeat_interleave(torch.arange(c, device=cent.device),
                                              cptr.diff())).any()):
        raise ValueError(f"{op}: support column entries do not match their input channel")
    rows = torch.repeat_interleave(torch.arange(co, device=cols.device), rowptr.diff())
    by_rows = (rows * omega[0].numel() + cols.long()).sort().values
    if not torch.equal(by_rows, cent.long().sort().values):
        raise ValueError(f"{op}: support rows and columns hold different entries (one "
                         "support must be the same set in both groupings)")
    theta, slope = theta_and_slope(omega, beta)
    mask = torch.zeros(omega.numel(), dtype=torch.bool, device=omega.device)
    mask[cent.long()] = True
    mask = mask.view(omega.shape)
    dx = dw = None
    dyf = dy.float()
    if need_dx:
        dx = torch.nn.grad.conv2d_input(tuple(x_shape), theta * mask, dyf, tuple(stride),
                                        tuple(padding)).to(dy.dtype)
    if need_dw:
        if xptr.dtype != torch.int64 or xq.dtype != torch.int32 or xv.dtype != torch.float32:
            raise TypeError(f"{op}: the packed activation must be (int64, int32, float32)")
        nt = -(-n // LANES)
        if xptr.numel() != nt * c * stride[0] * stride[1] + 1 or xq.numel() != xv.numel():
            raise ValueError(f"{op}: packed activation does not match the input shape")
        if int(xptr[0]) != 0 or int(xptr[-1]) != xq.numel() or bool((xptr.diff() < 0).any()):
            raise ValueError(f"{op}: activation pointer must ascend from 0 to the entry count")
        _, _, hh, ww = _unpack_positions(xptr, xq, x_shape, (kh, kw), stride, padding)
        if xq.numel() and (int(xq.min()) < 0 or bool((hh < 0).any() | (hh >= h).any())
                           or bool((ww < 0).any() | (ww >= w).any())):
            raise ValueError(f"{op}: activation positions out of range")
        xp = unpack_act(xptr, xq, xv, x_shape, (kh, kw), stride, padding)
        dth = torch.nn.grad.conv2d_weight(xp, tuple(omega.shape), dyf, tuple(stride),
                                          tuple(padding))
        dw = (dth * slope * mask).to(omega.dtype)
    return dx, dw
