"""The payload format pinned by committed bytes (tests/data/codec, written once by its
make_golden.py): every golden payload decodes to what its manifest records and
re-encodes to the same bytes, by both backends -- so a format change made on both sides
at once still fails here.  Also: the Rice tie rule, sections of 2^32 bytes or more, the
CRC of payloads over 4 GiB, and absurd declared sizes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsefl import _native, codec

DATA = Path(__file__).parent / "data" / "codec"
MANIFEST = json.loads((DATA / "manifest.json").read_text())
BACKENDS = ["reference", pytest.param("cpp", marks=pytest.mark.skipif(
    not _native.has_kernel("codec_decode", "cpu"), reason="C++ codec not built"))]
ENC_OF = {"int32_list": codec.INT32_LIST, "delta_varint": codec.DELTA_VARINT,
          "bitmask": codec.BITMASK, "dense": codec.DENSE,
          "reference_bitmask": codec.REFERENCE_BITMASK, "rice": codec.RICE}


def _ref(name: str):
    path = DATA / f"{name}.ref"
    return [torch.from_numpy(np.frombuffer(path.read_bytes(), "<i8").copy())] \
        if path.exists() else None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_golden_payload_decodes_as_recorded_and_reencodes_byte_for_byte(name, backend):
    data = (DATA / f"{name}.bin").read_bytes()
    want = MANIFEST[name]
    assert hashlib.sha256(data).hexdigest() == want["sha256"]  # the file itself is intact
    ref = _ref(name)
    chunks = codec.decode(data, reference=ref, backend=backend)
    got = [{"numel": c.numel, "nnz": int(c.indices.numel()),
            "indices_sha256": hashlib.sha256(c.indices.numpy().tobytes()).hexdigest(),
            "values_sha256": hashlib.sha256(c.values.float().numpy().tobytes()).hexdigest()}
           for c in chunks]
    assert got == want["chunks"]
    dtype = getattr(torch, want["value_dtype"].removeprefix("torch."))
    assert codec.encode(chunks, dtype, reference=ref, backend=backend) == data
    if name in ENC_OF:  # each file exercises the encoding it is named for
        assert data[codec.HEADER.size + 16] == ENC_OF[name]


def test_rice_ties_go_to_the_smallest_b():
    """Gaps where two Rice parameters give sections of equal length: the format's rule
    picks the smaller b, whatever order a set iterates in."""
    found = 0
    gen = np.random.default_rng(0)
    for _ in range(4000):
        k = int(gen.integers(2, 40))
        gaps = gen.geometric(1 / float(gen.uniform(2, 3000)), size=k) - 1
        lens = {b: len(codec._rice_encode(gaps, b)) for b in range(0, 16)}
        best = codec._rice_best(gaps)
        mean = float(gaps.mean())
        b0 = max(0, int(np.floor(np.log2(max(mean * 0.69, 1.0)))))
        cands = sorted({max(0, b0 - 1), b0, min(40, b0 + 1)})
        shortest = min(lens[b] for b in cands)
        tied = [b for b in cands if lens[b] == shortest]
        assert best[0] == tied[0]  # the stored b: the smallest of the tied
        found += len(tied) > 1
    assert found > 20  # ties do happen: the rule is exercised


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_encoders_agree_on_tied_rice_parameters(backend):
    gen = np.random.default_rng(1)
    for _ in range(300):
        n = int(gen.integers(10_000, 200_000))
        idx = np.sort(gen.choice(n, size=int(gen.integers(2, 60)), replace=False))
        c = codec.SparseChunk(n, torch.from_numpy(idx), torch.ones(len(idx)))
        assert codec.encode([c], backend=backend) == codec.encode([c], backend="reference")


def test_a_section_of_2_to_the_32_bytes_is_refused_not_wrapped():
    assert len(codec.record(10, 1, codec.INT32_LIST, 2**32 - 1)) == codec.RECORD.size
    with pytest.raises(ValueError, match="under 2\\^32"):
        codec.record(2**39, 2**30, codec.INT32_LIST, 2**32)


@pytest.mark.skipif(not _native.has_kernel("codec_decode", "cpu"), reason="no C++ codec")
@pytest.mark.parametrize("threads", [1, 2])
def test_crc_of_a_payload_over_4_gib(threads):
    if not torch.ops.sparsefl_C.codec_crc_builtin():
        pytest.skip("C++ codec built without zlib (Python computes the CRC)")
    data = torch.zeros(2**32 + 4097, dtype=torch.uint8)  # zero pages: no real memory
    data[-3] = 7
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.ops.sparsefl_C.codec_crc32(data)
    finally:
        torch.set_num_threads(old)
    assert got == zlib.crc32(data.numpy())


ABSURD = r"""
import random, resource, struct, zlib
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from sparsefl import codec
rng = random.Random(0)
BIG = [0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**39, 2**40 - 1, 2**40, 2**63, 2**64 - 1]
for trial in range(3000):
    T = rng.choice([1, 2, 3, 2**32 - 1])
    body = b""
    for t in range(min(T, 3)):
        enc = rng.randrange(7)
        body += struct.pack("<QQB3sI", rng.choice(BIG), rng.choice(BIG + [rng.randrange(99)]),
                            enc, b"\0\0\0", rng.choice([0, 5, 2**31, 2**32 - 1, 40]))
        sec = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        if enc == 5 and rng.random() < 0.5:
            sec = struct.pack("<BI", rng.randrange(45), rng.choice([0, 3, 2**32 - 1])) + sec
        body += sec
    blob = struct.pack("<4sHHIB3sQ", b"SFLP", 1, 0, T, rng.randrange(3), b"\0\0\0",
                       len(body)) + body
    blob += struct.pack("<I", zlib.crc32(blob))
    for backend in BACKENDS:
        try:
            codec.decode(blob, backend=backend)
        except codec.PayloadError:
            pass
print("ok")
"""


def test_absurd_declared_sizes_raise_payload_error_never_memory_error():
    """Records declaring up to 2^64 entries or bytes behind a valid checksum, decoded
    under a 4 GiB address-space limit (a separate process): PayloadError every time."""
    backends = ["reference"] + (["cpp"] if _native.has_kernel("codec_decode", "cpu") else [])
    code = f"BACKENDS = {backends!r}\n" + ABSURD
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
