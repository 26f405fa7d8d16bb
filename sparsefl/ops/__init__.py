"""sparsefl.ops: the one door to the kernels.

Every op has a plain-torch reference (sparsefl/ops/reference/), a C++ CPU kernel
(csrc/cpu/), a CUDA kernel (csrc/cuda/) and a Triton kernel (kernels/); the backend is
chosen per call (`backend=`), by SPARSEFL_BACKEND, or automatically by device.
All ops are also registered as torch.ops.sparsefl.*.
"""

from sparsefl.ops._backend import BACKENDS
from sparsefl.ops.aggregate import SparseAccumulator, sparse_aggregate
from sparsefl.ops.batch_norm_act import batch_norm_act, batch_norm_act_backward
from sparsefl.ops.sam import sam_perturb, sam_perturb_, sam_restore_, two_dir_perturb
from sparsefl.ops.sparse_conv import (
    ActPack,
    Support,
    pack_support,
    sparse_act_pack,
    sparse_conv_backward,
    sparse_conv_forward,
)
from sparsefl.ops.sparse_mlp_sgd import sparse_mlp_sgd
from sparsefl.ops.tiled import TILE, TiledPayload, tile_payload
from sparsefl.ops.topk import TopKCompressor, keep_count, topk_compress, topk_mask

__all__ = [
    "batch_norm_act", "batch_norm_act_backward",
    "ActPack", "Support", "pack_support", "sparse_act_pack", "sparse_conv_backward",
    "sparse_conv_forward", "sparse_mlp_sgd",
    "BACKENDS", "TopKCompressor", "keep_count", "sam_perturb", "sam_perturb_", "sam_restore_",
    "SparseAccumulator", "TILE", "TiledPayload", "sparse_aggregate", "tile_payload",
    "topk_compress", "topk_mask", "two_dir_perturb",
]
