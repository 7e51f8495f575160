"""Deployment of STL models: ONNX, ONNX Runtime, TensorRT, AOTInductor, Triton repositories.

Every exporter decomposes the STL custom ops into plain aten ops first, so the artifacts run
without ``stl_compiler`` and without plugins. onnx, onnxruntime and tensorrt are imported only
by the functions that need them. See docs/deployment.md.
"""

from .aoti import export_aoti, load_aoti
from .onnx import export_onnx, onnx_op_types
from .tensorrt import (
    TensorRTRunner,
    build_tensorrt_engine,
    compile_with_torch_tensorrt,
    tensorrt_supported_ops,
    unsupported_tensorrt_ops,
)
from .triton_repo import write_triton_model_repository

__all__ = [
    "TensorRTRunner",
    "build_tensorrt_engine",
    "compile_with_torch_tensorrt",
    "export_aoti",
    "export_onnx",
    "load_aoti",
    "onnx_op_types",
    "tensorrt_supported_ops",
    "unsupported_tensorrt_ops",
    "write_triton_model_repository",
]
