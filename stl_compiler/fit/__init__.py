"""Accuracy tools: basis fitting (class 0), per-layer calibration and distillation (in one
process or on torch.distributed), checkpoints."""

from .alpha import basis_alpha, two_four_alpha
from .calibrate import CalibrationTable, calibrate, row_separable_basis
from .checkpoint import export_safetensors, load_checkpoint, save_checkpoint
from .distill import distill
from .fitting import balance, fit_basis

__all__ = ["CalibrationTable", "balance", "basis_alpha", "calibrate", "distill",
           "export_safetensors", "fit_basis", "load_checkpoint", "row_separable_basis",
           "save_checkpoint", "two_four_alpha"]
