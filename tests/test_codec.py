"""sparsefl.codec: lossless round trips, size, and malformed payloads -> PayloadError only."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsefl import codec
from sparsefl.codec import PayloadError, SparseChunk


def random_chunk(numel: int, density: float, seed: int, dtype=torch.float32) -> SparseChunk:
    g = torch.Generator().manual_seed(seed)
    k = int(round(numel * density))
    idx = torch.sort(torch.randperm(numel, generator=g)[:k]).values
    return SparseChunk(numel, idx, torch.randn(k, generator=g).to(dtype))


def assert_same(a: list[SparseChunk], b: list[SparseChunk]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.numel == y.numel
        assert torch.equal(x.indices.long(), y.indices)
        assert torch.equal(x.values, y.values)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.01, 0.05, 0.2, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("numel", [0, 1, 17, 1000, 100_003])
def test_round_trip_is_lossless_fp32(numel, density):
    chunks = [random_chunk(numel, density, 1), random_chunk(max(numel // 3, 1), density, 2)]
    assert_same(chunks, codec.decode(codec.encode(chunks)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_values_round_once(dtype):
    chunks = [random_chunk(5000, 0.05, 3)]
    out = codec.decode(codec.encode(chunks, value_dtype=dtype))
    assert out[0].values.dtype == dtype
    assert torch.equal(out[0].values, chunks[0].values.to(dtype))
    assert torch.equal(out[0].indices, chunks[0].indices)


def test_every_index_encoding_round_trips():
    """Force each encoding by constructing the record directly from the encoder's options."""
    chunk = random_chunk(4000, 0.3, 4)
    ref = torch.sort(torch.cat([chunk.indices, torch.tensor([3999])]).unique()).values
    options = codec._index_sections(chunk, ref)
    assert {codec.INT32_LIST, codec.DELTA_VARINT, codec.BITMASK, codec.RICE,
            codec.REFERENCE_BITMASK} <= set(options)
    for enc, section in options.items():
        body = codec.RECORD.pack(chunk.numel, chunk.indices.numel(), enc, b"\0\0\0",
                                 len(section)) + section + chunk.values.numpy().tobytes()
        blob = codec.HEADER.pack(codec.MAGIC, 1, 0, 1, 0, b"\0\0\0", len(body)) + body
        out = codec.decode(blob + struct.pack("<I", zlib.crc32(blob)), reference=[ref])
        assert_same([chunk], out)


def test_reference_encoding_costs_a_bitmask_of_the_reference():
    g = torch.Generator().manual_seed(5)
    numel = 1_000_000
    ref = torch.sort(torch.randperm(numel, generator=g)[:50_000]).values  # 5% global support
    sub = ref[torch.rand(ref.numel(), generator=g) < 0.5]  # client keeps half of it
    chunk = SparseChunk(numel, sub, torch.randn(sub.numel(), generator=g))
    with_ref = codec.encode([chunk], reference=[ref])
    without = codec.encode([chunk])
    assert len(with_ref) < len(without)
    assert len(with_ref) <= 24 + 24 + 4 + 50_000 // 8 + 4 * sub.numel() + 1
    assert_same([chunk], codec.decode(with_ref, reference=[ref]))
    with pytest.raises(PayloadError, match="no reference"):
        codec.decode(with_ref)


def test_size_at_95_percent_sparsity():
    from sparsefl import ops
    from sparsefl.bench.sam import make_tensors, resnet18_shapes

    xs = make_tensors(resnet18_shapes(), 0)
    n = sum(x.numel() for x in xs)
    idx, val = ops.topk_compress(xs, 0.05)
    chunks = codec.split_flat(idx, val, [x.numel() for x in xs])
    dense = codec.dense_bytes(n)
    assert len(codec.encode(chunks, torch.float32)) <= dense / 15
    assert len(codec.encode(chunks, torch.float16)) <= dense / 28


def test_specific_malformations_have_precise_messages():
    good = codec.encode([random_chunk(1000, 0.1, 6)])

    def fix_crc(blob: bytes) -> bytes:
        return blob[:-4] + struct.pack("<I", zlib.crc32(blob[:-4]))

    cases = {
        "shorter than header": good[:10],
        "bad magic": fix_crc(b"XXXX" + good[4:]),
        "unsupported payload version": fix_crc(good[:4] + struct.pack("<H", 9) + good[6:]),
        "checksum mismatch": good[:-1] + bytes([good[-1] ^ 1]),
        "header says the body": fix_crc(good[:-4] + b"\0" + good[-4:]),
        "unknown value dtype": fix_crc(good[:12] + b"\x07" + good[13:]),
    }
    for message, blob in cases.items():
        with pytest.raises(PayloadError, match=message):
            codec.decode(blob)
    nan_chunk = SparseChunk(10, torch.tensor([1, 2]), torch.tensor([1.0, float("nan")]))
    blob = codec.encode([nan_chunk])
    with pytest.raises(PayloadError, match="non-finite"):
        codec.decode(blob)
    assert torch.isnan(codec.decode(blob, nonfinite="allow")[0].values[1])
    with pytest.raises(PayloadError, match="exceeds the limit"):
        codec.decode(good, max_bytes=10)
    with pytest.raises(PayloadError, match="bytes"):
        codec.decode("not bytes")  # type: ignore[arg-type]


def test_encoder_refuses_bad_chunks():
    with pytest.raises(ValueError, match="ascending"):
        codec.encode([SparseChunk(10, torch.tensor([3, 2]), torch.ones(2))])
    with pytest.raises(ValueError, match="ascending"):
        codec.encode([SparseChunk(10, torch.tensor([3, 10]), torch.ones(2))])
    with pytest.raises(ValueError, match="equal length"):
        codec.encode([SparseChunk(10, torch.tensor([3]), torch.ones(2))])


# ----------------------------------------------------------------- fuzzing ------------

@st.composite
def valid_payloads(draw):
    chunks = []
    for t in range(draw(st.integers(0, 3))):
        numel = draw(st.integers(0, 3000))
        density = draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]))
        chunks.append(random_chunk(numel, density, draw(st.integers(0, 10**6)) + t))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    return codec.encode(chunks, value_dtype=dtype)


@st.composite
def malformed(draw):
    blob = bytearray(draw(valid_payloads()))
    kind = draw(st.sampled_from(["truncate", "flip", "bytes", "append", "random", "header"]))
    if kind == "truncate":
        blob = blob[: draw(st.integers(0, len(blob) - 1))]
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(blob) - 1))
            blob[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "bytes":
        i = draw(st.integers(0, len(blob) - 1))
        new = draw(st.binary(min_size=1, max_size=16))
        blob[i: i + len(new)] = new
    elif kind == "append":
        blob += draw(st.binary(min_size=1, max_size=64))
    elif kind == "random":
        blob = bytearray(draw(st.binary(min_size=0, max_size=400)))
    else:  # a header field replaced by an arbitrary value
        field = draw(st.sampled_from([(4, "<H"), (6, "<H"), (8, "<I"), (12, "<B"), (16, "<Q")]))
        off, fmt = field
        blob[off: off + struct.calcsize(fmt)] = struct.pack(
            fmt, draw(st.integers(0, 2 ** (8 * struct.calcsize(fmt)) - 1)))
    return bytes(blob), kind


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed())
def test_fuzzed_payloads_raise_only_payload_error(case):
    blob, kind = case
    try:
        out = codec.decode(blob)
    except PayloadError:
        return
    # the only way through is a mutation that left the bytes valid (e.g. a field rewritten
    # to its own value): then the result must be a well-formed payload
    assert zlib.crc32(blob[:-4]) == struct.unpack("<I", blob[-4:])[0], kind
    for c in out:
        assert c.indices.dtype == torch.int64 and c.indices.numel() == c.values.numel()


@st.composite
def malformed_with_valid_crc(draw):
    blob, kind = draw(malformed())
    if len(blob) < 28:
        return blob, kind
    return blob[:-4] + struct.pack("<I", zlib.crc32(blob[:-4])), kind


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed_with_valid_crc())
def test_structural_validation_behind_a_valid_checksum(case):
    """With the checksum recomputed, only field validation stands between us and garbage."""
    blob, _ = case
    try:
        out = codec.decode(blob)
    except PayloadError:
        return
    for c in out:
        idx = c.indices
        assert idx.dtype == torch.int64 and idx.numel() == c.values.numel() <= c.numel
        if idx.numel():
            assert int(idx[0]) >= 0 and int(idx[-1]) < c.numel
            assert bool((idx[1:] > idx[:-1]).all())
        assert bool(torch.isfinite(c.values).all())
