"""Runtime: the STL custom ops (CPU composite, CUDA Triton kernels)."""

from . import ops, triton_kernels  # triton_kernels registers the CUDA kernels of the ops
from .ops import DECOMPOSITIONS, decode, encode

__all__ = ["ops", "triton_kernels", "encode", "decode", "DECOMPOSITIONS"]
