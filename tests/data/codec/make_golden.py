"""Writes the golden payloads of tests/test_codec_golden.py: one per index encoding and
value dtype, from fixed chunks, with a manifest of what each decodes to.

Run it only when the payload format changes on purpose (a new VERSION): the test exists
to fail when encoder and decoder change together by accident.

    .venv/bin/python tests/data/codec/make_golden.py
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sparsefl import codec

HERE = Path(__file__).parent


def cases() -> dict[str, tuple[list[codec.SparseChunk], torch.dtype, list | None]]:
    """name -> (chunks, value dtype, reference or None); each forces one encoding."""
    g = torch.Generator().manual_seed(2026)

    def vals(n: int) -> torch.Tensor:
        return torch.randn(n, generator=g) * 3

    def chunk(numel: int, idx) -> codec.SparseChunk:
        idx = torch.as_tensor(idx, dtype=torch.int64)
        return codec.SparseChunk(numel, idx, vals(idx.numel()))

    rice_idx = torch.randperm(100_000, generator=g)[:1000].sort().values
    half = torch.randperm(4096, generator=g)[:2048].sort().values
    ref = torch.randperm(50_000, generator=g)[:5000].sort().values
    inside = ref[torch.randperm(5000, generator=g)[:2000].sort().values]
    out = {
        "int32_list": ([chunk(2**31 - 1, [2**30 + 5])], torch.float32, None),
        "delta_varint": ([chunk(1000, [3])], torch.float32, None),
        "bitmask": ([chunk(4096, half)], torch.float16, None),
        "dense": ([chunk(300, range(300))], torch.bfloat16, None),
        "reference_bitmask": ([chunk(50_000, inside)], torch.float16, [ref]),
        "rice": ([chunk(100_000, rice_idx)], torch.float32, None),
        "mixed": ([chunk(1000, [3]), chunk(4096, half), chunk(7, []),
                   chunk(100_000, rice_idx)], torch.bfloat16, None),
        "empty": ([], torch.float32, None),
    }
    return out


def digest(chunks: list[codec.SparseChunk]) -> list[dict]:
    return [{"numel": c.numel, "nnz": int(c.indices.numel()),
             "indices_sha256": hashlib.sha256(c.indices.numpy().tobytes()).hexdigest(),
             "values_sha256": hashlib.sha256(c.values.float().numpy().tobytes()).hexdigest()}
            for c in chunks]


def main() -> None:
    manifest = {}
    for name, (chunks, dtype, ref) in cases().items():
        data = codec.encode(chunks, dtype, reference=ref, backend="reference")
        (HERE / f"{name}.bin").write_bytes(data)
        if ref is not None:
            (HERE / f"{name}.ref").write_bytes(ref[0].numpy().astype("<i8").tobytes())
        dec = codec.decode(data, reference=ref, backend="reference")
        manifest[name] = {"value_dtype": str(dtype), "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest(), "chunks": digest(dec)}
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
