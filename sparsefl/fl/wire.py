"""Model state <-> payload bytes through `sparsefl.codec`.

A payload holds one chunk per layout entry, in layout order.  Prunable entries carry
only their non-zero (downlink) or selected top-k (uplink) positions; the rest are dense.
Bytes counted by the engine are `len()` of what `encode` returns: nothing is estimated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sparsefl import codec, ops
from sparsefl.fl.layout import Layout


def chunks_from_flat(layout: Layout, flat: Tensor,
                     selected: dict[str, Tensor] | None = None) -> list[codec.SparseChunk]:
    """One chunk per entry: `selected[name]` (ascending local indices) where given, the
    non-zeros for other prunable entries, everything for dense ones."""
    idxs, vals = [], []
    for e in layout.entries:
        piece = flat[e.offset:e.offset + e.numel]
        if selected is not None and e.name in selected:
            idx = selected[e.name].to(flat.device)
        elif e.prunable:
            idx = piece.nonzero().flatten()
        else:
            idx = torch.arange(e.numel, device=flat.device)
        idxs.append(idx)
        vals.append(piece[idx])
    if flat.device.type != "cpu":
        idxs, vals = _to_host(idxs, vals)
    return [codec.SparseChunk(e.numel, i, v) for e, i, v in zip(layout.entries, idxs, vals)]


def _to_host(idxs: list[Tensor], vals: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Every chunk's indices and float32 values in one device-to-host copy: the values'
    bits ride as int64 beside the indices and are reinterpreted on the host."""
    sizes = [len(i) for i in idxs]
    n = sum(sizes)
    bits = torch.cat(vals).float().view(torch.int32).long() if vals else torch.empty(0)
    host = torch.cat([torch.cat(idxs).long(), bits]).cpu()
    idx_all, val_all = host[:n], host[n:].int().view(torch.float32)
    return list(idx_all.split(sizes)), list(val_all.split(sizes))


def supports(layout: Layout, flat: Tensor) -> list[Tensor | None]:
    """Non-zero positions of each prunable entry (the reference both sides know), on the
    host where the codec reads them (one copy from a device)."""
    refs = [flat[e.offset:e.offset + e.numel].nonzero().flatten() if e.prunable else None
            for e in layout.entries]
    present = [r for r in refs if r is not None]
    if flat.device.type == "cpu" or not present:
        return refs
    host = iter(torch.cat(present).cpu().split([len(r) for r in present]))
    return [next(host) if r is not None else None for r in refs]


def encode(chunks: Sequence[codec.SparseChunk],
           reference: Sequence[Tensor | None] | None = None) -> bytes:
    return codec.encode(chunks, torch.float32, reference=reference)


def decode(layout: Layout, data: bytes, reference: Sequence[Tensor | None] | None = None,
           nonfinite: str = "raise") -> list[codec.SparseChunk]:
    chunks = codec.decode(data, reference=reference, nonfinite=nonfinite)
    if len(chunks) != len(layout.entries) or any(
            c.numel != e.numel for c, e in zip(chunks, layout.entries)):
        raise codec.PayloadError("payload does not match the model layout "
                                 f"({len(chunks)} tensors, expected {len(layout.entries)})")
    return chunks


def decode_tiled(layout: Layout, data: bytes,
                 reference: Sequence[Tensor | None] | None = None,
                 nonfinite: str = "raise") -> ops.TiledPayload:
    """A payload decoded straight into the tiled layout of the flat space (the C++
    decoder writes the merge's int16 tile offsets itself); PayloadError as decode()."""
    return codec.decode_tiled(data, [e.offset for e in layout.entries],
                              [e.numel for e in layout.entries], layout.numel,
                              reference=reference, nonfinite=nonfinite)


def to_flat_pair(layout: Layout, chunks: Sequence[codec.SparseChunk],
                 compact: bool = False) -> tuple[Tensor, Tensor]:
    """(indices, values) over the flat space, ascending, for sparse_aggregate.

    compact=True gives int32 indices when the model has fewer than 2^31 entries: half the
    index bytes, and the C++ merge runs about a quarter faster on them (same sums).
    """
    itype = torch.int32 if compact and layout.numel < 2**31 else torch.int64
    idx = [c.indices.to(itype) + e.offset for c, e in zip(chunks, layout.entries)]
    val = [c.values.float() for c in chunks]
    return torch.cat(idx), torch.cat(val)


def to_tiled(layout: Layout, chunks: Sequence[codec.SparseChunk]) -> ops.TiledPayload:
    """The payload in the layout the server's merge reads fastest (ops.tile_payload): one
    pass over the per-entry index tensors, no flat copy; the same entries and sums as
    to_flat_pair."""
    return ops.tile_payload([c.indices for c in chunks], [c.values.float() for c in chunks],
                            layout.numel, starts=[e.offset for e in layout.entries])


def to_flat(layout: Layout, chunks: Sequence[codec.SparseChunk]) -> Tensor:
    """The dense flat vector, on the layout's device (built on the host, one copy)."""
    idx, val = to_flat_pair(layout, chunks)
    return torch.zeros(layout.numel).index_copy_(0, idx, val).to(layout.device)
