"""stl-compiler: replace matrix multiplications with the Strassen-Tile (STL) operator.

Public API::

    import stl_compiler as stl
    basis = stl.bases.strassen(4)
    y = stl.stl_matmul(x, w, basis)
    layer = stl.STLLinear.from_linear(linear, basis)
"""

from . import bases, runtime
from .bases import STLBasis
from .config import STLConfig
from .convert import swap_linears_
from .functional import dense_flops, stl_flops, stl_matmul, stl_matmul_reference
from .nn import STLLinear

__all__ = [
    "STLBasis",
    "STLConfig",
    "STLLinear",
    "bases",
    "dense_flops",
    "runtime",
    "stl_flops",
    "stl_matmul",
    "stl_matmul_reference",
    "swap_linears_",
]
__version__ = "0.1.0"
