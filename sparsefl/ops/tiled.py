"""Tiled payload layout: a sparse update cut the way the aggregation merge reads it.

The C++ merge (csrc/cpu/aggregate.cpp) walks the output in tiles of TILE elements and adds
every client's entries of a tile into an L1-resident float64 accumulator.  With flat
indices it must find where each client's run of a tile ends (a scan of the indices) and
read 4 or 8 bytes per index.  A TiledPayload carries that work done once, where the
payload is made (a client, or the decoder):

    offsets  int32 [tiles + 1]   tile t's entries are local[offsets[t]:offsets[t+1]]
    local    int16 [nnz]         index - t * TILE, strictly ascending within the tile
    values   float [nnz]         float32 / float16 / bfloat16
    numel    int                 the flat size; tiles = ceil(numel / TILE)

Same entries, same sums: aggregating a TiledPayload gives the bits of its flat pair.
A dense update is `offsets` and `local` empty with numel values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from sparsefl.ops import _backend

TILE = 4096  # = kTile in csrc/cpu/aggregate.cpp (the kernel rejects offsets of another length)


class TiledPayload(NamedTuple):
    offsets: Tensor
    local: Tensor
    values: Tensor
    numel: int


def num_tiles(numel: int) -> int:
    return -(-numel // TILE)


_lib = torch.library.Library("sparsefl", "FRAGMENT")
_lib.define("tile_indices(Tensor[] pieces, int[] starts, int numel, str backend) "
            "-> (Tensor, Tensor)")


def _checked_flat(pieces: Sequence[Tensor], starts: Sequence[int], numel: int) -> Tensor:
    """The flat index sequence, after checking dtypes, strict ascent and range."""
    if len(pieces) != len(starts):
        raise ValueError(f"sparsefl.tile_indices: {len(pieces)} index tensors and "
                         f"{len(starts)} starts")
    for i, (p, s) in enumerate(zip(pieces, starts)):
        if p.dim() != 1 or p.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"sparsefl.tile_indices: indices[{i}] must be a 1-D int64 or "
                             "int32 tensor")
        if not 0 <= s <= numel:
            raise ValueError(f"sparsefl.tile_indices: start {i} ({s}) is outside [0, {numel}]")
    device = pieces[0].device if pieces else torch.device("cpu")
    flat = torch.cat([p.long() + s for p, s in zip(pieces, starts)]) if pieces else \
        torch.empty(0, dtype=torch.int64, device=device)
    if flat.numel() >= 2**31 - 1:
        raise ValueError(f"sparsefl.tile_indices: {flat.numel()} entries; a tiled payload "
                         "holds fewer than 2^31")
    if flat.numel() and (int(flat[0]) < 0 or int(flat[-1]) >= numel
                         or bool((flat[1:] <= flat[:-1]).any())):
        raise ValueError("sparsefl.tile_indices: the flat indices are not strictly ascending "
                         f"in [0, {numel})")
    return flat


def _reference_tile_indices(pieces: Sequence[Tensor], starts: Sequence[int], numel: int
                            ) -> tuple[Tensor, Tensor]:
    """Plain torch: concatenate, check, cut (the definition the C++ pass is tested against)."""
    flat = _checked_flat(pieces, starts, numel)
    device = flat.device
    starts_t = torch.arange(0, num_tiles(numel) + 1, device=device) * TILE
    return (torch.searchsorted(flat, starts_t, out_int32=True),
            (flat & (TILE - 1)).to(torch.int16))


def _impl(pieces, starts, numel, backend):
    # no CUDA tile kernel: "cuda" is the reference's torch ops on the device (documented)
    req = _backend.requested(backend)
    name = _backend.resolve("reference" if req == "cuda" else req, list(pieces),
                            native_op="tile_indices", triton=True)
    if name == "cpp":
        return torch.ops.sparsefl_C.tile_indices(pieces, starts, numel)
    if name == "triton":
        _triton = _backend.triton_module("aggregate")

        _checked_flat(pieces, starts, numel)
        return _triton.tile_indices(pieces, starts, numel)
    return _reference_tile_indices(pieces, starts, numel)


_lib.impl("tile_indices", _impl, "CompositeExplicitAutograd")


@torch.library.register_fake("sparsefl::tile_indices", lib=_lib)
def _(pieces, starts, numel, backend):
    total = sum(p.shape[0] for p in pieces)
    return (pieces[0].new_empty(num_tiles(numel) + 1, dtype=torch.int32),
            pieces[0].new_empty(total, dtype=torch.int16))


def tile_payload(indices: Tensor | Sequence[Tensor], values: Tensor | Sequence[Tensor],
                 numel: int, *, starts: Sequence[int] | None = None, which: int = 0,
                 backend: str | None = None) -> TiledPayload:
    """The tiled form of a flat (indices, values) pair over `numel` elements.

    indices: 1-D int64/int32, strictly ascending in [0, numel); an empty index tensor with
    numel values is a dense update.  Or pieces (e.g. a model's per-layer index tensors) with
    `starts` (each piece's flat offset) and a list of value tensors: cut in one pass, with
    no flat copy made.  Raises ValueError (naming payload `which`) otherwise.
    """
    if isinstance(indices, Tensor):
        if indices.dim() != 1 or not isinstance(values, Tensor) or values.dim() != 1:
            raise ValueError(f"sparsefl.aggregate: payload {which} indices and values must "
                             "be 1-D tensors")
        if indices.numel() == 0 and values.numel() == numel and numel > 0:
            return TiledPayload(torch.empty(0, dtype=torch.int32),
                                torch.empty(0, dtype=torch.int16), values, numel)
        pieces, starts = [indices], [0]
    else:
        pieces, starts = list(indices), list(starts if starts is not None else [0] * len(indices))
        values = torch.cat(list(values)) if len(values) else torch.empty(0)
    total = sum(p.numel() for p in pieces)
    if total != values.numel():
        raise ValueError(f"sparsefl.aggregate: payload {which} has {total} indices and "
                         f"{values.numel()} values")
    try:
        offsets, local = torch.ops.sparsefl.tile_indices(pieces, starts, numel,
                                                         _backend.requested(backend))
    except ValueError as e:
        # the op checks dtypes, order and range; the message says which payload
        raise ValueError(f"sparsefl.aggregate: payload {which}: {e}") from None
    return TiledPayload(offsets, local, values, numel)


def untile(p: TiledPayload, which: int = 0) -> tuple[Tensor, Tensor]:
    """The flat (int64 indices, values) pair of a tiled payload, after checking the tile
    structure (offsets rise from 0 to nnz; local indices lie in their tile).  Order within
    a tile is left to the flat check.  Raises ValueError."""
    offsets, local, values, numel = p
    tiles = num_tiles(numel)
    if offsets.numel() == 0 and local.numel() == 0 and values.numel() == numel and numel > 0:
        return torch.empty(0, dtype=torch.int64, device=values.device), values
    if offsets.dtype != torch.int32 or offsets.dim() != 1 or offsets.numel() != tiles + 1:
        raise ValueError(f"sparsefl.aggregate: offsets[{which}] must be a 1-D int32 tensor "
                         f"with {tiles + 1} entries (tiles of {TILE})")
    if local.dtype != torch.int16 or local.dim() != 1:
        raise ValueError(f"sparsefl.aggregate: local[{which}] must be a 1-D int16 tensor")
    if local.numel() != values.numel():
        raise ValueError(f"sparsefl.aggregate: payload {which} has {local.numel()} indices "
                         f"and {values.numel()} values")
    counts = offsets.long().diff()
    if int(offsets[0]) != 0 or int(offsets[-1]) != values.numel() or bool((counts < 0).any()):
        raise ValueError(f"sparsefl.aggregate: offsets[{which}] must rise from 0 to "
                         f"{values.numel()} without falling")
    tile = torch.repeat_interleave(torch.arange(tiles, device=local.device), counts.to(
        local.device))
    idx = tile * TILE + local.long()
    length = torch.clamp(numel - tile * TILE, max=TILE)
    if bool(((local < 0) | (local.long() >= length)).any()):
        raise ValueError(f"sparsefl.aggregate: payload {which} local indices are not strictly "
                         "ascending in [0, tile length)")
    return idx, values
