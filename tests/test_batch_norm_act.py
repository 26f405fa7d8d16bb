"""BatchNorm + residual add + ReLU in one op (sparsefl/ops/batch_norm_act.py).

The reference is checked against nn.BatchNorm + add + F.relu (values, autograd's
gradients, running statistics); the C++ kernel against the reference over shapes (row
tails of every vector width, 2-D to 5-D), dtypes, residual/ReLU/affine variants and
non-contiguous inputs, on every ISA path and thread count; then bad input, NaN, opcheck,
and the model level: a ResNet step through bn_act equals the eager modules, and
set_compute switches it on only for sparse compute without recompute.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import run_with_isa_off
from torch import nn
from torch.nn import functional as F

from sparsefl import _native, ops
from sparsefl.models.resnet import ResNet18
from sparsefl.nn import batch_norm_act as bna
from sparsefl.ops.reference import batch_norm_act as ref

needs_cpp = pytest.mark.skipif(not _native.has_kernel("batch_norm_act", "cpu"),
                               reason=f"native extension not loaded: {_native.LOAD_ERROR}")

# (N, C, spatial...): HW = 784, 49 (tails of 16 and 8), 16, 5, 1; 2-D and 5-D
SHAPES = [(4, 3, 28, 28), (5, 6, 7, 7), (3, 8, 4, 4), (2, 4, 5), (6, 5), (2, 3, 2, 3, 4),
          (1, 2, 3, 3)]
# the ReLU mask's bits: HW = 130 adds rows of two full 64-bit words and a tail
MASK_SHAPES = SHAPES + [(3, 2, 10, 13)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / (b.abs().max() + 1e-12)) if b.numel() else 0.0


def data(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    gy = torch.randn(shape, generator=g).to(dtype)
    c = shape[1]
    w = torch.rand(c, generator=g) + 0.5
    b = torch.randn(c, generator=g) * 0.3
    return x, r, gy, w, b


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_reference_is_torch_batchnorm(residual, relu, affine):
    """The definition equals nn.BatchNorm (+ add) (+ F.relu): output, autograd's
    gradients, the running statistics."""
    for shape in SHAPES:
        x, r, gy, w, b = data(shape, torch.float64)
        bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[
            len(shape)](shape[1], affine=affine, momentum=0.3).double()
        if affine:
            bn.weight.data.copy_(w)
            bn.bias.data.copy_(b)
        xs = x.clone().requires_grad_()
        rs = r.clone().requires_grad_() if residual else None
        want = bn(xs)
        if residual:
            want = want + rs
        if relu:
            want = F.relu(want)
        inputs = [xs] + ([rs] if residual else []) + ([bn.weight, bn.bias] if affine else [])
        gw = torch.autograd.grad(want, inputs, gy)

        xf, rf, gf = x.float(), r.float(), gy.float()
        rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
        y, mean, invstd = ref.batch_norm_act(xf, rf if residual else None,
                                             w.float() if affine else None,
                                             b.float() if affine else None, rm, rv, 0.3,
                                             1e-5, relu)
        assert rel(y, want) < 1e-5, shape
        assert rel(rm, bn.running_mean) < 1e-6 and rel(rv, bn.running_var) < 1e-6, shape
        gx, gr, gwt, gb = ref.batch_norm_act_backward(gf, xf, y, w.float() if affine else
                                                      None, mean, invstd, relu, residual)
        got = [gx] + ([gr] if residual else []) + ([gwt, gb] if affine else [])
        for a, e in zip(got, gw):
            assert rel(a, e) < 2e-5, shape
        assert (gr.numel() == 0) != residual


def _both(shape, dtype, residual, relu, affine, layout=None, seed=0):
    """cpp and reference on the same inputs -> their forward and backward outputs."""
    x, r, gy, w, b = data(shape, dtype, seed)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        r = r.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a view with a gap in every row
        x = torch.cat([x, x], dim=-1)[..., ::2]
        r = torch.cat([r, r], dim=-1)[..., ::2]
    out = {}
    for backend in ("cpp", "reference"):
        rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
        y, mean, invstd = ops.batch_norm_act(
            x, r if residual else None, w if affine else None, b if affine else None, rm, rv,
            momentum=0.1, eps=1e-5, relu=relu, backend=backend)
        out[backend] = (y, mean, invstd, rm, rv)
    # backward from the same (x, y): the ReLU mask is the reference's
    y, mean, invstd = out["reference"][:3]
    for backend in ("cpp", "reference"):
        grads = ops.batch_norm_act_backward(gy, x, y, w if affine else None, mean, invstd,
                                            relu, residual, backend=backend)
        out[backend] = out[backend] + tuple(grads)
    return out


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual, relu", [(False, True), (True, True), (False, False),
                                            (True, False)])
def test_cpp_equals_reference(dtype, residual, relu):
    for i, shape in enumerate(SHAPES):
        out = _both(shape, dtype, residual, relu, affine=i % 3 != 2, seed=i)
        c, e = out["cpp"], out["reference"]
        names = ("y", "mean", "invstd", "running_mean", "running_var", "grad_x",
                 "grad_residual", "grad_weight", "grad_bias")
        for name, a, b in zip(names, c, e):
            assert a.shape == b.shape and a.dtype == b.dtype, (shape, name)
            # statistics in float32 from the same data: tight for every dtype
            tol = 2e-6 if name in ("mean", "invstd", "running_mean", "running_var") \
                else TOL[dtype]
            assert rel(a, b) <= tol, (shape, name, rel(a, b))


@needs_cpp
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_non_contiguous_inputs(layout):
    out = _both((3, 8, 7, 7), torch.float32, True, True, True, layout=layout)
    for a, b in zip(out["cpp"], out["reference"]):
        assert rel(a, b) <= 2e-6


@needs_cpp
def test_same_bits_on_one_or_two_threads():
    """One thread owns a channel: the answer does not depend on the thread count."""
    x, r, gy, w, b = data((16, 32, 14, 14), torch.float32)
    before = torch.get_num_threads()
    res = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y, m, i = torch.ops.sparsefl_C.batch_norm_act(x, r, w, b, None, None, 0.1, 1e-5,
                                                          True)
            res.append((y, m, i, *torch.ops.sparsefl_C.batch_norm_act_backward(
                gy, x, y, w, m, i, True, True)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*res):
        assert torch.equal(a, b)


@needs_cpp
@pytest.mark.parametrize("env", ["SPARSEFL_DISABLE_AVX512", "SPARSEFL_DISABLE_AVX2"])
def test_narrower_isas(env):
    run_with_isa_off(env, "import torch, test_batch_norm_act as t\n"
                     "for d in t.DTYPES:\n"
                     "    t.test_cpp_equals_reference(d, True, True)\n"
                     "    t.test_cpp_equals_reference(d, False, False)\n"
                     "t.test_non_contiguous_inputs('strided')\nprint('ok')")


@needs_cpp
def test_large_channel_keeps_its_precision():
    """Sums spill from vector lanes into a double: a 1.2M-entry channel with a large
    offset still has the reference's statistics."""
    x = torch.randn(300, 1, 64, 64) * 1e-2 + 100.0
    y, mean, invstd = torch.ops.sparsefl_C.batch_norm_act(x, None, None, None, None, None,
                                                          0.1, 1e-5, False)
    var, m = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert abs(float(mean) - float(m)) < 1e-5
    assert abs(float(invstd) - float(torch.rsqrt(var + 1e-5))) / float(invstd) < 1e-4


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_bad_input_is_refused_clearly(backend):
    if backend == "cpp" and not _native.has_kernel("batch_norm_act", "cpu"):
        pytest.skip("the C++ kernels are not built")
    x = torch.randn(4, 3, 5, 5)

    def fwd(*args, **kw):
        return ops.batch_norm_act(*args, backend=backend, **kw)

    with pytest.raises(TypeError, match="not supported"):
        fwd(x.double())
    with pytest.raises(ValueError, match=r"\(N, C"):
        fwd(torch.randn(5))
    with pytest.raises(ValueError, match="residual"):
        fwd(x, torch.randn(4, 3, 5, 4))
    with pytest.raises(TypeError, match="residual"):
        fwd(x, x.half())
    with pytest.raises(ValueError, match="weight"):
        fwd(x, None, torch.ones(4))
    with pytest.raises(ValueError, match="bias"):
        fwd(x, None, None, torch.ones(2))
    with pytest.raises(ValueError, match="come together"):
        fwd(x, None, None, None, torch.zeros(3), None)
    with pytest.raises(ValueError, match="running stats"):
        fwd(x, None, None, None, torch.zeros(3), torch.ones(2))
    with pytest.raises(ValueError, match="more than 1 value"):
        fwd(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="more than 1 value"):
        fwd(torch.randn(0, 3, 4, 4))
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            fwd(x, eps=eps)
    y, m, i = fwd(x)
    bwd = ops.batch_norm_act_backward
    with pytest.raises(ValueError, match="grad_y"):
        bwd(x[:2], x, y, None, m, i, backend=backend)
    with pytest.raises(ValueError, match="mean and invstd"):
        bwd(x, x, y, None, m[:2], i, backend=backend)
    with pytest.raises(ValueError, match="mean and invstd"):
        bwd(x, x, y, None, m.double(), i, backend=backend)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_nan_propagates_as_in_torch(backend):
    """A NaN makes its channel's statistics NaN, as nn.BatchNorm does (the engine's
    non-finite checks see it); other channels are untouched; the ReLU keeps NaN."""
    if backend == "cpp" and not _native.has_kernel("batch_norm_act", "cpu"):
        pytest.skip("the C++ kernels are not built")
    x = torch.randn(4, 3, 5, 5)
    x[1, 1, 2, 2] = float("nan")
    y, m, i = ops.batch_norm_act(x, relu=True, backend=backend)
    want = F.relu(F.batch_norm(x, None, None, training=True))
    assert torch.equal(y.isnan(), want.isnan())
    assert y[:, 1].isnan().all() and not y[:, (0, 2)].isnan().any()
    assert rel(y.nan_to_num(), want.nan_to_num()) < 2e-6


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_opcheck(backend):
    if backend == "cpp" and not _native.has_kernel("batch_norm_act", "cpu"):
        pytest.skip("the C++ kernels are not built")
    x, r, gy, w, b = data((3, 4, 5, 5), torch.float32)
    rm, rv = torch.zeros(4), torch.ones(4)
    torch.library.opcheck(torch.ops.sparsefl.batch_norm_act.default,
                          (x, r, w, b, rm, rv, 0.1, 1e-5, True, backend))
    y, m, i = ops.batch_norm_act(x, r, w, b, relu=True, backend=backend)
    for residual_grad in (False, True):
        torch.library.opcheck(torch.ops.sparsefl.batch_norm_act_backward.default,
                              (gy, x, y, w, m, i, True, residual_grad, backend))
    torch.library.opcheck(torch.ops.sparsefl.batch_norm_act_backward.default,
                          (gy, x, y, None, m, i, False, False, backend))


# -- the model level ------------------------------------------------------------------------

def _step(model, x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@needs_cpp
def test_resnet_step_equals_the_eager_modules():
    """A ResNet-18 step through bn_act: the same loss, gradients to fp32 rounding, the
    same running statistics and batch counts as the eager BatchNorm/ReLU modules."""
    torch.manual_seed(0)
    base = ResNet18((1, 16, 16), 10, width=8)
    for mod in base.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.3, 0.3)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    res, models = [], []
    for on in (False, True):
        m = copy.deepcopy(base)
        assert bna.enable(m, on) == 20
        res.append(_step(m, x, y))
        models.append(m)
    assert abs(res[0][0] - res[1][0]) < 1e-5
    for name, g in res[0][1].items():
        assert rel(res[1][1][name], g) < 5e-5, name
    for (n, a), (_, b) in zip(models[0].named_buffers(), models[1].named_buffers()):
        assert rel(b, a) < 1e-5, n
    # eval: the eager modules (running statistics), the same output
    for m in models:
        m.eval()
    assert rel(models[1](x), models[0](x)) < 1e-4


@needs_cpp
def test_bn_act_falls_back_where_it_does_not_apply():
    bn = nn.BatchNorm2d(3)
    bna.enable(bn)
    x = torch.randn(4, 3, 5, 5)
    for case in ("eval", "double", "one_value", "momentum_none"):
        b = copy.deepcopy(bn)
        e = copy.deepcopy(bn)
        bna.enable(e, False)
        xi = x
        if case == "eval":
            b.eval()
            e.eval()
        elif case == "double":
            b.double()
            e.double()
            xi = x.double()
        elif case == "one_value":
            xi = x[:1, :, :1, :1]
        else:
            b.momentum = e.momentum = None
        if case == "one_value":
            with pytest.raises(ValueError, match="more than 1 value"):
                bna.bn_act(b, xi)
            continue
        for _ in range(3):
            got, want = bna.bn_act(b, xi), bna.bn_act(e, xi)
        assert rel(got, want) < 2e-6, case
        assert rel(b.running_var, e.running_var) < 1e-6, case
        assert int(b.num_batches_tracked) == int(e.num_batches_tracked), case


@needs_cpp
def test_set_compute_enables_it_for_sparse_compute_only():
    from conftest import pruned_resnet

    from sparsefl.nn import set_compute

    model = pruned_resnet(0.05)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    sample = torch.randn(4, 3, 16, 16)
    set_compute(model, "sparse", sample=sample, recompute=False)
    assert all(bna.enabled(b) for b in bns)
    set_compute(model, "dense")
    assert not any(bna.enabled(b) for b in bns)
    set_compute(model, "sparse", sample=sample, recompute=True)  # recipes: recompute.py
    assert all(bna.enabled(b) for b in bns)


@needs_cpp
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_layer_autograd_equals_eager(residual, relu, affine):
    """batch_norm_act_layer's C++ autograd: every input's gradient, whichever are given
    (the gradient slots shift with the optional tensors), equals autograd through the
    eager modules; a leaf that does not require grad gets none."""
    x, r, gy, w, b = data((6, 5, 7, 7), torch.float32)
    bn = nn.BatchNorm2d(5, affine=affine)
    if affine:
        bn.weight.data.copy_(w)
        bn.bias.data.copy_(b)
    fused = copy.deepcopy(bn)
    bna.enable(fused)
    grads = []
    for mod, fn in ((bn, bna.eager), (fused, bna.bn_act)):
        xs = x.clone().requires_grad_()
        rs = r.clone().requires_grad_() if residual else None
        out = fn(mod, xs, rs, relu)
        inputs = [xs] + ([rs] if residual else []) + ([mod.weight, mod.bias] if affine else [])
        grads.append(torch.autograd.grad(out, inputs, gy))
    for a, e in zip(grads[1], grads[0]):
        assert rel(a, e) < 2e-5
    if affine:  # the bias alone asked for
        fused.weight.requires_grad_(False)
        out = bna.bn_act(fused, x.clone(), r if residual else None, relu)
        (gb,) = torch.autograd.grad(out, [fused.bias], gy)
        assert rel(gb, grads[0][-1]) < 2e-5


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_mask_bits_equal_the_output_mask(dtype):
    """The layer keeps its ReLU's mask as bits (one 64-bit word row per (n, c)): its
    gradients equal batch_norm_act_backward's from the saved output, bit for bit, over
    row lengths with and without tails, zeros and NaN in the output."""
    for i, shape in enumerate(MASK_SHAPES):
        x, r, gy, w, b = data(shape, dtype, seed=i)
        x.view(-1)[:: 7] = 0.0  # exact zeros after BN are rare: force ties at the threshold
        x.view(-1)[5] = float("nan")
        for residual in (False, True):
            rr = r if residual else None
            y, m, inv = torch.ops.sparsefl_C.batch_norm_act(x, rr, w, b, None, None, 0.1,
                                                            1e-5, True)
            want = torch.ops.sparsefl_C.batch_norm_act_backward(gy, x, y, w, m, inv, True,
                                                                residual)
            xs = x.clone().requires_grad_()
            rs = r.clone().requires_grad_() if residual else None
            ws, bs = w.clone().requires_grad_(), b.clone().requires_grad_()
            out = torch.ops.sparsefl_C.batch_norm_act_layer(xs, rs, ws, bs, None, None, 0.1,
                                                            1e-5, True)
            assert torch.equal(out.isnan(), y.isnan())
            assert torch.equal(out.nan_to_num(), y.nan_to_num())
            got = torch.autograd.grad(out, [xs, ws, bs] + ([rs] if residual else []), gy)
            pairs = [(got[0], want[0]), (got[1], want[2]), (got[2], want[3])]
            if residual:
                pairs.append((got[3], want[1]))
            for a, e in pairs:
                assert torch.equal(a.isnan(), e.isnan()), (shape, residual)
                assert torch.equal(a.nan_to_num(), e.nan_to_num()), (shape, residual)


@needs_cpp
@pytest.mark.parametrize("env", ["SPARSEFL_DISABLE_AVX512", "SPARSEFL_DISABLE_AVX2"])
def test_layer_mask_bits_on_narrower_isas(env):
    run_with_isa_off(env, "import torch, test_batch_norm_act as t\n"
                     "for d in t.DTYPES:\n"
                     "    t.test_layer_mask_bits_equal_the_output_mask(d)\nprint('ok')")


@needs_cpp
def test_layer_saves_bits_not_its_output():
    """Saved for backward: x, the mask (1/32 of the output's fp32 bytes, one word row per
    (n, c)) and per-channel vectors; nothing else shaped like x."""
    x = torch.randn(4, 3, 28, 28, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.ops.sparsefl_C.batch_norm_act_layer(x, x.detach().clone(), None, None, None,
                                                  None, 0.1, 1e-5, True)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0] is x
    bits = [t for t in saved if t.dtype == torch.int64]
    assert len(bits) == 1 and bits[0].numel() == 4 * 3 * 13  # ceil(784 / 64) words a row
