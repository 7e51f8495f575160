"""Runtime: the STL custom ops (CPU composite, CUDA Triton kernels)."""

from . import ops
from .ops import DECOMPOSITIONS, decode, encode

__all__ = ["ops", "encode", "decode", "DECOMPOSITIONS"]
