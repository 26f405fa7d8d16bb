"""Sparse payloads <-> bytes.  Documented layout, validated on decode, never pickled.

A payload is a list of sparse tensors, each `SparseChunk(numel, indices, values)`: the
`indices` (int64, strictly ascending, < numel) of the entries sent and their `values`.

Byte layout (all integers little-endian)::

    header, 24 bytes
      0  magic      4 bytes  b"SFLP"
      4  version    u16      1
      6  flags      u16      0 (reserved)
      8  n_tensors  u32
     12  value_dt   u8       0 float32, 1 float16, 2 bfloat16
     13  reserved   3 bytes  0
     16  body_len   u64      bytes between the header and the checksum
    body: n_tensors records, each
      numel     u64     size of the tensor's index space (< 2^40)
      nnz       u64     entries sent (<= numel)
      encoding  u8      0 int32 list | 1 delta varint | 2 bitmask | 3 dense |
                        4 reference bitmask | 5 Golomb-Rice gaps
      pad       3 bytes 0
      idx_len   u32     bytes of the index section that follows
      index section     int32[nnz]                 (0: numel < 2^31)
                        LEB128 varints of gaps     (1: first index, then idx[i]-idx[i-1]-1)
                        bits, LSB first            (2: ceil(numel/8) bytes, popcount = nnz)
                        nothing                    (3: nnz = numel, every index in order)
                        bits over the reference's support (4: ceil(ref_nnz/8) bytes)
                        Rice-coded gaps       (5: u8 b, u32 qbytes, then the quotients as
                                               q zeros + a one each, LSB first, in qbytes
                                               bytes, then the b-bit remainders packed
                                               LSB first in ceil(nnz*b/8) bytes)
      values            nnz x value size, same dtype for the whole payload
    checksum: CRC-32 (zlib) of header + body, u32

The encoder picks the smallest index encoding per tensor; the tie rule (part of the
format: both encoders write the same bytes) is the first of int32 list, delta varint,
Rice, bitmask, reference bitmask among equal sizes, and for Rice the smallest b among
the candidates {b0 - 1, b0, b0 + 1} (b0 from the mean gap) of equal size.  An index
section of 2^32 bytes or more is refused (its length is a u32).  Encoding 4 is for supports
both sides know (SparsyFed: a client's support lies inside the global model's support,
so a bitmask over that support costs ref_nnz/8 bytes).  Decoding checks every field,
size, range, order, the checksum and non-finite values (policy: `nonfinite="raise"` by
default, or "allow"), and raises PayloadError (a ValueError) with a precise message.

Backends: the C++ codec (csrc/cpu/codec.cpp; `backend="auto"` when the extension is
loaded) writes the same bytes as this module's numpy encoder, bit for bit, and its
decoder makes the same checks; `backend="reference"` is the numpy code (the definition
the C++ face is tested against).  SPARSEFL_BACKEND applies as for the ops.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

MAGIC = b"SFLP"
VERSION = 1
HEADER = struct.Struct("<4sHHIB3sQ")  # 24 bytes
RECORD = struct.Struct("<QQB3sI")  # 24 bytes
CRC = struct.Struct("<I")
MAX_NUMEL = 1 << 40
DEFAULT_MAX_BYTES = 1 << 33  # 8 GiB: refuse anything larger before reading it

INT32_LIST, DELTA_VARINT, BITMASK, DENSE, REFERENCE_BITMASK, RICE = range(6)
ENCODING_NAMES = {INT32_LIST: "int32", DELTA_VARINT: "delta-varint", BITMASK: "bitmask",
                  DENSE: "dense", REFERENCE_BITMASK: "reference-bitmask", RICE: "rice"}
RICE_HEAD = struct.Struct("<BI")
VALUE_DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}
VALUE_CODES = {v: k for k, v in VALUE_DTYPES.items()}


class PayloadError(ValueError):
    """A payload that cannot be decoded: truncated, corrupted, malformed or out of policy."""


@dataclass(frozen=True)
class SparseChunk:
    numel: int
    indices: Tensor  # int64, strictly ascending, in [0, numel)
    values: Tensor  # 1-D, same length as indices

    def to_dense(self, dtype: torch.dtype | None = None) -> Tensor:
        out = torch.zeros(self.numel, dtype=dtype or self.values.dtype)
        out[self.indices] = self.values.to(out.dtype)
        return out


# ----------------------------------------------------------------- varints -------------

def _varint_encode(gaps: np.ndarray) -> bytes:
    """LEB128 of non-negative int64 gaps, vectorised."""
    if gaps.size == 0:
        return b""
    g = gaps.astype(np.uint64)
    nbytes = np.ones(g.size, dtype=np.int64)
    for shift in range(7, 64, 7):
        nbytes += g >= (np.uint64(1) << np.uint64(shift))
    ends = np.cumsum(nbytes)
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    starts = ends - nbytes
    for j in range(int(nbytes.max())):
        sel = nbytes > j
        chunk = (g[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (nbytes[sel] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (chunk | more).astype(np.uint8)
    return out.tobytes()


def _varint_decode(buf: bytes, count: int, where: str) -> np.ndarray:
    """Exactly `count` LEB128 values that use every byte of `buf`."""
    b = np.frombuffer(buf, dtype=np.uint8)
    if count == 0:
        if b.size:
            raise PayloadError(f"{where}: {b.size} index bytes for 0 entries")
        return np.empty(0, dtype=np.int64)
    ends = np.flatnonzero(b < 0x80)
    if ends.size != count or (b.size and b[-1] >= 0x80):
        raise PayloadError(f"{where}: index section holds {ends.size} complete varints "
                           f"(or ends mid-varint), expected {count}")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 9:  # 9 x 7 = 63 bits: every legal gap fits
        raise PayloadError(f"{where}: varint longer than 9 bytes")
    if np.any((lengths > 1) & (b[ends] == 0)):
        raise PayloadError(f"{where}: overlong varint (a redundant zero byte)")
    owner = np.repeat(np.arange(count), lengths)
    pos = np.arange(b.size) - np.repeat(starts, lengths)
    parts = (b.astype(np.uint64) & np.uint64(0x7F)) << (np.uint64(7) * pos.astype(np.uint64))
    vals = np.zeros(count, dtype=np.uint64)
    np.add.at(vals, owner, parts)
    return vals.astype(np.int64)


# ----------------------------------------------------------------- Golomb-Rice ---------
# Gaps between kept indices are close to geometric at uniform sparsity; Rice coding with
# the right b is within a few percent of their entropy (5.7 bits at 5% density, against 8
# for a one-byte varint).  Quotients and remainders go to separate streams so both
# directions vectorise: quotient ends are simply the set bits of the first stream.

def _rice_encode(gaps: np.ndarray, b: int) -> bytes:
    g = gaps.astype(np.uint64)
    q = (g >> np.uint64(b)).astype(np.int64)
    ends = np.cumsum(q + 1) - 1  # position of each terminating one
    qbits = np.zeros(int(ends[-1]) + 1 if g.size else 0, dtype=np.uint8)
    qbits[ends] = 1
    qbytes = np.packbits(qbits, bitorder="little").tobytes()
    if b:
        r = g & np.uint64((1 << b) - 1)
        rbits = ((r[:, None] >> np.arange(b, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
        rbytes = np.packbits(rbits.reshape(-1), bitorder="little").tobytes()
    else:
        rbytes = b""
    return RICE_HEAD.pack(b, len(qbytes)) + qbytes + rbytes


def _rice_best(gaps: np.ndarray) -> bytes:
    mean = float(gaps.mean()) if gaps.size else 0.0
    b0 = max(0, int(np.floor(np.log2(max(mean * 0.69, 1.0)))))
    # ascending b: min() keeps the first of equal length, so ties go to the smallest b
    return min((_rice_encode(gaps, b) for b in sorted({max(0, b0 - 1), b0, min(40, b0 + 1)})),
               key=len)


def _rice_decode(section: bytes, count: int, where: str) -> np.ndarray:
    if len(section) < RICE_HEAD.size:
        raise PayloadError(f"{where}: Rice section shorter than its header")
    b, qlen = RICE_HEAD.unpack_from(section, 0)
    if b > 40:
        raise PayloadError(f"{where}: Rice parameter {b} > 40")
    rlen = (count * b + 7) // 8
    if len(section) != RICE_HEAD.size + qlen + rlen:
        raise PayloadError(f"{where}: Rice section of {len(section)} bytes, expected "
                           f"{RICE_HEAD.size + qlen + rlen}")
    qbits = np.unpackbits(np.frombuffer(section, np.uint8, qlen, RICE_HEAD.size),
                          bitorder="little")
    ends = np.flatnonzero(qbits)
    if ends.size != count:
        raise PayloadError(f"{where}: {ends.size} Rice quotients, expected {count}")
    if count and (qbits.size - ends[-1] - 1 >= 8):
        raise PayloadError(f"{where}: Rice quotient stream has trailing bytes")
    if count == 0:
        if qlen:
            raise PayloadError(f"{where}: Rice quotient bytes for 0 entries")
        return np.empty(0, dtype=np.int64)
    q = np.diff(ends, prepend=-1) - 1
    if int(q.max()) >= (1 << 40) >> b:
        raise PayloadError(f"{where}: Rice quotient out of range")
    gaps = q.astype(np.int64) << b
    if b:
        rbits = np.unpackbits(np.frombuffer(section, np.uint8, rlen, RICE_HEAD.size + qlen),
                              bitorder="little")
        if rbits[count * b:].any():
            raise PayloadError(f"{where}: Rice remainder padding bits are set")
        r = rbits[: count * b].reshape(count, b).astype(np.int64)
        gaps |= (r << np.arange(b, dtype=np.int64)).sum(axis=1)
    return gaps


# ----------------------------------------------------------------- encode --------------

def _index_sections(chunk: SparseChunk, ref: Tensor | None) -> dict[int, bytes]:
    idx = chunk.indices.cpu().numpy().astype(np.int64)
    n, k = chunk.numel, idx.size
    if k == n:  # every index in order: nothing to send, nothing else can be smaller
        return {DENSE: b""}
    options: dict[int, bytes] = {}
    if n < 2**31:
        options[INT32_LIST] = idx.astype("<i4").tobytes()
    gaps = np.diff(idx, prepend=-1) - 1 if k else idx
    options[DELTA_VARINT] = _varint_encode(gaps)
    if k:
        options[RICE] = _rice_best(gaps)
    if n <= 64 * max(k, 1) or n < 4096:  # a bitmask can only win at densities >= ~1/64
        bits = np.zeros(n, dtype=bool)
        bits[idx] = True
        options[BITMASK] = np.packbits(bits, bitorder="little").tobytes()
    if ref is not None:
        ref_np = ref.cpu().numpy().astype(np.int64)
        pos = np.searchsorted(idx, ref_np)  # which reference positions hold an index
        inside = ((pos < k) & (idx[np.minimum(pos, max(k - 1, 0))] == ref_np) if k
                  else np.zeros(ref_np.size, dtype=bool))
        if int(inside.sum()) == k:  # the support is a subset of the reference
            options[REFERENCE_BITMASK] = np.packbits(inside, bitorder="little").tobytes()
    return options


def _native(backend: str | None) -> bool:
    """Whether the C++ codec runs: auto/cpp with the extension loaded (cpp without it
    raises); any other backend name means the numpy reference."""
    import os

    from sparsefl import _native as native

    name = backend if backend is not None else os.environ.get("SPARSEFL_BACKEND", "auto")
    if name not in ("auto", "cpp", "cuda", "triton", "reference"):
        raise ValueError(f"sparsefl.codec: unknown backend {name!r}")
    have = native.has_kernel("codec_decode", "cpu")
    if name == "cpp" and not have:
        raise RuntimeError(f"sparsefl.codec: backend 'cpp' unavailable: {native.LOAD_ERROR}")
    return have and name in ("auto", "cpp")


def encode(chunks: Sequence[SparseChunk], value_dtype: torch.dtype = torch.float32,
           reference: Sequence[Tensor | None] | None = None, *,
           backend: str | None = None) -> bytes:
    """Bytes of a payload; per tensor the smallest index encoding is chosen.

    reference: optional per-chunk support (int64 ascending indices) that the decoder
    also knows; enables encoding 4 where a chunk's support lies inside it.
    """
    if value_dtype not in VALUE_CODES:
        raise ValueError(f"value_dtype must be one of {list(VALUE_CODES)}, got {value_dtype}")
    if reference is not None and len(reference) != len(chunks):
        raise ValueError(f"reference has {len(reference)} entries for {len(chunks)} chunks")
    if chunks and _native(backend):
        body = torch.ops.sparsefl_C.codec_encode_body(
            [c.indices for c in chunks], [c.values for c in chunks], [c.numel for c in chunks],
            list(reference) if reference is not None else [None] * len(chunks),
            VALUE_CODES[value_dtype])
        buf = body.numpy()  # header + body + the checksum (or a slot for it)
        if not _crc_builtin():
            buf[-4:] = np.frombuffer(CRC.pack(zlib.crc32(buf[:-4])), dtype=np.uint8)
        return buf.tobytes()
    body = bytearray()
    for i, c in enumerate(chunks):
        _check_chunk(c, i)
        ref = reference[i] if reference is not None else None
        options = _index_sections(c, ref)
        enc = min(options, key=lambda e: len(options[e]))
        section = options[enc]
        values = c.values.detach().to("cpu", value_dtype).contiguous()
        body += record(c.numel, c.indices.numel(), enc, len(section), i)
        body += section
        body += values.view(torch.uint8).numpy().tobytes() if values.numel() else b""
    header = HEADER.pack(MAGIC, VERSION, 0, len(chunks), VALUE_CODES[value_dtype], b"\0\0\0",
                         len(body))
    blob = header + bytes(body)
    return blob + CRC.pack(zlib.crc32(blob))


def record(numel: int, nnz: int, enc: int, section_len: int, i: int = 0) -> bytes:
    """One tensor's record header; a section of 2^32 bytes or more is refused, not
    wrapped into its u32 length field."""
    if not 0 <= section_len < 2**32:
        raise ValueError(f"chunk {i}: its index section would be {section_len} bytes; a "
                         "payload section holds under 2^32 (send the tensor in pieces)")
    return RECORD.pack(numel, nnz, enc, b"\0\0\0", section_len)


def _check_chunk(c: SparseChunk, i: int) -> None:
    idx = c.indices
    if idx.dim() != 1 or c.values.dim() != 1 or idx.numel() != c.values.numel():
        raise ValueError(f"chunk {i}: indices and values must be 1-D of equal length")
    if not 0 <= c.numel < MAX_NUMEL:
        raise ValueError(f"chunk {i}: numel {c.numel} outside [0, 2^40)")
    if idx.numel():
        if idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"chunk {i}: indices must be int64/int32, got {idx.dtype}")
        if int(idx[0]) < 0 or int(idx[-1]) >= c.numel or bool((idx[1:] <= idx[:-1]).any()):
            raise ValueError(f"chunk {i}: indices must be strictly ascending in [0, numel)")


# ----------------------------------------------------------------- decode --------------

_CRC_BUILTIN: list[bool] = []


def _crc_builtin() -> bool:
    """Whether the C++ codec computes and checks the CRC-32 itself (built with zlib)."""
    if not _CRC_BUILTIN:
        _CRC_BUILTIN.append(bool(torch.ops.sparsefl_C.codec_crc_builtin()))
    return _CRC_BUILTIN[0]


def _as_tensor(data: bytes) -> Tensor:
    """The payload's bytes as a uint8 tensor without a copy (read-only: the C++ decoder
    only reads it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable"
        return torch.frombuffer(data, dtype=torch.uint8)


def _check_header(data, reference, nonfinite: str, max_bytes: int, crc: bool = True
                  ) -> tuple[bytes, int, int]:
    """Type, size, header fields and checksum (unless crc=False: the C++ decoder checks
    it) of a payload: (bytes, n_tensors, dtype code)."""
    if nonfinite not in ("raise", "allow"):
        raise ValueError(f"nonfinite must be 'raise' or 'allow', got {nonfinite!r}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise PayloadError(f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < HEADER.size + CRC.size:
        raise PayloadError(f"payload of {len(data)} bytes is shorter than header + checksum "
                           f"({HEADER.size + CRC.size})")
    magic, version, flags, n_tensors, dt, reserved, body_len = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise PayloadError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise PayloadError(f"unsupported payload version {version} (this build reads {VERSION})")
    if flags != 0 or reserved != b"\0\0\0":
        raise PayloadError("reserved header bits are set")
    if dt not in VALUE_DTYPES:
        raise PayloadError(f"unknown value dtype code {dt}")
    if body_len != len(data) - HEADER.size - CRC.size:
        raise PayloadError(f"header says the body has {body_len} bytes, the payload holds "
                           f"{len(data) - HEADER.size - CRC.size}")
    (stored,) = CRC.unpack_from(data, len(data) - CRC.size)
    if crc and stored != zlib.crc32(memoryview(data)[: len(data) - CRC.size]):
        raise PayloadError("checksum mismatch: the payload was corrupted or truncated")
    if reference is not None and len(reference) != n_tensors:
        raise PayloadError(f"payload has {n_tensors} tensors, reference has {len(reference)}")
    return data, n_tensors, dt


def decode(data: bytes | bytearray | memoryview, *, reference: Sequence[Tensor | None] | None
           = None, nonfinite: str = "raise", max_bytes: int = DEFAULT_MAX_BYTES,
           backend: str | None = None) -> list[SparseChunk]:
    """Chunks of a payload; raises PayloadError on anything malformed."""
    native = _native(backend)
    data, n_tensors, dt = _check_header(data, reference, nonfinite, max_bytes,
                                        crc=not (native and _crc_builtin()))
    if native:  # the header and checksum are checked above, the rest in C++
        try:
            idxs, vals, numels = torch.ops.sparsefl_C.codec_decode(
                _as_tensor(data),
                list(reference) if reference is not None else [], nonfinite == "allow")
        except (ValueError, RuntimeError) as e:
            raise PayloadError(str(e).split("\n")[0]) from None
        return [SparseChunk(n, i, v) for n, i, v in zip(numels, idxs, vals)]
    vdtype = VALUE_DTYPES[dt]
    vsize = torch.empty(0, dtype=vdtype).element_size()
    end = len(data) - CRC.size
    pos = HEADER.size
    chunks = []
    for t in range(n_tensors):
        where = f"tensor {t}"
        if pos + RECORD.size > end:
            raise PayloadError(f"{where}: record header runs past the end of the payload")
        numel, nnz, enc, pad, idx_len = RECORD.unpack_from(data, pos)
        pos += RECORD.size
        if numel >= MAX_NUMEL:
            raise PayloadError(f"{where}: numel {numel} exceeds 2^40")
        if nnz > numel:
            raise PayloadError(f"{where}: {nnz} entries for {numel} elements")
        if pad != b"\0\0\0":
            raise PayloadError(f"{where}: reserved record bytes are set")
        if enc not in ENCODING_NAMES:
            raise PayloadError(f"{where}: unknown index encoding {enc}")
        if pos + idx_len + nnz * vsize > end:
            raise PayloadError(f"{where}: index and value sections run past the end")
        section = data[pos: pos + idx_len]
        pos += idx_len
        ref = None
        if enc == REFERENCE_BITMASK:
            ref = reference[t] if reference is not None else None
            if ref is None:
                raise PayloadError(f"{where}: encoded against a reference support, but no "
                                   "reference was given to decode()")
        indices = _decode_indices(section, enc, numel, nnz, ref, where)
        raw = data[pos: pos + nnz * vsize]
        pos += nnz * vsize
        values = torch.frombuffer(bytearray(raw), dtype=vdtype) if nnz else torch.empty(
            0, dtype=vdtype)
        if nonfinite == "raise" and nnz and not bool(torch.isfinite(values).all()):
            raise PayloadError(f"{where}: non-finite values (policy nonfinite='raise')")
        chunks.append(SparseChunk(numel, indices, values))
    if pos != end:
        raise PayloadError(f"{end - pos} unexpected bytes after the last tensor")
    return chunks


def decode_tiled(data: bytes | bytearray | memoryview, starts: Sequence[int],
                 numels: Sequence[int], numel: int, *,
                 reference: Sequence[Tensor | None] | None = None, nonfinite: str = "raise",
                 max_bytes: int = DEFAULT_MAX_BYTES, backend: str | None = None):
    """A payload straight into the tiled layout the server's merge reads
    (`ops.TiledPayload` over a flat space of `numel` elements, tensor t placed at
    `starts[t]`, expected to hold `numels[t]` elements): the C++ decoder writes the int16
    tile offsets itself; the reference decodes, then tiles.  Values keep the payload's
    dtype.  Raises PayloadError like decode()."""
    from sparsefl.ops.tiled import TiledPayload, tile_payload

    if _native(backend):
        data, _, _ = _check_header(data, reference, nonfinite, max_bytes,
                                   crc=not _crc_builtin())
        try:
            offsets, local, values = torch.ops.sparsefl_C.codec_decode_tiled(
                _as_tensor(data),
                list(reference) if reference is not None else [], nonfinite == "allow",
                list(starts), list(numels), numel)
        except (ValueError, RuntimeError) as e:
            raise PayloadError(str(e).split("\n")[0]) from None
        return TiledPayload(offsets, local, values, numel)
    chunks = decode(data, reference=reference, nonfinite=nonfinite, max_bytes=max_bytes,
                    backend="reference")
    if [c.numel for c in chunks] != list(numels):
        raise PayloadError(f"payload does not match the model layout ({len(chunks)} tensors, "
                           f"expected {len(numels)})")
    if not chunks:
        return tile_payload(torch.empty(0, dtype=torch.int64), torch.empty(0), numel,
                            backend="reference")
    return tile_payload([c.indices for c in chunks], [c.values for c in chunks], numel,
                        starts=list(starts), backend="reference")


def _decode_indices(section: bytes, enc: int, numel: int, nnz: int, ref: Tensor | None,
                    where: str) -> Tensor:
    if enc == DENSE:
        if section or nnz != numel:
            raise PayloadError(f"{where}: dense encoding needs nnz == numel and no index bytes")
        return torch.arange(numel, dtype=torch.int64)
    if enc == INT32_LIST:
        if len(section) != 4 * nnz or numel >= 2**31:
            raise PayloadError(f"{where}: int32 index section of {len(section)} bytes for "
                               f"{nnz} entries (numel {numel})")
        idx = np.frombuffer(section, dtype="<i4").astype(np.int64)
    elif enc in (DELTA_VARINT, RICE):
        gaps = (_varint_decode if enc == DELTA_VARINT else _rice_decode)(section, nnz, where)
        # the float sum guards the int64 cumsum below against overflow
        if np.any(gaps < 0) or float(gaps.sum(dtype=np.float64)) + nnz > numel:
            raise PayloadError(f"{where}: index gaps run past numel {numel}")
        idx = np.cumsum(gaps + 1) - 1
    else:
        space = numel if enc == BITMASK else (ref.numel() if ref is not None else 0)
        if len(section) != (space + 7) // 8:
            raise PayloadError(f"{where}: bitmask of {len(section)} bytes for {space} bits")
        bits = np.unpackbits(np.frombuffer(section, dtype=np.uint8), bitorder="little")
        if bits[space:].any():
            raise PayloadError(f"{where}: bitmask padding bits are set")
        pos = np.flatnonzero(bits[:space])
        if pos.size != nnz:
            raise PayloadError(f"{where}: bitmask has {pos.size} bits set, header says {nnz}")
        if enc == REFERENCE_BITMASK:
            r = ref.cpu().numpy().astype(np.int64)
            if r.size and (r[0] < 0 or r[-1] >= numel or np.any(np.diff(r) <= 0)):
                raise PayloadError(f"{where}: the reference support is not ascending in "
                                   f"[0, {numel})")
            pos = r[pos]
        idx = pos.astype(np.int64)
    if idx.size and (idx[0] < 0 or idx[-1] >= numel or np.any(np.diff(idx) <= 0)):
        raise PayloadError(f"{where}: indices are not strictly ascending in [0, {numel})")
    return torch.from_numpy(np.ascontiguousarray(idx))


# ----------------------------------------------------------------- helpers -------------

def dense_bytes(numel: int, dtype: torch.dtype = torch.float32) -> int:
    """What the same tensor costs sent dense (for compression ratios)."""
    return numel * torch.empty(0, dtype=dtype).element_size()


def split_flat(indices: Tensor, values: Tensor, numels: Sequence[int]) -> list[SparseChunk]:
    """Cut a flat (concatenated) top-k result into one chunk per tensor."""
    bounds = torch.tensor([0, *np.cumsum(numels).tolist()], dtype=torch.int64,
                          device=indices.device)
    cuts = torch.searchsorted(indices, bounds).tolist()
    return [SparseChunk(n, indices[a:b] - int(bounds[i]), values[a:b])
            for i, (n, a, b) in enumerate(zip(numels, cuts[:-1], cuts[1:]))]
