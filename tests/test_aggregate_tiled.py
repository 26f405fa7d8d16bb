"""Tiled payloads (sparsefl/ops/tiled.py) through sparse_aggregate: the same bits as their
flat pairs on every backend, and every malformed tile structure refused."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_backends
from test_aggregate_ops import float64_reference, payloads

from sparsefl import ops
from sparsefl.ops.tiled import TILE, num_tiles, untile

BACKENDS = cpu_backends()


def tiled(pays, numel):
    return [ops.tile_payload(i, v, numel) for i, v in pays]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C,numel,density", [(1, 10, 0.5), (10, 100_003, 0.05),
                                             (37, 50_000, 0.2), (5, 9000, 1.0), (3, 7, 0.0),
                                             (4, TILE * 3, 0.3), (2, 0, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_tiled_equals_flat_bitwise_and_matches_reference(backend, C, numel, density, dtype):
    pays = payloads(C, numel, density, 1, dtype, torch.int32)
    weights = torch.rand(C, generator=torch.Generator().manual_seed(2)).tolist()
    base = torch.randn(numel)
    flat = ops.sparse_aggregate(pays, weights, base=base, lr=0.7, backend=backend)
    got = ops.sparse_aggregate(tiled(pays, numel), weights, base=base, lr=0.7,
                               backend=backend)
    assert torch.equal(got, flat)
    want = float64_reference(pays, weights, numel, base, 0.7)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


def test_tile_payload_round_trips_and_cuts_at_tile_edges():
    numel = TILE * 3 + 17
    idx = torch.tensor([0, 1, TILE - 1, TILE, 2 * TILE + 5, 3 * TILE, numel - 1])
    p = ops.tile_payload(idx, torch.arange(7.0), numel)
    assert p.offsets.dtype == torch.int32 and p.local.dtype == torch.int16
    assert p.offsets.tolist() == [0, 3, 4, 5, 7]
    assert p.local.tolist() == [0, 1, TILE - 1, 0, 5, 0, 16]
    back, val = untile(p)
    assert torch.equal(back, idx) and torch.equal(val, torch.arange(7.0))
    assert num_tiles(0) == 0 and num_tiles(1) == 1 and num_tiles(TILE) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_tiled_flat_dense_and_streaming(backend):
    numel = 30_000
    pays = payloads(6, numel, 0.1, 3)
    pays.append((torch.empty(0, dtype=torch.int64), torch.randn(numel)))  # dense
    w = [0.5, 1.0, 2.0, 0.25, 3.0, 1.5, 0.75]
    flat = torch.zeros(numel, dtype=torch.float64)
    ops.sparse_aggregate(pays, w, out=flat, backend=backend)
    mixed = tiled(pays[:3], numel) + pays[3:5] + tiled(pays[5:], numel)
    acc = torch.zeros(numel, dtype=torch.float64)
    ops.sparse_aggregate(mixed, w, out=acc, backend=backend)
    assert torch.equal(acc, flat)
    stream = ops.SparseAccumulator(numel, group=2, backend=backend)
    for p, ww in zip(mixed, w):
        stream.add(p, ww)
    stream.flush()
    assert torch.equal(stream.sum, flat)


def _bad_tiled_cases(numel: int):
    good = ops.tile_payload(*payloads(1, numel, 0.05, 8)[0], numel)
    o, loc, v = good.offsets, good.local, good.values
    t = int((o.diff() > 1).nonzero()[0])  # a tile with at least two entries
    s = int(o[t])

    def with_local(k, x):
        bad = loc.clone()
        bad[k] = x
        return ops.TiledPayload(o, bad, v, numel)

    last = int(o[-2])  # first entry of the last tile (shorter than TILE)
    return {
        "offsets too short": ops.TiledPayload(o[:-1], loc, v, numel),
        "offsets int64": ops.TiledPayload(o.long(), loc, v, numel),
        "offsets not from 0": ops.TiledPayload(o + 1, loc, v, numel),
        "offsets end short": ops.TiledPayload(torch.cat([o[:-1], o[-1:] - 1]), loc, v, numel),
        "offsets fall": ops.TiledPayload(
            torch.cat([o[:t + 1], o[t:t + 1] - 1, o[t + 2:]]).int(), loc, v, numel),
        "local int32": ops.TiledPayload(o, loc.int(), v, numel),
        "local duplicate": with_local(s + 1, int(loc[s])),
        "local descending": with_local(s + 1, int(loc[s]) - 1 if int(loc[s]) else -1),
        "local negative": with_local(s, -3),
        "local past tile": with_local(int(o[t + 1]) - 1, TILE),
        "local past short last tile": with_local(int(o[-1]) - 1, numel - (num_tiles(numel) - 1)
                                                 * TILE),
        "local -32768": with_local(last, -32768),
        "values short": ops.TiledPayload(o, loc, v[:-1], numel),
        "nan": ops.TiledPayload(o, loc, torch.where(torch.arange(v.numel()) == 3,
                                                    float("nan"), v), numel),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_place", [False, True])
def test_bad_tiled_payloads_raise_and_in_place_base_survives(backend, in_place):
    numel = 5 * TILE + 123
    other = ops.tile_payload(*payloads(1, numel, 0.05, 9)[0], numel)
    for name, bad in _bad_tiled_cases(numel).items():
        base = torch.randn(numel)
        keep = base.clone()
        out = base if in_place else torch.empty(numel)
        with pytest.raises(ValueError, match="aggregate"):
            ops.sparse_aggregate([other, bad, other], [1.0] * 3, out=out, base=base,
                                 backend=backend)
        assert torch.equal(base, keep), name


@pytest.mark.parametrize("pos", [0, 1, 15, 16, 17, 31, 32, 100, 199])
def test_bad_local_index_in_any_avx2_lane_is_caught_by_both_loops(monkeypatch, pos):
    """The AVX2 order check compares 16 int16 lanes at once; a bad entry in any lane (and
    across block edges) must be refused by it and by the portable loop alike."""
    numel = 3 * TILE
    idx = torch.arange(0, numel, 16)  # 256 per tile
    good = ops.tile_payload(idx, torch.ones(idx.numel()), numel)
    for x in (int(good.local[pos - 1]) if pos else -1, TILE, -1, 32767):
        loc = good.local.clone()
        loc[pos] = x
        bad = ops.TiledPayload(good.offsets, loc, good.values, numel)
        for off in ("0", "1"):
            monkeypatch.setenv("SPARSEFL_DISABLE_AVX2", off)
            out = torch.empty(numel)
            with pytest.raises(ValueError, match="aggregate"):
                ops.sparse_aggregate([good, bad], [1.0, 1.0], out=out, backend="cpp")


def test_avx2_and_portable_tiled_merge_give_the_same_bits(monkeypatch):
    numel = 4 * TILE + 77
    pays = tiled(payloads(9, numel, 0.2, 12), numel)
    base = torch.randn(numel)
    outs = []
    for off in ("0", "1"):
        monkeypatch.setenv("SPARSEFL_DISABLE_AVX2", off)
        outs.append(ops.sparse_aggregate(pays, [0.3] * 9, base=base, lr=0.9, backend="cpp"))
    assert torch.equal(outs[0], outs[1])


def test_tile_payload_refuses_bad_flat_input():
    with pytest.raises(ValueError, match="not strictly ascending"):
        ops.tile_payload(torch.tensor([5000, 10]), torch.ones(2), 10_000)  # unsorted
    with pytest.raises(ValueError, match="not strictly ascending"):
        ops.tile_payload(torch.tensor([1, 10_000]), torch.ones(2), 10_000)  # out of range
    with pytest.raises(ValueError, match="int64 or int32"):
        ops.tile_payload(torch.tensor([1.0, 2.0]), torch.ones(2), 10)
    with pytest.raises(ValueError, match="indices and"):
        ops.tile_payload(torch.tensor([1, 2]), torch.ones(3), 10)
    with pytest.raises(ValueError, match="numel"):
        ops.sparse_aggregate([ops.tile_payload(torch.tensor([1]), torch.ones(1), 10),
                              ops.tile_payload(torch.tensor([1]), torch.ones(1), 20)], [1, 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_tiled(backend):
    pays = tiled(payloads(4, 10_000, 0.1, 9), 10_000)
    torch.library.opcheck(torch.ops.sparsefl.sparse_aggregate_tiled.default,
                          ([p.offsets for p in pays], [p.local for p in pays],
                           [p.values for p in pays], [0.25] * 4, torch.empty(10_000),
                           torch.randn(10_000), 1.0, backend))


# ---- tile_indices: the cut itself (C++ pass vs the plain-torch definition) ----

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=str)
def test_tile_indices_of_pieces_equals_the_flat_cut(backend, idx_dtype):
    """A model's per-layer index tensors with their layer offsets, cut in one call, give
    the tiles of their concatenation -- including empty pieces, empty tiles, a piece that
    ends exactly on a tile edge and one that is a single entry."""
    g = torch.Generator().manual_seed(13)
    sizes = [3 * TILE, 5, 1, 10_000, TILE - 1, 0, 70_001]
    starts, pieces, flat, pos = [], [], [], 0
    for m in sizes:
        keep = torch.rand(m, generator=g) < 0.1
        if m == 3 * TILE:
            keep[-1] = True  # the piece's last entry ends a tile
        loc = keep.nonzero().flatten()
        starts.append(pos)
        pieces.append(loc.to(idx_dtype))
        flat.append(loc + pos)
        pos += m
    numel = pos
    flat = torch.cat(flat)
    offsets, local = torch.ops.sparsefl.tile_indices(pieces, starts, numel, backend)
    want = ops.tile_payload(flat, torch.zeros(flat.numel()), numel, backend="reference")
    assert torch.equal(offsets, want.offsets) and torch.equal(local, want.local)
    vals = [torch.randn(p.numel(), generator=g) for p in pieces]
    p = ops.tile_payload(pieces, vals, numel, starts=starts, backend=backend)
    assert torch.equal(untile(p)[0], flat) and torch.equal(p.values, torch.cat(vals))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tile_indices_refuses_bad_pieces(backend):
    cut = torch.ops.sparsefl.tile_indices
    ok = torch.tensor([1, 5, 9])
    bad = {
        "unsorted piece": ([torch.tensor([5, 1])], [0], 100),
        "duplicate": ([torch.tensor([5, 5])], [0], 100),
        "overlapping pieces": ([ok, torch.tensor([3])], [0, 6], 100),  # 9 then 3 + 6 = 9
        "past numel": ([ok], [0], 9),
        "negative": ([torch.tensor([-1, 2])], [0], 100),
        "start past numel": ([ok], [101], 100),
        "huge index": ([torch.tensor([2**62])], [50], 100),
        "starts count": ([ok], [0, 1], 100),
        "float indices": ([torch.tensor([1.0])], [0], 100),
    }
    for pieces, starts, numel in bad.values():
        with pytest.raises(ValueError, match="tile_indices"):
            cut(pieces, starts, numel, backend)
    with pytest.raises(ValueError, match="strictly ascending"):
        ops.tile_payload([ok, torch.tensor([3])], [torch.ones(3), torch.ones(1)], 100,
                         starts=[0, 6], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_tile_indices(backend):
    pieces = [torch.tensor([0, 7, 4095, 4096]), torch.tensor([1, 2], dtype=torch.int32)]
    torch.library.opcheck(torch.ops.sparsefl.tile_indices.default,
                          (pieces, [0, 9000], 10_000, backend))
