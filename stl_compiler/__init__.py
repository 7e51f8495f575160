"""stl-compiler: replace matrix multiplications with the Strassen-Tile (STL) operator.

Public API::

    import stl_compiler as stl
    basis = stl.bases.strassen(4)
    y = stl.stl_matmul(x, w, basis)
    layer = stl.STLLinear.from_linear(linear, basis)
    fast = stl.stl_compile(model, (x,), stl.STLConfig(rank=24))
    stl.exporters.export_onnx(fast, (x,), "model.onnx")
"""

from . import bases, exporters, fit, generation, runtime
from .api import stl_compile
from .bases import STLBasis
from .config import STLConfig
from .convert import swap_linears_
from .fit import calibrate, distill, export_safetensors, fit_basis, load_checkpoint, save_checkpoint
from .functional import dense_flops, stl_flops, stl_matmul, stl_matmul_reference
from .nn import STLLinear, STLMatmul
from .report import STLReport

__all__ = [
    "STLBasis",
    "STLConfig",
    "STLLinear",
    "STLMatmul",
    "STLReport",
    "bases",
    "calibrate",
    "dense_flops",
    "distill",
    "export_safetensors",
    "exporters",
    "fit",
    "fit_basis",
    "generation",
    "load_checkpoint",
    "runtime",
    "save_checkpoint",
    "stl_compile",
    "stl_flops",
    "stl_matmul",
    "stl_matmul_reference",
    "swap_linears_",
]
__version__ = "0.1.0"
