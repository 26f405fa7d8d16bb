"""Flatness analysis: Hessian top eigenvalue (power iteration) and trace (Hutchinson)."""

from sparsefl.analysis.hessian import HessianProbe, flatness, plain_copy

__all__ = ["HessianProbe", "flatness", "plain_copy"]
