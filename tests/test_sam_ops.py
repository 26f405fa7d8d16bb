"""sparsefl.ops SAM family: every backend against the plain-torch reference."""

from __future__ import annotations

import math
import types

import pytest
import torch
from conftest import cpu_backends

from sparsefl import ops
from sparsefl.ops import sam as sam_module
from sparsefl.ops.reference import sam as reference

BACKENDS = cpu_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [
    [(7,)],
    [(3, 5), (1,), (64,)],
    [(33000,), (4, 3, 3, 3), (2,)],  # crosses the C++ block size
    [(0,), (5, 2), (0, 3)],  # empty tensors among others
    [],  # nothing at all
]


def make(shapes, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * scale).to(dtype) for s in shapes]


def expected(params, grads, rho, adaptive, eta, eps, grads2=None, rho2=0.0):
    out = [torch.empty_like(p) for p in params]
    n = len(params)
    norms = reference.perturb(params, grads, grads2 or [], out, [], [rho] * n, rho2,
                              [adaptive] * n, eta, eps)
    return out, norms


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: f"{len(s)}t")
@pytest.mark.parametrize("adaptive,eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_sam_perturb_matches_reference(backend, dtype, shapes, adaptive, eta):
    params, grads = make(shapes, dtype, 1), make(shapes, dtype, 2)
    before = [p.clone() for p in params]
    want, want_norm = expected(params, grads, 0.05, adaptive, eta, 1e-12)
    out = [torch.full_like(p, float("nan")) for p in params]
    norm = ops.sam_perturb(params, grads, out, 0.05, adaptive=adaptive, eta=eta, backend=backend)
    assert norm.shape == () and norm.dtype == torch.float32
    torch.testing.assert_close(norm, want_norm[0], rtol=1e-5, atol=0)
    for o, w in zip(out, want):
        torch.testing.assert_close(o, w)
    for p, b in zip(params, before):  # out-of-place: params untouched
        assert torch.equal(p, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_perturb_and_restore_are_bit_exact(backend, dtype):
    shapes = [(33000,), (17, 3), (1,)]
    params, grads = make(shapes, dtype, 3), make(shapes, dtype, 4)
    original = [p.clone() for p in params]
    want, _ = expected(params, grads, 0.1, True, 0.0, 1e-12)
    backup = [torch.empty_like(p) for p in params]
    ops.sam_perturb_(params, grads, backup, 0.1, adaptive=True, backend=backend)
    for p, w, b, o in zip(params, want, backup, original):
        torch.testing.assert_close(p, w)
        assert torch.equal(b, o)
    ops.sam_restore_(params, backup, backend=backend)
    for p, o in zip(params, original):
        assert torch.equal(p, o), "restore must be bit-exact"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_direction_matches_reference(backend, dtype):
    shapes = [(40, 3), (5,), (33000,)]
    params, g1, g2 = make(shapes, dtype, 5), make(shapes, dtype, 6), make(shapes, dtype, 7)
    want, want_norms = expected(params, g1, 0.05, False, 0.0, 1e-12, grads2=g2, rho2=0.02)
    out = [torch.empty_like(p) for p in params]
    norms = ops.two_dir_perturb(params, g1, g2, out, 0.05, 0.02, backend=backend)
    torch.testing.assert_close(norms, want_norms, rtol=1e-5, atol=0)
    for o, w in zip(out, want):
        torch.testing.assert_close(o, w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_gives_no_perturbation_and_no_nan(backend, adaptive):
    params = make([(10, 3), (4,)], torch.float32, 8)
    grads = [torch.zeros_like(p) for p in params]
    out = [torch.empty_like(p) for p in params]
    norm = ops.sam_perturb(params, grads, out, 0.05, adaptive=adaptive, backend=backend)
    assert float(norm) == 0.0
    for o, p in zip(out, params):
        assert torch.equal(o, p)
    norms = ops.two_dir_perturb(params, grads, grads, out, 0.05, 0.05, backend=backend)
    assert norms.tolist() == [0.0, 0.0]
    for o, p in zip(out, params):
        assert torch.equal(o, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_perturbation_has_length_rho(backend):
    params = make([(100,), (7, 7)], torch.float32, 9)
    grads = make([(100,), (7, 7)], torch.float32, 10)
    out = [torch.empty_like(p) for p in params]
    ops.sam_perturb(params, grads, out, 0.3, backend=backend)
    step = math.sqrt(sum(float(((o - p).double() ** 2).sum()) for o, p in zip(out, params)))
    assert step == pytest.approx(0.3, rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_tensors(backend):
    base = make([(8, 6), (5, 4)], torch.float32, 11)
    params = [base[0].t(), base[1][:, ::2]]  # transposed and strided views
    grads = [t.t() for t in make([(8, 6)], torch.float32, 12)] + [
        make([(5, 4)], torch.float32, 13)[0][:, 1::2]]
    assert not any(t.is_contiguous() for t in params + grads)
    want, _ = expected([p.contiguous() for p in params], [g.contiguous() for g in grads], 0.05,
                       True, 0.0, 1e-12)
    out = [torch.empty(p.shape[::-1]).t() for p in params]
    ops.sam_perturb(params, grads, out, 0.05, adaptive=True, backend=backend)
    for o, w in zip(out, want):
        torch.testing.assert_close(o, w)
    # in place on a non-contiguous view writes through to the base tensor
    backup = [torch.empty_like(p) for p in params]
    original = [p.clone() for p in params]
    ops.sam_perturb_(params, grads, backup, 0.05, adaptive=True, backend=backend)
    torch.testing.assert_close(base[0].t(), want[0])
    ops.sam_restore_(params, backup, backend=backend)
    assert all(torch.equal(p, o) for p, o in zip(params, original))


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_tensor_rho_and_adaptive_flags(backend):
    shapes = [(20,), (3, 3), (6,)]
    params, grads = make(shapes, torch.float32, 14), make(shapes, torch.float32, 15)
    rho, flags = [0.1, 0.2, 0.05], [True, False, True]
    want = [torch.empty_like(p) for p in params]
    reference.perturb(params, grads, [], want, [], rho, 0.0, flags, 0.01, 1e-16)
    out = [torch.empty_like(p) for p in params]
    ops.sam_perturb(params, grads, out, rho, adaptive=flags, eta=0.01, eps=1e-16, backend=backend)
    for o, w in zip(out, want):
        torch.testing.assert_close(o, w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_leaves_weights_and_reports_norm(backend, bad):
    params = make([(10,), (3, 3)], torch.float32, 16)
    grads = make([(10,), (3, 3)], torch.float32, 17)
    grads[1][1, 1] = bad
    out = [torch.zeros_like(p) for p in params]
    norm = ops.sam_perturb(params, grads, out, 0.05, backend=backend)
    assert not torch.isfinite(norm)
    assert all(torch.equal(o, p) for o, p in zip(out, params))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_clear_errors(backend):
    p = [torch.randn(4, 3)]
    with pytest.raises(ValueError, match="shape"):
        ops.sam_perturb(p, [torch.randn(3, 4)], [torch.empty(4, 3)], backend=backend)
    with pytest.raises(ValueError, match="has 2 tensors"):
        ops.sam_perturb(p, [torch.randn(4, 3)] * 2, [torch.empty(4, 3)], backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        ops.sam_perturb(p, [torch.randn(4, 3).double()], [torch.empty(4, 3)], backend=backend)
    with pytest.raises(TypeError, match="supported"):
        ops.sam_perturb([torch.ones(3, dtype=torch.int32)], [torch.ones(3, dtype=torch.int32)],
                        [torch.ones(3, dtype=torch.int32)], backend=backend)
    with pytest.raises(ValueError, match="rho"):
        ops.sam_perturb(p, [torch.randn(4, 3)], [torch.empty(4, 3)], -1.0, backend=backend)
    with pytest.raises(ValueError, match="rho"):
        ops.sam_perturb(p, [torch.randn(4, 3)], [torch.empty(4, 3)], float("nan"),
                        backend=backend)
    with pytest.raises(ValueError, match="eps"):
        ops.sam_perturb(p, [torch.randn(4, 3)], [torch.empty(4, 3)], eps=0.0, backend=backend)
    with pytest.raises(ValueError, match="adaptive has 2"):
        ops.sam_perturb(p, [torch.randn(4, 3)], [torch.empty(4, 3)], adaptive=[True, False],
                        backend=backend)
    with pytest.raises(TypeError, match="Tensor"):
        ops.sam_restore_(p, [None], backend=backend)


def test_unknown_or_unavailable_backend_is_an_error(monkeypatch):
    p, g, o = [torch.randn(3)], [torch.randn(3)], [torch.empty(3)]
    with pytest.raises(ValueError, match="unknown backend"):
        ops.sam_perturb(p, g, o, backend="fast")
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        ops.sam_perturb(p, g, o, backend="cuda")
    monkeypatch.setenv("SPARSEFL_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ops.sam_perturb(p, g, o)


def test_environment_variable_selects_backend(monkeypatch):
    calls = []
    spy = types.SimpleNamespace(perturb=lambda *a: calls.append(1) or reference.perturb(*a),
                                copy_=reference.copy_)
    monkeypatch.setitem(sam_module._IMPLS, "reference", spy)
    p, g, o = [torch.randn(3)], [torch.randn(3)], [torch.empty(3)]
    monkeypatch.setenv("SPARSEFL_BACKEND", "reference")
    ops.sam_perturb(p, g, o)
    assert calls == [1]
    ops.sam_perturb(p, g, o, backend="reference")
    assert calls == [1, 1]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id == "cpp"])
def test_cpp_result_does_not_depend_on_thread_count(backend):
    shapes = [(300_000,), (1000, 70), (5,)]
    params, grads = make(shapes, torch.float32, 18), make(shapes, torch.float32, 19)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            out = [torch.empty_like(p) for p in params]
            norm = ops.sam_perturb(params, grads, out, 0.05, adaptive=True, backend=backend)
            results.append((norm, out))
    finally:
        torch.set_num_threads(threads)
    for norm, out in results[1:]:
        assert torch.equal(norm, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(out, results[0][1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    params, grads = make([(6, 4), (3,)], torch.float32, 20), make([(6, 4), (3,)], torch.float32, 21)
    g2 = make([(6, 4), (3,)], torch.float32, 22)
    out = [torch.empty_like(p) for p in params]
    backup = [torch.empty_like(p) for p in params]
    n = len(params)
    torch.library.opcheck(torch.ops.sparsefl.sam_perturb.default,
                          (params, grads, out, [0.05] * n, [True, False], 0.01, 1e-12, backend))
    torch.library.opcheck(torch.ops.sparsefl.sam_perturb_.default,
                          (params, grads, backup, [0.05] * n, [True] * n, 0.0, 1e-12, backend))
    torch.library.opcheck(torch.ops.sparsefl.sam_restore_.default, (params, backup, backend))
    torch.library.opcheck(torch.ops.sparsefl.two_dir_perturb.default,
                          (params, grads, g2, out, 0.05, 0.1, 1e-12, backend))


def test_ops_work_under_torch_compile():
    params, grads = make([(6, 4), (3,)], torch.float32, 23), make([(6, 4), (3,)], torch.float32, 24)

    def step(ps, gs):
        out = [torch.empty_like(p) for p in ps]
        norm = ops.sam_perturb(ps, gs, out, 0.05, adaptive=True)
        return norm, out

    want_norm, want = step(params, grads)
    norm, out = torch.compile(step, backend="aot_eager", fullgraph=True)(params, grads)
    torch.testing.assert_close(norm, want_norm)
    for o, w in zip(out, want):
        assert torch.equal(o, w)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b.id != "reference"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturbation_is_bitwise_the_reference(adaptive, backend):
    # fp32: the C++ and Triton norms are float64 sums like the reference's (only the order
    # differs) and the scale is rounded to float once from double rho, so every perturbed
    # weight matches bit for bit -- engine and eager SAM runs then stay identical through
    # exact top-k.  (Triton on a GPU: launched without FMA contraction, for the same bits.)
    g = torch.Generator().manual_seed(3)
    shapes = [(128, 64, 3, 3), (64,), (512, 256), (1000,)]
    for _ in range(16):  # a float32 rho changed the scale in about one draw in four
        ws = [torch.randn(s, generator=g) for s in shapes]
        gs = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
        a = [torch.empty_like(w) for w in ws]
        b = [torch.empty_like(w) for w in ws]
        na = ops.sam_perturb(ws, gs, a, rho=0.05, adaptive=adaptive, backend=backend)
        nb = ops.sam_perturb(ws, gs, b, rho=0.05, adaptive=adaptive, backend="reference")
        assert torch.equal(na, nb)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
