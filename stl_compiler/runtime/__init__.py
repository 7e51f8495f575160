"""Runtime: the STL custom ops (CPU composite, CUDA Triton kernels), ONNX Runtime sessions."""

from . import ops, triton_kernels  # triton_kernels registers the CUDA kernels of the ops
from .ops import DECOMPOSITIONS, decode, encode
from .ort import ORTSession, ort_session

__all__ = ["ops", "triton_kernels", "encode", "decode", "DECOMPOSITIONS", "ORTSession",
           "ort_session"]
