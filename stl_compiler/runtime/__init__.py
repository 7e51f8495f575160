"""Runtime: the STL custom ops (CPU composite, CUDA Triton kernels), ONNX Runtime sessions."""

from . import ops, stl_gemm, triton_kernels  # triton_kernels: which calls take the Triton kernels
from .ops import DECOMPOSITIONS, decode, encode
from .ort import ORTSession, ort_session

__all__ = ["ops", "stl_gemm", "triton_kernels", "encode", "decode", "DECOMPOSITIONS", "ORTSession",
           "ort_session"]
