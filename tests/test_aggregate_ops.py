"""sparsefl.ops.sparse_aggregate: every backend against the float64 reference."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import cpu_backends

from sparsefl import ops
from sparsefl.codec import SparseChunk

BACKENDS = cpu_backends()


def payloads(C: int, numel: int, density: float, seed: int, dtype=torch.float32,
             idx_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    k = int(numel * density)
    out = []
    for _ in range(C):
        idx = torch.sort(torch.randperm(numel, generator=g)[:k]).values.to(idx_dtype)
        out.append((idx, torch.randn(k, generator=g).to(dtype)))
    return out


def float64_reference(pays, weights, numel, base=None, lr=1.0):
    acc = torch.zeros(numel, dtype=torch.float64)
    for (idx, val), w in zip(pays, weights):
        if idx.numel() == 0 and val.numel() == numel:
            acc += w * val.double()
        else:
            acc.index_add_(0, idx.long(), w * val.double())
    start = base.double() if base is not None else torch.zeros_like(acc)
    return start + lr * acc


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C,numel,density", [(1, 10, 0.5), (10, 100_003, 0.05),
                                             (37, 50_000, 0.2), (5, 9000, 1.0), (3, 7, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=str)
def test_matches_float64_reference(backend, C, numel, density, dtype, idx_dtype):
    pays = payloads(C, numel, density, 1, dtype, idx_dtype)
    weights = torch.rand(C, generator=torch.Generator().manual_seed(2)).tolist()
    base = torch.randn(numel)
    got = ops.sparse_aggregate(pays, weights, base=base, lr=0.7, backend=backend)
    want = float64_reference(pays, weights, numel, base, 0.7)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    assert got.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_reproducible_across_runs_and_threads(backend):
    pays = payloads(20, 200_000, 0.05, 3)
    weights = [1 / 20] * 20
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3, 2):
            torch.set_num_threads(t)
            results.append(ops.sparse_aggregate(pays, weights, numel=200_000, backend=backend))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)


def test_backends_agree_bitwise():
    pays = payloads(15, 70_001, 0.1, 4)
    weights = torch.rand(15, generator=torch.Generator().manual_seed(5)).tolist()
    base = torch.randn(70_001)
    outs = [ops.sparse_aggregate(pays, weights, base=base, lr=0.5, backend=b.values[0])
            for b in BACKENDS]
    assert all(torch.equal(o, outs[0]) for o in outs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_payloads_and_chunks(backend):
    numel = 5000
    g = torch.Generator().manual_seed(6)
    dense = (torch.empty(0, dtype=torch.long), torch.randn(numel, generator=g))
    sparse = payloads(2, numel, 0.1, 7)
    chunks = [SparseChunk(numel, i, v) for i, v in [dense, *sparse]]
    got = ops.sparse_aggregate(chunks, [0.2, 0.3, 0.5], backend=backend)
    want = float64_reference([dense, *sparse], [0.2, 0.3, 0.5], numel)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_place", [False, True])
def test_bad_payloads_raise_and_in_place_base_survives(backend, in_place):
    numel = 50_000
    good = payloads(3, numel, 0.05, 8)
    cases = {
        "unsorted": (good[0][0].flip(0), good[0][1]),
        "out of range": (torch.cat([good[0][0][:-1], torch.tensor([numel])]), good[0][1]),
        "negative": (torch.cat([torch.tensor([-1]), good[0][0][1:]]), good[0][1]),
        "duplicate": (torch.cat([good[0][0][:1], good[0][0][:-1]]), good[0][1]),
        "nan": (good[0][0], torch.where(torch.arange(good[0][1].numel()) == 7,
                                        float("nan"), good[0][1])),
    }
    for name, bad in cases.items():
        base = torch.randn(numel)
        keep = base.clone()
        out = base if in_place else torch.empty(numel)
        with pytest.raises(ValueError, match="aggregate"):
            ops.sparse_aggregate([good[1], bad, good[2]], [1.0, 1.0, 1.0], out=out, base=base,
                                 backend=backend)
        assert torch.equal(base, keep), name
    with pytest.raises(ValueError, match="weights"):
        ops.sparse_aggregate(good, [1.0], numel=numel, backend=backend)
    with pytest.raises(ValueError, match="not finite"):
        ops.sparse_aggregate(good, [1.0, float("inf"), 1.0], numel=numel, backend=backend)
    with pytest.raises(ValueError, match="indices and"):
        ops.sparse_aggregate([(good[0][0], good[0][1][:-1])], [1.0], numel=numel,
                             backend=backend)
    with pytest.raises(TypeError, match="pair"):
        ops.sparse_aggregate([42], [1.0], numel=numel, backend=backend)
    with pytest.raises(ValueError, match="size"):
        ops.sparse_aggregate(good, [1.0] * 3, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    pays = payloads(4, 1000, 0.1, 9)
    idx, val = [p[0] for p in pays], [p[1] for p in pays]
    torch.library.opcheck(torch.ops.sparsefl.sparse_aggregate.default,
                          (idx, val, [0.25] * 4, torch.empty(1000), torch.randn(1000), 1.0,
                           backend))


def test_peak_memory_does_not_grow_with_clients():
    """Peak RSS during aggregation of 100 clients x 5% stays within 2x (model + payload).

    The payloads are the caller's (they arrived over the wire); what is measured is what
    aggregation itself adds on top of them: the kernel keeps one tile per thread.
    """
    code = textwrap.dedent("""
        import resource, torch
        import sparsefl
        from sparsefl import ops
        torch.set_num_threads(2)
        n, C, k = 2_000_000, 100, 100_000
        g = torch.Generator().manual_seed(0)
        pays = [(torch.sort(torch.randperm(n, generator=g)[:k]).values.int(),
                 torch.randn(k, generator=g)) for _ in range(C)]
        base = torch.randn(n)
        out = torch.empty(n)
        ops.sparse_aggregate(pays[:2], [0.5, 0.5], out=out, base=base)  # warm up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ops.sparse_aggregate(pays, [1 / C] * C, out=out, base=base)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
        model, payload = 4 * n, 8 * k
        print(grown, model, payload)
        assert grown <= 2 * (model + payload), (grown, model, payload)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---- accumulate mode (float64 out) and the streaming SparseAccumulator ----

@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_out_accumulates_in_client_order(backend):
    numel = 5000
    pays = payloads(7, numel, 0.1, seed=11)
    pays.append((torch.empty(0, dtype=torch.int64), torch.randn(numel)))  # a dense client
    w = [0.5, 1.0, 2.0, 0.25, 3.0, 1.5, 0.75, 0.1]
    start = torch.randn(numel, dtype=torch.float64)
    acc = start.clone()
    ops.sparse_aggregate(pays, w, out=acc, backend=backend)
    want = start.clone()
    for (idx, val), ww in zip(pays, w):  # same float64 additions, same order
        if idx.numel() == 0:
            want += ww * val.double()
        else:
            want.index_add_(0, idx, ww * val.double())
    assert torch.equal(acc, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_out_refuses_base_and_lr(backend):
    acc = torch.zeros(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="accumulates"):
        ops.sparse_aggregate([], [], out=acc, base=torch.zeros(10), backend=backend)
    with pytest.raises(ValueError, match="accumulates"):
        ops.sparse_aggregate([], [], out=acc, lr=0.5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_payload_leaves_the_running_sum_untouched(backend):
    numel = 3000
    good = payloads(3, numel, 0.2, seed=5)
    bad = (torch.tensor([5, 3, 9]), torch.ones(3))  # not ascending
    acc = torch.randn(numel, dtype=torch.float64)
    before = acc.clone()
    with pytest.raises(ValueError, match="payload 3 indices"):
        ops.sparse_aggregate([*good, bad], [1.0] * 4, out=acc, backend=backend)
    assert torch.equal(acc, before)


@pytest.mark.parametrize("group", [1, 3, 16, 1000])
@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_accumulator_is_bitwise_one_aggregate(backend, group):
    numel, C = 20_000, 23
    pays = payloads(C, numel, 0.05, seed=2, idx_dtype=torch.int32)
    n = [float(10 + 3 * c) for c in range(C)]
    total = sum(n)
    base = torch.randn(numel)
    stream = ops.SparseAccumulator(numel, group=group, backend=backend)
    for p, w in zip(pays, n):
        stream.add(p, w)
    assert stream.count == C
    stream.flush()  # the last partial group
    # one call over everything, float64 out, same weights and order
    whole = torch.zeros(numel, dtype=torch.float64)
    ops.sparse_aggregate(pays, n, out=whole, backend=backend)
    assert torch.equal(stream.sum, whole)
    mean = stream.result(divisor=total)
    assert mean.dtype == torch.float32
    assert torch.equal(mean, (whole / total).float())
    upd = stream.result(divisor=total, base=base, lr=0.5)
    assert torch.equal(upd, (base.double() + 0.5 * (whole / total)).float())
    ref = float64_reference(pays, [x / total for x in n], numel)
    torch.testing.assert_close(mean.double(), ref, rtol=1e-6, atol=1e-9)


def test_streaming_accumulator_bad_input():
    with pytest.raises(ValueError, match="group"):
        ops.SparseAccumulator(10, group=0)
    acc = ops.SparseAccumulator(10)
    with pytest.raises(ValueError, match="divisor"):
        acc.result(divisor=0.0)


def test_opcheck_accumulate_mode():
    idx = torch.tensor([1, 4, 7])
    val = torch.randn(3)
    torch.library.opcheck(torch.ops.sparsefl.sparse_aggregate.default,
                          ([idx], [val], [0.5], torch.zeros(10, dtype=torch.float64), None,
                           1.0, "auto"))


@pytest.fixture
def portable(monkeypatch):
    """Runs a call on the portable C++ merge loop instead of the AVX2 one."""
    def call(*args, **kwargs):
        with monkeypatch.context() as m:
            m.setenv("SPARSEFL_DISABLE_AVX2", "1")
            return ops.sparse_aggregate(*args, **kwargs)
    return call


@pytest.mark.parametrize("numel,density", [(4096 * 3 + 5, 0.3), (100_003, 0.05), (9000, 1.0),
                                           (4096, 0.9), (50_000, 0.002)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=str)
def test_avx2_and_portable_merge_give_the_same_bits(portable, numel, density, dtype, idx_dtype):
    pays = payloads(7, numel, density, 10, dtype, idx_dtype)
    # runs that start and end exactly on tile edges
    edges = torch.tensor([0, 4095, 4096, 8191, 8192, numel - 1], dtype=idx_dtype)
    edges = torch.unique(edges[edges < numel])
    pays.append((edges, torch.randn(edges.numel()).to(dtype)))
    weights = torch.rand(len(pays), generator=torch.Generator().manual_seed(11)).tolist()
    base = torch.randn(numel)
    for kwargs in ({"base": base, "lr": 0.7}, {"numel": numel}):
        fast = ops.sparse_aggregate(pays, weights, backend="cpp", **kwargs)
        slow = portable(pays, weights, backend="cpp", **kwargs)
        assert torch.equal(fast, slow)
    acc_fast = torch.randn(numel, dtype=torch.float64)
    acc_slow = acc_fast.clone()
    ops.sparse_aggregate(pays, weights, out=acc_fast, backend="cpp")
    portable(pays, weights, out=acc_slow, backend="cpp")
    assert torch.equal(acc_fast, acc_slow)


@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("pos", [0, 1, 7, 8, 9, 15, 16, 200, 511, 512, 513, 2399])
def test_avx2_merge_catches_a_bad_index_in_any_lane(portable, idx_dtype, pos):
    """The vector scan checks 8 (int32) or 4 (int64) indices per compare: a bad index in
    any lane, and across block edges, must be caught by both loops, never written."""
    numel = 20_000
    idx = torch.arange(0, numel, 8, dtype=idx_dtype)[:2400]  # 512 per 4096-element tile
    val = torch.ones(idx.numel())
    for bad_value in (int(idx[pos - 1]) if pos else -1,  # duplicate of its left neighbour
                      int(idx[pos - 1]) - 1 if pos else -5,  # below its left neighbour
                      numel, 2**31 - 1):                  # out of range
        bad = idx.clone()
        bad[pos] = bad_value
        for call in (ops.sparse_aggregate, portable):
            base = torch.randn(numel)
            keep = base.clone()
            with pytest.raises(ValueError, match="aggregate"):
                call([(idx, val), (bad, val)], [1.0, 1.0], out=base, base=base, backend="cpp")
            assert torch.equal(base, keep)
