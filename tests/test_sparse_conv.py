"""Sparse Powerprop layer ops (sparsefl.ops.sparse_conv): every backend vs the reference.

Shapes cover the three models' layers (3x3 and 1x1, stride 1 and 2, padding 0 and 1,
Linear as 1x1), batch 1 and partial batch tiles, rectangular images, kernels 5x5 and
stride 3 (more phases), empty support rows, 0% and 100% density, every float dtype and
non-contiguous inputs; the activation pack must equal the reference entry for entry.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_with_isa_off

from sparsefl import _native, ops
from sparsefl.ops import sparse_conv as sc
from sparsefl.ops.reference import sparse_conv as ref

needs_cpp = pytest.mark.skipif(not _native.has_cpu_kernels(),
                               reason=f"native extension not loaded: {_native.LOAD_ERROR}")
BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp)]

# (N, C, Co, H, W, k, stride, padding)
SHAPES = [
    (64, 16, 16, 8, 8, 3, 1, 1),     # ResNet 3x3
    (17, 8, 16, 9, 7, 3, 2, 1),      # strided, partial batch tile, odd rectangular image
    (5, 3, 8, 6, 6, 3, 1, 1),        # stem-like, 3 input channels
    (33, 8, 16, 8, 8, 1, 2, 0),      # 1x1 shortcut, stride 2
    (1, 12, 6, 5, 5, 3, 1, 0),       # batch 1, no padding
    (20, 30, 7, 1, 1, 1, 1, 0),      # Linear as 1x1
    (18, 6, 5, 1, 1, 3, 1, 1),       # 3x3 conv at 1x1 spatial size (its pixel is not q = lane)
    (20, 4, 6, 18, 35, 3, 2, 1),     # stride 2, wide rows: the vector scan and its odd tail
    (17, 3, 5, 16, 32, 1, 2, 0),     # stride 2, no padding: the other column phase first
    (2100, 40, 3, 1, 1, 1, 1, 0),    # Linear past the small-input pack (84,000 inputs)
    (3, 4, 5, 11, 10, 5, 3, 2),      # 5x5, stride 3: nine phases
    (16, 4, 8, 32, 32, 3, 2, 1),     # ResNet's strided 3x3 at 32: dx merged 8 columns at a time
    (3, 5, 7, 13, 29, 3, 1, 1),      # 29-wide rows: runs of 8, 7, 7, 7 pixels
    (4, 40, 24, 6, 6, 3, 1, 1),      # many channels: input channels swept in blocks
    (5, 36, 20, 9, 9, 3, 2, 1),      # blocks in a strided forward and its phases' dx
]
DTYPE_TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def make(shape, density, dtype=torch.float32, seed=0, empty_row=True):
    n, c, co, h, w, k, s, p = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).relu().to(dtype)
    omega = torch.randn(co, c, k, k, generator=g).to(dtype)
    omega = omega * ops.topk_mask(omega.float(), density)
    if empty_row and co > 1:
        omega[1] = 0  # an output channel with no weights
    return x, omega, (s, s), (p, p)


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / (b.abs().max() + 1e-12)) if b.numel() else 0.0


def run_all(backend, x, omega, stride, padding, beta=1.25, k=None, dy=None):
    sup = sc.pack_support(omega)
    y = sc.sparse_conv_forward(x, omega, beta, sup, None, stride, padding, backend=backend)
    kk = ops.keep_count(x.numel(), 0.2) if k is None else k
    pack = sc.sparse_act_pack(x, kk, omega.shape[2:], stride, padding, backend=backend)
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(x.dtype)
    dx, dw = sc.sparse_conv_backward(dy, pack, omega, beta, sup, x.shape, stride, padding,
                                     backend=backend)
    return y, pack, dx, dw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
def test_matches_reference(backend, shape, density):
    x, omega, st, pd = make(shape, density)
    got = run_all(backend, x, omega, st, pd)
    want = run_all("reference", x, omega, st, pd)
    assert rel(got[0], want[0]) < 2e-6
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    assert rel(got[2], want[2]) < 2e-6
    assert rel(got[3], want[3]) < 2e-6


def test_reference_is_the_definition():
    """The reference against plain autograd: conv2d with theta on S, weight gradient
    from the pruned input, Powerprop's chain rule, zero off the support."""
    x, omega, st, pd = make(SHAPES[1], 0.1)
    w = omega.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    theta = w.sign() * w.abs().pow(1.25)
    y = torch.nn.functional.conv2d(xr, theta, None, st, pd)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    dx_true, = torch.autograd.grad(y, xr, dy)
    k = ops.keep_count(x.numel(), 0.2)
    xp = x * ops.topk_mask(x, 0.2)
    y2 = torch.nn.functional.conv2d(xp, theta, None, st, pd)
    dw_true, = torch.autograd.grad(y2, w, dy)
    yr, _, dx, dw = run_all("reference", x, omega, st, pd, k=k, dy=dy)
    assert rel(yr, y) < 1e-5 and rel(dx, dx_true) < 1e-5 and rel(dw, dw_true) < 1e-5
    assert bool((dw[omega == 0] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    x, omega, st, pd = make(SHAPES[0], 0.1, dtype)
    got = run_all(backend, x, omega, st, pd)
    x32, w32 = x.float(), omega.float()
    want = run_all("reference", x32, w32, st, pd, dy=torch.randn(
        got[0].shape, generator=torch.Generator().manual_seed(7)).to(dtype).float())
    assert got[0].dtype == dtype and got[2].dtype == dtype and got[3].dtype == dtype
    tol = DTYPE_TOL[dtype]
    assert rel(got[0], want[0]) < tol and rel(got[2], want[2]) < tol
    assert rel(got[3], want[3]) < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    x, omega, st, pd = make(SHAPES[0], 0.1)
    xt = x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # same values, other strides
    assert not xt.is_contiguous()
    a = run_all(backend, xt, omega, st, pd)
    b = run_all(backend, x, omega, st, pd)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_edge_cases(backend):
    x, _, _, _ = make(SHAPES[1], 0.1)
    n = x.numel()
    for k in (0, 1, n // 3, n, -1):
        got = sc.sparse_act_pack(x, k, (3, 3), (2, 2), (1, 1), backend=backend)
        want = sc.sparse_act_pack(x, k, (3, 3), (2, 2), (1, 1), backend="reference")
        assert all(torch.equal(a, b) for a, b in zip(got, want)), k
        assert got.q.numel() == (int((x != 0).sum()) if k == -1 else k)
    # ties: every value equal, the lower NCHW indices win
    ones = torch.ones(20, 3, 4, 4)
    got = sc.sparse_act_pack(ones, 50, (3, 3), (1, 1), (1, 1), backend=backend)
    want = sc.sparse_act_pack(ones, 50, (3, 3), (1, 1), (1, 1), backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_large_and_adversarial(backend):
    """Large inputs take the sampled-bracket path; an input whose sampled positions are
    all zero makes the bracket miss (fallback to the radix threshold).  Exact either way."""
    g = torch.Generator().manual_seed(3)
    big = torch.randn(32, 4, 32, 32, generator=g).relu()         # 131072 entries
    ties = torch.randint(0, 4, (32, 4, 32, 32), generator=g).float()  # heavy ties
    sparse_half = big.clone()
    sparse_half.view(-1)[: big.numel() // 2] = 0                  # the sample sees zeros
    for x in (big, ties, sparse_half):
        for d, st in ((0.01, 1), (0.05, 1), (0.3, 1), (0.05, 2)):
            k = ops.keep_count(x.numel(), d)
            got = sc.sparse_act_pack(x, k, (3, 3), (st, st), (1, 1), backend=backend)
            want = sc.sparse_act_pack(x, k, (3, 3), (st, st), (1, 1), backend="reference")
            assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradient_and_empty_batch(backend):
    x, omega, st, pd = make(SHAPES[0], 0.1)
    y, _, dx, dw = run_all(backend, x, omega, st, pd, dy=torch.zeros(64, 16, 8, 8))
    assert float(dx.abs().sum()) == 0 and float(dw.abs().sum()) == 0
    empty = x[:0]
    sup = sc.pack_support(omega)
    y0 = sc.sparse_conv_forward(empty, omega, 1.25, sup, None, st, pd, backend=backend)
    assert y0.shape == (0, 16, 8, 8)


@needs_cpp
def test_thread_count_does_not_change_bits():
    x, omega, st, pd = make(SHAPES[0], 0.1)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_all("cpp", x, omega, st, pd)
        torch.set_num_threads(2)
        two = run_all("cpp", x, omega, st, pd)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], two[0]) and torch.equal(one[2], two[2])
    assert torch.equal(one[3], two[3])


@needs_cpp
@pytest.mark.parametrize("env", ["SPARSEFL_DISABLE_AVX512", "SPARSEFL_DISABLE_AVX2"])
def test_other_isa_paths(env):
    """AVX2 and portable loops, the layer and the activation pack (run in a subprocess: the
    ISA is chosen once per process)."""
    code = ("import torch; from tests.test_sparse_conv import *\n"
            "for shape in SHAPES:\n"
            "    x, omega, st, pd = make(shape, 0.1)\n"
            "    got = run_all('cpp', x, omega, st, pd); want = run_all('reference', x, omega, "
            "st, pd)\n"
            "    assert rel(got[0], want[0]) < 2e-6 and rel(got[2], want[2]) < 2e-6 and "
            "rel(got[3], want[3]) < 2e-6, shape\n"
            "test_pack_edge_cases('cpp'); test_pack_large_and_adversarial('cpp')\n"
            "test_pack_cut_at_zero_with_many_ties('cpp')\n"
            "for dt in (torch.float32, torch.bfloat16):\n"
            "    test_pack_threshold_is_the_count_pack('cpp', dt)\n"
            "print('ok')")
    run_with_isa_off(env, code)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    x, omega, st, pd = make(SHAPES[0], 0.1)
    sup = sc.pack_support(omega)
    fwd = sc.sparse_conv_forward
    with pytest.raises(TypeError):
        fwd(x.double(), omega, 1.25, sup, None, st, pd, backend=backend)
    with pytest.raises(TypeError):
        fwd(x.half(), omega, 1.25, sup, None, st, pd, backend=backend)
    with pytest.raises(ValueError):
        fwd(x[:, :3], omega, 1.25, sup, None, st, pd, backend=backend)
    with pytest.raises(ValueError):
        fwd(x, omega, 0.5, sup, None, st, pd, backend=backend)
    with pytest.raises(ValueError):
        fwd(x, omega, 1.25, sup, None, st, (3, 3), backend=backend)
    bad = sup._replace(cols=sup.cols.clone())
    bad.cols[0] = 10_000
    with pytest.raises(ValueError):
        fwd(x, omega, 1.25, bad, None, st, pd, backend=backend)
    with pytest.raises(ValueError):
        fwd(x, omega, 1.25, sup._replace(rowptr=sup.rowptr[:-1]), None, st, pd, backend=backend)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    lin_nan = torch.randn(20, 30, 1, 1)
    lin_nan[3, 5] = float("nan")
    for k in (-1, 100):
        with pytest.raises(ValueError, match="NaN"):
            sc.sparse_act_pack(nan, k, (3, 3), st, pd, backend=backend)
        with pytest.raises(ValueError, match="NaN"):  # one-pixel (Linear) path
            sc.sparse_act_pack(lin_nan, k, (1, 1), (1, 1), (0, 0), backend=backend)
    with pytest.raises(ValueError):
        sc.sparse_act_pack(x, x.numel() + 1, (3, 3), st, pd, backend=backend)
    pack = sc.sparse_act_pack(x, 100, (3, 3), st, pd, backend=backend)
    dy = torch.randn(64, 16, 8, 8)
    bwd = sc.sparse_conv_backward
    with pytest.raises(ValueError):
        bwd(dy[:, :8], pack, omega, 1.25, sup, x.shape, st, pd, backend=backend)
    with pytest.raises(ValueError):  # a pack made for another stride
        bwd(dy, sc.sparse_act_pack(x, 100, (3, 3), (2, 2), pd, backend=backend), omega, 1.25,
            sup, x.shape, st, pd, backend=backend)
    q = pack.q.clone()
    q[0] = 10**8
    with pytest.raises(ValueError):
        bwd(dy, pack._replace(q=q), omega, 1.25, sup, x.shape, st, pd, backend=backend)
    mixed = sup._replace(cent=sup.cent.flip(0).contiguous())
    with pytest.raises(ValueError):
        bwd(dy, pack, omega, 1.25, mixed, x.shape, st, pd, backend=backend)
    for bad, why in _not_a_set(sup, omega):
        with pytest.raises(ValueError, match=why):
            bwd(dy, pack, omega, 1.25, bad, x.shape, st, pd, backend=backend)
        if why != "different entries":  # the forward reads the rows only
            with pytest.raises(ValueError, match=why):
                fwd(x, omega, 1.25, bad, None, st, pd, backend=backend)


def _not_a_set(sup, omega):
    """Supports that are not one set: a repeated column in a row, two columns out of
    order, and columns that hold another entry than the rows (same counts, same
    channels)."""
    row = int(((sup.rowptr[1:] - sup.rowptr[:-1]) >= 2).nonzero()[0])
    j = int(sup.rowptr[row])
    rep = sup.cols.clone()
    rep[j + 1] = rep[j]
    swap = sup.cols.clone()
    swap[j], swap[j + 1] = sup.cols[j + 1], sup.cols[j]
    k = omega[0].numel()
    present = set(sup.cent.tolist())
    cent = sup.cent.clone()
    e = int(cent[0])
    other = next(e2 for e2 in range(e % k, omega.numel(), k) if e2 not in present)
    cent[0] = other  # same input channel (same column of the flat weight), another row
    end = int(sup.cptr[(sup.cptr > 0).nonzero()[0]])  # the group holding entry 0
    cent[:end] = cent[:end].sort().values
    return [(sup._replace(cols=rep), "strictly ascending"),
            (sup._replace(cols=swap), "strictly ascending"),
            (sup._replace(cent=cent), "different entries")]


@needs_cpp
def test_a_plan_refuses_a_support_that_is_not_a_set():
    x, omega, st, pd = make(SHAPES[0], 0.1)
    sup = sc.pack_support(omega)
    for bad, why in _not_a_set(sup, omega):
        with pytest.raises(ValueError, match=why):
            torch.classes.sparsefl_C.SparsePlan(bad.rowptr, bad.cols, bad.cptr, bad.cent,
                                                list(omega.shape), list(st), list(pd))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, omega, st, pd = make((5, 3, 4, 6, 6, 3, 2, 1), 0.3)
    sup = sc.pack_support(omega)
    torch.library.opcheck(torch.ops.sparsefl.sparse_conv_forward.default,
                          (x, omega, 1.25, sup.rowptr, sup.cols, None, [2, 2], [1, 1], backend))
    torch.library.opcheck(torch.ops.sparsefl.sparse_act_pack.default,
                          (x, 20, [3, 3], [2, 2], [1, 1], backend))
    pack = sc.sparse_act_pack(x, 20, (3, 3), (2, 2), (1, 1), backend=backend)
    dy = torch.randn(5, 4, 3, 3)
    torch.library.opcheck(torch.ops.sparsefl.sparse_conv_backward.default,
                          (dy, *pack, omega, 1.25, sup.rowptr, sup.cols, sup.cptr, sup.cent,
                           [5, 3, 6, 6], [2, 2], [1, 1], True, True, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_support_layout(backend):
    omega = torch.zeros(3, 2, 3, 3)
    omega[0, 1, 2, 0] = 1.0
    omega[2, 0, 0, 1] = -2.0
    sup = sc.pack_support(omega, backend)
    assert sup.rowptr.tolist() == [0, 1, 1, 2]
    assert sup.cols.tolist() == [1 * 9 + 2 * 3 + 0, 0 * 9 + 0 * 3 + 1]
    assert sup.cptr.tolist() == [0, 1, 2]
    assert sup.cent.tolist() == [2 * 18 + 1, 0 * 18 + 15]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_support_matches_reference(backend, dtype):
    g = torch.Generator().manual_seed(3)
    for shape in [(16, 8, 3, 3), (7, 5, 1, 1), (20, 30), (4, 3, 5, 5), (1, 1)]:
        for density in (0.0, 0.07, 0.5, 1.0):
            omega = torch.randn(shape, generator=g)
            omega = (omega * ops.topk_mask(omega, density)).to(dtype)
            got, want = sc.pack_support(omega, backend), ref.pack_support(omega)
            for a, b in zip(got, want):
                assert a.dtype == b.dtype and torch.equal(a, b), (shape, density)
    with pytest.raises(ValueError, match="2-D or 4-D"):
        sc.pack_support(torch.zeros(3, 3, 3), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_threshold_is_the_count_pack(backend, dtype):
    """tau (the first-batch rule): every |x| >= tau, the same pack as k = that count, for
    small, large (sampled-bracket), strided, one-pixel and post-ReLU inputs, ties at tau
    all kept, tau <= 0 keeping everything and tau = inf keeping nothing finite."""
    g = torch.Generator().manual_seed(5)
    cases = [(torch.randn(20, 3, 6, 6, generator=g), (3, 3), (1, 1), (1, 1)),
             (torch.randn(32, 4, 32, 32, generator=g).relu(), (3, 3), (2, 2), (1, 1)),
             (torch.randint(0, 4, (17, 5, 9, 9), generator=g).float(), (3, 3), (1, 1), (1, 1)),
             (torch.randn(40, 30, 1, 1, generator=g), (1, 1), (1, 1), (0, 0)),
             (torch.randn(3, 2, 5, 5, generator=g)[:, :, ::2], (1, 1), (1, 1), (0, 0))]
    for x, kernel, st, pd in cases:
        x = x.to(dtype)
        mag = x.float().abs().flatten()
        for tau in (float(mag.kthvalue(max(1, mag.numel() // 2)).values),
                    float(mag.max()), 2.0, 0.0, -1.0, math.inf):
            k = int((mag >= tau).sum())
            got = sc.sparse_act_pack(x, -1, kernel, st, pd, tau=tau, backend=backend)
            want = sc.sparse_act_pack(x, -1, kernel, st, pd, tau=tau, backend="reference")
            by_k = sc.sparse_act_pack(x, k, kernel, st, pd, backend="reference")
            for a, b, c in zip(got, want, by_k):
                assert torch.equal(a, b) and torch.equal(b, c), (tuple(x.shape), tau)
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(ValueError, match="k = -1"):
        sc.sparse_act_pack(x, 10, (3, 3), (1, 1), (1, 1), tau=0.5, backend=backend)
    with pytest.raises(ValueError, match="tau is NaN"):
        sc.sparse_act_pack(x, -1, (3, 3), (1, 1), (1, 1), tau=math.nan, backend=backend)
    nan = x.clone()
    nan[1, 2, 3, 4] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        sc.sparse_act_pack(nan, -1, (3, 3), (1, 1), (1, 1), tau=0.5, backend=backend)
    torch.library.opcheck(torch.ops.sparsefl.sparse_act_pack.default,
                          (x, -1, [3, 3], [1, 1], [1, 1], backend, 0.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_cut_at_zero_with_many_ties(backend):
    """A post-ReLU input cut below its nonzero count: the cut is 0 and tens of thousands
    of zeros tie there (the lowest NCHW indices win); exact, and no longer quadratic."""
    x = torch.randn(16, 8, 28, 28, generator=torch.Generator().manual_seed(1)).relu()
    for st in (1, 2):
        k = (3 * x.numel()) // 4
        got = sc.sparse_act_pack(x, k, (3, 3), (st, st), (1, 1), backend=backend)
        want = sc.sparse_act_pack(x, k, (3, 3), (st, st), (1, 1), backend="reference")
        assert all(torch.equal(a, b) for a, b in zip(got, want))
