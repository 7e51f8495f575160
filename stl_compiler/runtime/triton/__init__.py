"""The Triton kernels of the STL ops and their launchers, one kernel family per module
(importing this package needs ``triton``; :mod:`..triton_kernels` imports it when it can):

- :mod:`.common`: support limits, launch configs (``CONFIGS``), the ``@triton.jit`` helpers
  every family shares, and the launch helpers (:func:`.common.launch` goes through
  ``torch.library.wrap_triton``, so torch.compile sees the launches);
- :mod:`.tile`: ``stl::encode``, ``stl::decode``, ``stl::decode_epilogue``;
- :mod:`.fused_act`: ``stl::decode_act_encode``, ``stl::decode_glu_encode``;
- :mod:`.row_norm`: ``stl::decode_norm_encode``;
- :mod:`.softmax`: ``stl::decode_softmax_encode``.

A launcher takes the op's arguments (after the op's own checks, on tensors the kernels
support: :func:`..triton_kernels.launcher` decides) and returns the op's outputs.
"""

from . import common, fused_act, row_norm, softmax, tile
from .common import (
    CONFIGS,
    KERNEL_DEVICE,
    MAX_ENCODER_RANK,
    MAX_RANK,
    encoder_chunks,
    padded_rank,
    supports,
)
from .fused_act import decode_act_encode, decode_glu_encode
from .row_norm import decode_norm_encode
from .softmax import decode_softmax_encode
from .tile import decode, decode_epilogue, encode

#: The kernels each op launches (``stl::<name>``), for torch's compile caches: a cached
#: graph that calls an op is keyed by the source of these kernels.
KERNELS = {
    "encode": (tile._encode_kernel,),
    "decode": (tile._decode_kernel,),
    "decode_epilogue": (tile._decode_kernel,),
    "decode_act_encode": (fused_act._decode_act_encode_kernel,),
    "decode_glu_encode": (fused_act._decode_glu_encode_kernel,),
    "decode_norm_encode": (row_norm._decode_norm_encode_kernel,),
    "decode_softmax_encode": (softmax._decode_softmax_encode_kernel,),
}

__all__ = ["CONFIGS", "KERNELS", "KERNEL_DEVICE", "MAX_ENCODER_RANK", "MAX_RANK", "common",
           "decode", "decode_act_encode", "decode_epilogue", "decode_glu_encode",
           "decode_norm_encode", "decode_softmax_encode", "encode", "encoder_chunks",
           "padded_rank", "supports"]
