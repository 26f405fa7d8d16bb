"""Every op on the GPU faces (CUDA kernels, Triton compiled for the GPU) against the plain
torch reference on the same inputs.  Bitwise where the design promises it (SAM: float64
norms, no FMA contraction; top-k: an exact selection; aggregation: float64 in client
order with round-to-nearest intrinsics; tile_indices: integers); bad input raises.  These
cases run where torch sees a GPU (scripts/gpu-check.sh) and are skipped elsewhere, with
the reason."""

from __future__ import annotations

import pytest
import torch
from conftest import gpu_backends

from sparsefl import fl, ops
from sparsefl.ops.reference import topk as topk_reference

BACKENDS = gpu_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cuda(*xs):
    return [x.cuda() for x in xs]


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(128, 64, 3, 3), (64,), (512, 257), (1000,), (0,), (3, 1)]
    ws = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    gs = [(torch.randn(s, generator=g) * 1e-3).to(dtype) for s in shapes]
    return ws, gs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_perturb_is_the_reference(backend, dtype, adaptive):
    ws, gs = _params(dtype)
    want = [torch.empty_like(w) for w in ws]
    nw = ops.sam_perturb(ws, gs, want, rho=0.05, adaptive=adaptive, eta=0.01,
                         backend="reference")
    wd, gd = _cuda(*ws), _cuda(*gs)
    got = [torch.empty_like(w) for w in wd]
    backup = [torch.empty_like(w) for w in wd]
    ng = ops.sam_perturb(wd, gd, got, rho=0.05, adaptive=adaptive, eta=0.01, backend=backend)
    ops.sam_perturb_(wd, gd, backup, rho=0.05, adaptive=adaptive, eta=0.01, backend=backend)
    torch.testing.assert_close(ng.cpu(), nw, rtol=1e-6, atol=0)  # float64 sums, any order
    for g, w, b, orig in zip(got, want, backup, ws):
        if dtype == torch.float32:
            assert torch.equal(g.cpu(), w)  # the design's promise: bit for bit
        else:  # float32 math, then one rounding to the dtype (a compiler's own rounding)
            torch.testing.assert_close(g.cpu(), w)
        assert torch.equal(b.cpu(), orig)  # exact backup
    ops.sam_restore_(wd, backup, backend=backend)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(wd, ws))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_refuses_mismatched_arguments(backend):
    ws, gs = _params(torch.float32)
    wd, gd = _cuda(*ws), _cuda(*gs)
    bad_dtype = [torch.empty_like(w, dtype=torch.bfloat16) for w in wd]
    with pytest.raises((TypeError, ValueError)):
        ops.sam_perturb(wd, gd, bad_dtype, backend=backend)
    with pytest.raises(ValueError):
        ops.sam_perturb(wd, gd[:-1], [torch.empty_like(w) for w in wd], backend=backend)
    with pytest.raises((TypeError, ValueError)):
        ops.sam_perturb(wd, [g[..., :1] for g in gd], [torch.empty_like(w) for w in wd],
                        backend=backend)
    with pytest.raises((TypeError, ValueError)):
        ops.sam_perturb(wd, [g.cpu() for g in gd], [torch.empty_like(w) for w in wd],
                        backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.01, 0.05, 0.5, 1.0])
def test_topk_mask_and_compress_are_exact(backend, dtype, density):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(300_001, generator=g).to(dtype),
          torch.randint(-3, 4, (4097,), generator=g).to(dtype)]  # ties
    n = sum(x.numel() for x in xs)
    k = ops.keep_count(n, density)
    want = topk_reference.topk_mask(xs, k)
    got = ops.topk_mask(_cuda(*xs), density, backend=backend)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)
    res = [torch.randn(x.shape, generator=g).to(dtype) for x in xs]
    res_ref = [r.clone() for r in res]
    res_gpu = _cuda(*res)
    i_want, v_want = ops.topk_compress(xs, density, residual=res_ref, backend="reference")
    i_got, v_got = ops.topk_compress(_cuda(*xs), density, residual=res_gpu, backend=backend)
    assert torch.equal(i_got.cpu(), i_want) and torch.equal(v_got.cpu(), v_want)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(res_gpu, res_ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_refuses_nan(backend):
    x = torch.randn(1000, device="cuda")
    x[17] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ops.topk_mask(x, 0.1, backend=backend)
    r = torch.zeros_like(x)
    with pytest.raises(ValueError, match="NaN"):
        ops.topk_compress(x, 0.1, residual=r, backend=backend)
    assert not bool(r.any())  # the residual is untouched


def _payloads(C, numel, density, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = int(numel * density)
    return [(torch.sort(torch.randperm(numel, generator=g)[:k]).values,
             torch.randn(k, generator=g).to(dtype)) for _ in range(C)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C,numel,density", [(1, 10, 0.5), (10, 100_003, 0.05),
                                             (37, 50_000, 0.2), (3, 7, 0.0)])
def test_aggregate_every_form_is_the_reference(backend, dtype, C, numel, density):
    pays = _payloads(C, numel, density, 2, dtype)
    weights = torch.rand(C, generator=torch.Generator().manual_seed(3)).tolist()
    base = torch.randn(numel)
    want = ops.sparse_aggregate(pays, weights, base=base, lr=0.7, backend="reference")
    gpays = [(i.cuda(), v.cuda()) for i, v in pays]
    got = ops.sparse_aggregate(gpays, weights, base=base.cuda(), lr=0.7, backend=backend)
    tiled = [ops.tile_payload(i, v, numel, backend=backend) for i, v in gpays]
    got_tiled = ops.sparse_aggregate(tiled, weights, base=base.cuda(), lr=0.7, backend=backend)
    # CUDA: _rn intrinsics, bitwise; Triton on a GPU may contract to FMA (1e-16 in float64)
    exact = backend == "cuda"
    for g in (got, got_tiled):
        if exact:
            assert torch.equal(g.cpu(), want)
        else:
            torch.testing.assert_close(g.cpu(), want, rtol=1e-7, atol=1e-7)
    acc_want = ops.SparseAccumulator(numel, group=4, backend="reference")
    acc_got = ops.SparseAccumulator(numel, group=4, device="cuda", backend=backend)
    for p, gp, w in zip(pays, tiled, weights):
        acc_want.add(p, w)
        acc_got.add(gp, w)
    torch.testing.assert_close(acc_got.result(2.0).cpu(), acc_want.result(2.0),
                               rtol=0 if exact else 1e-7, atol=0 if exact else 1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tile_indices_are_the_reference(backend):
    pieces = [torch.tensor([0, 5, 4095]), torch.tensor([1, 2, 9000])]
    starts = [0, 4096]
    want = ops.tile_payload(pieces, [torch.ones(3), torch.ones(3)], 20_000, starts=starts,
                            backend="reference")
    got = ops.tile_payload([p.cuda() for p in pieces],
                           [torch.ones(3, device="cuda"), torch.ones(3, device="cuda")],
                           20_000, starts=starts, backend=backend)
    assert torch.equal(got.offsets.cpu(), want.offsets)
    assert torch.equal(got.local.cpu(), want.local)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aggregate_refuses_bad_payloads(backend):
    out = torch.zeros(100, device="cuda")
    cases = [(torch.tensor([3, 2], device="cuda"), torch.ones(2, device="cuda")),  # order
             (torch.tensor([5, 100], device="cuda"), torch.ones(2, device="cuda")),  # range
             (torch.tensor([1, 2], device="cuda"),
              torch.tensor([1.0, float("nan")], device="cuda"))]  # NaN
    for pair in cases:
        with pytest.raises(ValueError):
            ops.sparse_aggregate([pair], [1.0], out=out, backend=backend)
    assert not bool(out.any())  # nothing written before the check
    many = [(torch.tensor([c % 100], device="cuda"), torch.ones(1, device="cuda"))
            for c in range(70_000)]  # more clients than CUDA's gridDim.y
    got = ops.sparse_aggregate(many, [1.0] * len(many), numel=100, backend=backend)
    assert torch.equal(got.cpu(), torch.full((100,), 700.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_on_the_gpu(backend):
    x = [torch.randn(64, device="cuda")]
    torch.library.opcheck(torch.ops.sparsefl.topk_mask.default, (x, 7, backend))
    pays = _payloads(3, 1000, 0.1, 4)
    out = torch.zeros(1000, device="cuda")
    torch.library.opcheck(torch.ops.sparsefl.sparse_aggregate.default,
                          ([i.cuda() for i, _ in pays], [v.cuda() for _, v in pays],
                           [0.5, 0.25, 1.0], out, None, 1.0, backend))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the engine's "
                    "run.device=cuda is checked where a GPU exists")
def test_a_round_on_the_gpu_ends_where_the_cpu_round_ends():
    base = ["run.rounds=2", "data.clients=6", "server.clients_per_round=3", "client.epochs=1",
            "client.optimizer=sam", "sparsity.method=sparsyfed", "sparsity.sparsity=0.9",
            "sparsity.scope=global", "model.hidden=[32, 32]"]  # global: split on the device
    cpu = fl.run(fl.load(None, [*base, "run.device=cpu"]), progress=False)
    gpu = fl.run(fl.load(None, [*base, "run.device=cuda"]), progress=False)
    a, b = gpu.global_flat.cpu(), cpu.global_flat
    assert float((a - b).norm() / b.norm()) < 1e-3  # cuBLAS/cuDNN sum in other orders
    assert [r["clients"] for r in gpu.rounds] == [r["clients"] for r in cpu.rounds]
