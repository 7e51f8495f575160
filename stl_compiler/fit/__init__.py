"""Accuracy tools: basis fitting (class 0), per-layer calibration and distillation."""

from .alpha import basis_alpha, two_four_alpha
from .fitting import balance, fit_basis

__all__ = ["balance", "basis_alpha", "fit_basis", "two_four_alpha"]
