"""Sparse layers: Powerprop Conv2d/Linear with activation pruning, and converters."""

from sparsefl.nn.powerprop import PowerpropConv2d, PowerpropLinear, powerprop, to_omega
from sparsefl.nn.sparse_compute import set_compute
from sparsefl.nn.sparsify import layer_sparsity, prunable, set_activation_density, sparsify

__all__ = ["PowerpropConv2d", "PowerpropLinear", "layer_sparsity", "powerprop", "prunable",
           "set_activation_density", "set_compute", "sparsify", "to_omega"]
