"""Client optimizers of the SAM family, fused underneath (see sparsefl.ops.sam)."""

from sparsefl.optim.agnostic_sam import AgnosticSAM
from sparsefl.optim.asam import ASAM
from sparsefl.optim.sam import SAM

__all__ = ["ASAM", "SAM", "AgnosticSAM"]
