"""Accuracy tools: basis fitting (class 0), per-layer calibration and distillation."""

from .alpha import basis_alpha, two_four_alpha
from .calibrate import CalibrationTable, calibrate, row_separable_basis
from .distill import distill
from .fitting import balance, fit_basis

__all__ = ["CalibrationTable", "balance", "basis_alpha", "calibrate", "distill", "fit_basis",
           "row_separable_basis", "two_four_alpha"]
