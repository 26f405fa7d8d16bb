"""The C++ codec against the numpy reference encoder/decoder: the same bytes, bit for bit,
for every index encoding and value dtype; the same chunks decoded; every malformed
payload a PayloadError on both (hypothesis fuzzing)."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_codec import malformed, random_chunk

from sparsefl import _native, codec
from sparsefl.codec import PayloadError, SparseChunk

pytestmark = pytest.mark.skipif(not _native.has_kernel("codec_decode", "cpu"),
                                reason=f"native extension not loaded: {_native.LOAD_ERROR}")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def encodings(blob: bytes) -> list[int]:
    """The index encoding of every tensor record of a payload."""
    n = struct.unpack_from("<I", blob, 8)[0]
    vsize = 4 if blob[12] == 0 else 2
    pos, out = 24, []
    for _ in range(n):
        _, nnz, enc, _, idx_len = struct.unpack_from("<QQB3sI", blob, pos)
        out.append(enc)
        pos += 24 + idx_len + nnz * vsize
    return out


def both(chunks, dtype=torch.float32, reference=None) -> bytes:
    ref = codec.encode(chunks, dtype, reference, backend="reference")
    cpp = codec.encode(chunks, dtype, reference, backend="cpp")
    assert cpp == ref
    return cpp


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_bytes_for_every_encoding(dtype):
    seen = set()
    for numel in (0, 1, 7, 4095, 4096, 70_001, 1_000_003):
        for density in (0.0, 1e-5, 1e-3, 0.01, 0.05, 0.2, 0.5, 0.97, 1.0):
            for seed in range(2):
                chunks = [random_chunk(numel, density, seed, dtype),
                          random_chunk(max(numel // 3, 1), density, seed + 7, dtype)]
                seen.update(encodings(both(chunks, dtype)))
    # a reference support both sides know (SparsyFed's downlink support)
    g = torch.Generator().manual_seed(3)
    sup = torch.sort(torch.randperm(200_000, generator=g)[:20_000]).values
    sub = sup[torch.sort(torch.randperm(20_000, generator=g)[:4_000]).values]
    chunks = [SparseChunk(200_000, sub, torch.randn(4_000, generator=g).to(dtype)),
              random_chunk(5000, 0.3, 1, dtype)]
    seen.update(encodings(both(chunks, dtype, reference=[sup, None])))
    # a support not inside the reference: the reference bitmask is not an option
    both([random_chunk(200_000, 0.02, 4, dtype)], dtype, reference=[sup])
    assert seen == set(codec.ENCODING_NAMES), seen


def test_same_bytes_on_large_index_spaces_and_int32_indices():
    big = SparseChunk(2**39, torch.tensor([0, 5, 2**38, 2**39 - 1]), torch.randn(4))
    both([big])  # gaps above 2^32: no int32 list, varint or Rice
    c = random_chunk(50_000, 0.05, 9)
    both([SparseChunk(c.numel, c.indices.int(), c.values)])
    both([SparseChunk(10, torch.tensor([1, 2]), torch.tensor([1.0, float("nan")]))])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 20_000), st.sampled_from([0.0, 1e-3, 0.02, 0.1,
                                                                     0.4, 0.9, 1.0]),
                          st.integers(0, 10**6)), max_size=4),
       st.sampled_from(DTYPES))
def test_same_bytes_hypothesis(specs, dtype):
    chunks = [random_chunk(n, d, s, dtype) for n, d, s in specs]
    blob = both(chunks, dtype)
    for dec in ("reference", "cpp"):
        out = codec.decode(blob, backend=dec)
        assert [c.numel for c in out] == [c.numel for c in chunks]
        for a, b in zip(out, chunks):
            assert torch.equal(a.indices, b.indices.long())
            assert torch.equal(a.values, b.values.to(dtype))


def test_decoders_agree_on_the_reference_bitmask():
    g = torch.Generator().manual_seed(5)
    sup = torch.sort(torch.randperm(10_000, generator=g)[:3000]).values
    sub = sup[::3]
    blob = both([SparseChunk(10_000, sub, torch.randn(len(sub), generator=g))],
                reference=[sup])
    a = codec.decode(blob, reference=[sup], backend="cpp")[0]
    b = codec.decode(blob, reference=[sup], backend="reference")[0]
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    with pytest.raises(PayloadError, match="no reference"):
        codec.decode(blob, backend="cpp")


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed(), st.booleans())
def test_fuzzed_payloads_same_verdict(case, fix_crc):
    blob, _ = case
    if fix_crc and len(blob) >= 28:  # past the checksum: only field validation is left
        blob = blob[:-4] + struct.pack("<I", zlib.crc32(blob[:-4]))
    verdicts = []
    for dec in ("reference", "cpp"):
        try:
            verdicts.append(codec.decode(blob, backend=dec))
        except PayloadError:
            verdicts.append(None)
    ref, cpp = verdicts
    assert (ref is None) == (cpp is None)
    if ref is not None:
        for a, b in zip(ref, cpp):
            assert a.numel == b.numel and torch.equal(a.indices, b.indices)
            assert torch.equal(a.values, b.values)


def test_encoder_refuses_bad_chunks_like_the_reference():
    for bad, match in ((SparseChunk(10, torch.tensor([3, 2]), torch.ones(2)), "ascending"),
                       (SparseChunk(10, torch.tensor([3, 10]), torch.ones(2)), "ascending"),
                       (SparseChunk(10, torch.tensor([3]), torch.ones(2)), "equal length"),
                       (SparseChunk(2**41, torch.tensor([3]), torch.ones(1)), "2\\^40"),
                       (SparseChunk(10, torch.tensor([1.0]), torch.ones(1)), "int64")):
        for be in ("reference", "cpp"):
            with pytest.raises(ValueError, match=match):
                codec.encode([bad], backend=be)


def _layout(sizes: list[int], gap: int = 0) -> tuple[list[int], int]:
    starts, pos = [], 0
    for n in sizes:
        starts.append(pos)
        pos += n + gap
    return starts, pos


@pytest.mark.parametrize("gap", [0, 5000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tiled_decode_is_the_reference_tiling(gap, dtype):
    g = torch.Generator().manual_seed(11)
    sizes = [4096, 1, 0, 9000, 70_001, 3, 12_288, 500_000]
    for density in (0.0, 0.001, 0.05, 0.5, 1.0):
        chunks = [random_chunk(n, density, int(torch.randint(0, 99, (1,), generator=g)), dtype)
                  for n in sizes]
        blob = codec.encode(chunks, dtype)
        starts, numel = _layout(sizes, gap)
        got = codec.decode_tiled(blob, starts, sizes, numel, backend="cpp")
        want = codec.decode_tiled(blob, starts, sizes, numel, backend="reference")
        assert torch.equal(got.offsets, want.offsets)
        assert torch.equal(got.local, want.local)
        assert torch.equal(got.values, want.values) and got.numel == want.numel == numel


def test_tiled_decode_refuses_what_decode_refuses():
    chunks = [random_chunk(5000, 0.1, 1), random_chunk(300, 0.5, 2)]
    blob = codec.encode(chunks)
    starts, numel = _layout([5000, 300])
    for be in ("reference", "cpp"):
        with pytest.raises(PayloadError, match="layout"):
            codec.decode_tiled(blob, starts, [5000, 301], numel, backend=be)
        with pytest.raises(PayloadError, match="checksum"):
            codec.decode_tiled(blob[:-1] + bytes([blob[-1] ^ 1]), starts, [5000, 300], numel,
                               backend=be)
    with pytest.raises(PayloadError, match="not inside"):
        codec.decode_tiled(blob, [0, 4000], [5000, 300], numel, backend="cpp")


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed())
def test_fuzzed_tiled_decode_same_verdict(case):
    blob, _ = case
    if len(blob) >= 28:
        blob = blob[:-4] + struct.pack("<I", zlib.crc32(blob[:-4]))
    try:
        n = struct.unpack_from("<I", blob, 8)[0]
    except struct.error:
        n = 0
    try:
        numels = [c.numel for c in codec.decode(blob, backend="reference")]
    except PayloadError:
        numels = [10] * min(n, 4)
    starts, numel = _layout(numels)
    verdicts = []
    for be in ("reference", "cpp"):
        try:
            verdicts.append(codec.decode_tiled(blob, starts, numels, numel, backend=be))
        except PayloadError:
            verdicts.append(None)
    assert (verdicts[0] is None) == (verdicts[1] is None)
    if verdicts[0] is not None:
        assert torch.equal(verdicts[0].offsets, verdicts[1].offsets)
        assert torch.equal(verdicts[0].local, verdicts[1].local)
