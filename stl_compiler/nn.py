"""Modules: :class:`STLLinear`, the drop-in STL replacement of ``nn.Linear``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .bases import STLBasis, _check_tile_rank
from .functional import (
    check_matmul_operands,
    check_operand,
    dense_flops,
    stl_flops,
    stl_product,
)
from .runtime.ops import decode, decode_epilogue, encode
from .tiling import (
    causality_message,
    check_row_grouping,
    group_rows,
    is_causal,
    is_row_separable,
    round_up,
    row_mixing_message,
    ungroup_rows,
)

__all__ = ["STLLinear", "STLMatmul"]


class STLLinear(nn.Module):
    """``y = STL(x, Wᵀ) + b`` with the weight kept pre-encoded.

    Parameters (all trainable, all in ``state_dict``):
        weight_encoded: ``(rank, K/t, M/t)`` (K, M padded to the tile), the encoded ``Wᵀ``:
            a free "fake encoding" (paper remark 3.2) once training starts.
        ex, d: ``(rank, t*t)`` activation encoder and decoder.
        bias: ``(M,)`` or None.

    Args:
        in_features, out_features: K and M.
        tile, rank: tile side t and tensor rank r.
        bias: whether to hold a bias.
        row_grouping: which rows share a tile. ``"tokens"``: t consecutive positions of one
            sequence (dim -2 of the input). ``"causal"``: the same tiles, with a causal basis
            (:func:`~stl_compiler.tiling.is_causal`: no position's output depends on a later
            position). ``"batch"``: the same position in t sequences (all leading dims are
            sequences; a 2-D input is N sequences of length 1); it takes only row-separable
            bases (:func:`~stl_compiler.tiling.is_row_separable`), which keep the sequences
            of a tile independent. With an inexact basis, an output row depends on the other
            rows of its tile: "causal" and "batch" are the causality-safe choices for
            autoregressive decoders; :meth:`load_basis` raises ValueError for a basis that
            breaks the grouping's promise.
        train_basis: when False, ``ex`` and ``d`` are frozen (``requires_grad=False``).
    """

    def __init__(self, in_features: int, out_features: int, tile: int, rank: int, *,
                 bias: bool = True, row_grouping: str = "tokens", train_basis: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__()
        check_row_grouping(row_grouping)
        _check_tile_rank(tile, rank)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"features must be >= 1, got {in_features} -> {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.tile, self.rank, self.row_grouping = tile, rank, row_grouping
        kw = {"device": device, "dtype": dtype}
        kp, mp = round_up(in_features, tile), round_up(out_features, tile)
        self.weight_encoded = nn.Parameter(torch.zeros(rank, kp // tile, mp // tile, **kw))
        self.ex = nn.Parameter(torch.zeros(rank, tile * tile, **kw), requires_grad=train_basis)
        self.d = nn.Parameter(torch.zeros(rank, tile * tile, **kw), requires_grad=train_basis)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, basis: STLBasis, row_grouping: str = "tokens",
                    train_basis: bool = True, keep_reference: bool = False) -> STLLinear:
        """Encode an existing ``nn.Linear`` with ``basis.ew``; exact bases reproduce it.

        With ``keep_reference=True`` the dense weight stays attached as the non-persistent
        buffer ``reference_weight`` ``(out, in)`` (no copy: it is the linear's own tensor) so
        that :func:`stl_compiler.calibrate` can fit the layer to the dense output; drop it with
        ``del module.reference_weight`` once calibrated.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        return cls.from_weight(linear.weight.t(), linear.bias, basis, row_grouping=row_grouping,
                               train_basis=train_basis, keep_reference=keep_reference)

    @classmethod
    def from_weight(cls, weight_t: Tensor, bias: Tensor | None, basis: STLBasis,
                    row_grouping: str = "tokens", train_basis: bool = True,
                    keep_reference: bool = False) -> STLLinear:
        """Build the layer ``y = x @ weight_t + bias`` from ``weight_t (in, out)``.

        This is the STL "W" orientation (``nn.Linear.weight.t()``, HF ``Conv1D.weight``).
        """
        if not isinstance(basis, STLBasis):
            raise TypeError(f"basis must be an STLBasis, got {type(basis).__name__}")
        check_operand(weight_t, "weight")
        if weight_t.dim() != 2:
            raise ValueError(f"weight must be 2-D (in, out), got shape {tuple(weight_t.shape)}")
        weight_t = weight_t.detach()
        module = cls(weight_t.shape[0], weight_t.shape[1], basis.tile, basis.rank,
                     bias=bias is not None, row_grouping=row_grouping,
                     train_basis=train_basis, device=weight_t.device, dtype=weight_t.dtype)
        module.load_basis(basis, weight_t)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        if keep_reference:
            module.register_buffer("reference_weight", weight_t.t(), persistent=False)
        return module

    @torch.no_grad()
    def load_basis(self, basis: STLBasis, weight_t: Tensor) -> None:
        """Set ``ex``, ``d`` from ``basis`` and encode ``weight_t (K, M)`` with ``basis.ew``.

        With ``row_grouping="batch"`` the basis must be row-separable, with ``"causal"``
        causal (ValueError otherwise).
        """
        if (basis.tile, basis.rank) != (self.tile, self.rank):
            raise ValueError(f"basis has tile={basis.tile}, rank={basis.rank}; this layer has "
                             f"tile={self.tile}, rank={self.rank}")
        if self.row_grouping == "batch" and not is_row_separable(basis):
            raise ValueError(row_mixing_message(basis))
        if self.row_grouping == "causal" and not is_causal(basis):
            raise ValueError(causality_message(basis))
        ex, ew, d = basis.to(torch.float64, weight_t.device)
        self.weight_encoded.copy_(encode(weight_t.double(), ew, self.tile))
        self.ex.copy_(ex)
        self.d.copy_(d)

    #: Set on "causal" layers by :func:`stl_compiler.generation.enable_incremental`: the model's
    #: incremental-decoding state (a :class:`~stl_compiler.generation.GenerationState`) and
    #: this layer's key in it. While a model call with a KV cache is in progress, the state
    #: prepends the earlier rows of the current tile, so that a call with only the new tokens
    #: computes what a full forward computes.
    _stl_generation: Any = None
    _stl_generation_key: str = ""

    def forward(self, x: Tensor) -> Tensor:
        check_operand(x, "input", min_dim=1)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects "
                             f"{self.in_features} (input shape {tuple(x.shape)})")
        generation = self._stl_generation
        if generation is not None and generation.active:
            return generation.layer_forward(self, x)
        return self.forward_tiles(x)

    def forward_tiles(self, x: Tensor) -> Tensor:
        """The STL product of ``x`` as it is, without incremental-decoding state: with "causal"
        or "tokens" grouping, dim -2 of ``x`` holds positions 0, 1, ... of the tiles."""
        squeeze = x.dim() == 1
        if squeeze:
            x = x.unsqueeze(0)
        rows = group_rows(x, self.row_grouping)
        encoded = encode(rows, self.ex, self.tile)
        flat = encoded.reshape(self.rank, -1, encoded.shape[-1])
        product = torch.bmm(flat, self.weight_encoded)
        product = product.reshape(self.rank, *rows.shape[:-2], -1, product.shape[-1])
        if self.bias is None:
            y = decode(product, self.d, self.tile, rows.shape[-2], self.out_features)
        else:  # the bias add rides in the decode's epilogue: no extra pass over the output
            y = decode_epilogue(product, self.d, self.bias, "none", 1.0, self.tile,
                                rows.shape[-2], self.out_features)
        y = ungroup_rows(y, x, self.row_grouping)
        return y.squeeze(0) if squeeze else y

    @property
    def rows_isolated(self) -> bool:
        """Whether each sequence's output is independent of the other sequences batched with
        it: always with "tokens" and "causal" grouping; with "batch" only while ``ex`` and
        ``d`` stay row-separable (training or calibrating them can break that)."""
        return self.row_grouping != "batch" or is_row_separable(self)

    @property
    def keeps_causality(self) -> bool:
        """Whether no position's output depends on a later position of its sequence, by the
        structure of ``ex`` and ``d`` (not by round-off luck): "causal" grouping with a
        causal basis, or "batch" grouping with a row-separable one."""
        if self.row_grouping == "causal":
            return is_causal(self)
        return self.row_grouping == "batch" and is_row_separable(self)

    def flop_ratio(self, rows: int = 4096) -> float:
        """STL FLOPs over dense FLOPs for ``rows`` input rows."""
        k, m = self.in_features, self.out_features
        return stl_flops(rows, k, m, self.tile, self.rank) / dense_flops(rows, k, m)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"tile={self.tile}, rank={self.rank}, row_grouping={self.row_grouping!r}, "
                f"bias={self.bias is not None}, flops={self.flop_ratio():.3f}x dense")


class STLMatmul(nn.Module):
    """Activation × activation STL product ``STL(a, b)`` with trainable ``ex``, ``ew``, ``d``.

    Both operands are encoded at run time (attention QKᵀ and AV); batch dims broadcast as in
    ``torch.matmul``. Used by :func:`stl_compiler.stl_compile` for ``matmul`` sites.
    """

    def __init__(self, basis: STLBasis, *, train_basis: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__()
        if not isinstance(basis, STLBasis):
            raise TypeError(f"basis must be an STLBasis, got {type(basis).__name__}")
        self.tile, self.rank = basis.tile, basis.rank
        ex, ew, d = basis.to(dtype or torch.get_default_dtype(), device)
        self.ex = nn.Parameter(ex, requires_grad=train_basis)
        self.ew = nn.Parameter(ew, requires_grad=train_basis)
        self.d = nn.Parameter(d, requires_grad=train_basis)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        check_matmul_operands(a, b)
        return stl_product(a, b, self.ex, self.ew, self.d, self.tile)

    def extra_repr(self) -> str:
        return f"tile={self.tile}, rank={self.rank}"
