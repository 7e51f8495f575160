"""Triton kernels of the STL ops against float64 references.

``TestInterpreted`` runs in CI: the kernel package ``stl_compiler/runtime/triton`` is loaded
as a separate package copy while ``TRITON_INTERPRET=1`` is set (``triton.jit`` reads it when it
decorates), so its kernels run on CPU tensors under Triton's interpreter whatever was imported
before. ``TestCUDA`` runs the compiled kernels through the ops on a GPU (the device machine:
``benchmarks/gpu_check.py``, ``benchmarks/gpu_triton_op_check.py``) and checks gradients
against the aten path.

Every run fills its output with NaN first (through ``common.new_output``), so an element no program
writes fails the check.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

from stl_compiler.runtime import ops

pytest.importorskip("triton")
# The sigmoid of a large negative fp32 overflows exp() to inf and correctly gives 0; numpy (the
# interpreter) warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
ACTIVATIONS = sorted(ops.ACTIVATIONS)


def _load_interpreted() -> ModuleType:
    """A copy of the kernel package whose kernels were decorated under TRITON_INTERPRET=1
    (its modules load as submodules of the copy, so they are interpreted too)."""
    name = "stl_compiler.runtime._triton_interpreted"
    if name in sys.modules:
        return sys.modules[name]
    package = Path(ops.__file__).with_name("triton")
    spec = importlib.util.spec_from_file_location(name, package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        # Only this copy is interpreted; anything decorated later compiles as usual.
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    assert module.KERNEL_DEVICE == "cpu"
    return module


def _poison(impl: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    def poisoned(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

    monkeypatch.setattr(impl.common, "new_output", poisoned)


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == dtype
    out = out.detach().double().cpu()
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]:.0e} ({dtype})"


def _rand(gen: torch.Generator, *shape: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def _ref(fn: Callable, *args):
    """``fn`` on float64 CPU copies of the tensor arguments."""
    return fn(*[a.detach().double().cpu() if isinstance(a, torch.Tensor) else a for a in args])


# Shapes: tiles per dim that are and are not multiples of the block sizes (BI ≤ 8, BJ ≤ 128),
# partial tiles (sizes not multiples of t=4: encode pads them, decode crops them), several
# batch shapes, ranks below / at / between the padded widths 16, 32, 64.
ENCODE_CASES = [((), 4, 4, 7), ((2,), 35, 163, 24), ((2, 3), 20, 132, 16), ((), 130, 27, 49),
                ((2,), 36, 263, 40), ((), 1, 2, 16)]
#: (batch, tile-rows a, tile-cols c, rank, rows cropped, cols cropped)
DECODE_CASES = [((), 1, 1, 7, 0, 0), ((2,), 9, 41, 24, 1, 3), ((2, 3), 5, 33, 16, 0, 2),
                ((), 33, 7, 49, 3, 0), ((2,), 9, 66, 32, 2, 1)]


def _encode_case(impl, call, gen, device, dtype, batch, n, k, rank, strided):
    if strided:  # a transposed view, as row_grouping="batch" hands over
        x = _rand(gen, n, *batch, k, dtype=dtype, device=device).movedim(0, -2)
    else:
        x = _rand(gen, *batch, n, k, dtype=dtype, device=device)
    basis = _rand(gen, rank, 16, dtype=dtype, device=device)
    _check(call(impl.encode, ops.encode, x, basis, 4), _ref(ops.encode_aten, x, basis, 4), dtype)


def _decode_case(impl, call, gen, device, dtype, batch, a, c, rank, crop_rows, crop_cols,
                 activation, bias_len):
    enc = _rand(gen, rank, *batch, a, c, dtype=dtype, device=device)
    d = _rand(gen, rank, 16, dtype=dtype, device=device)
    rows, cols = a * 4 - crop_rows, c * 4 - crop_cols
    if activation == "none" and bias_len is None:
        args = (enc, d, 4, rows, cols)
        _check(call(impl.decode, ops.decode, *args), _ref(ops.decode_aten, *args), dtype)
        return
    bias = None if bias_len is None else _rand(gen, bias_len, dtype=dtype, device=device)
    args = (enc, d, bias, activation, 0.75, 4, rows, cols)
    _check(call(impl.decode_epilogue, ops.decode_epilogue, *args),
           _ref(ops.decode_epilogue_aten, *args), dtype)


def _act_encode_case(impl, call, gen, device, dtype, batch, a, c, rank, activation, rank2):
    enc = _rand(gen, rank, *batch, a, c, dtype=dtype, device=device)
    d = _rand(gen, rank, 16, dtype=dtype, device=device)
    ex = _rand(gen, rank2, 16, dtype=dtype, device=device)
    bias = _rand(gen, c * 4 - 3, dtype=dtype, device=device)
    args = (enc, d, bias, ex, activation, 0.5, 4, a * 4 - 1, c * 4 - 3)
    _check(call(impl.decode_act_encode, ops.decode_act_encode, *args),
           _ref(ops.decode_act_encode_aten, *args), dtype)


def _glu_case(impl, call, gen, device, dtype, batch, a, c, rank, activation, rank2,
              ex_rank=None):
    """``rank``: gate (and, unless ``ex_rank`` is given, ex) ranks; ``rank2``: up ranks."""
    gate = _rand(gen, rank, *batch, a, c, dtype=dtype, device=device)
    up = _rand(gen, rank2, *batch, a, c, dtype=dtype, device=device)
    gate_d = _rand(gen, rank, 16, dtype=dtype, device=device)
    up_d = _rand(gen, rank2, 16, dtype=dtype, device=device)
    ex = _rand(gen, rank if ex_rank is None else ex_rank, 16, dtype=dtype, device=device)
    up_bias = _rand(gen, c * 4, dtype=dtype, device=device)
    args = (gate, gate_d, None, up, up_d, up_bias, ex, activation, 1.5, 4, a * 4 - 2, c * 4)
    _check(call(impl.decode_glu_encode, ops.decode_glu_encode, *args),
           _ref(ops.decode_glu_encode_aten, *args), dtype)


#: decode_norm_encode: (batch, tile-rows a, tile-cols c, rank, rank2, rows cropped, cols
#: cropped, norm, keep, (bias, residual, weight, norm_bias) present). Every norm with every
#: keep; each optional operand present and absent; ranks 24 → 16, 7 → 49, 16 → 16.
NORM_CASES = [
    ((), 2, 5, 24, 16, 1, 3, "layer", "sum", (True, True, True, True)),
    ((2,), 3, 9, 7, 49, 2, 1, "layer", "normed", (False, True, True, False)),
    ((2, 3), 2, 4, 24, 16, 0, 2, "layer", "none", (True, False, False, True)),
    ((), 3, 7, 7, 49, 3, 0, "rms", "sum", (False, True, True, False)),
    ((2,), 2, 6, 24, 16, 1, 1, "rms", "normed", (False, False, False, False)),
    ((2, 3), 2, 5, 16, 16, 2, 3, "rms", "none", (True, True, True, True)),
]

#: decode_norm_encode with stacked output encoders (Q, K, V: 72 rows; gate, up: 48; 130 = 4
#: chunks of 32 and a partial one): as NORM_CASES, plus the dtype; ``c = None`` is two column
#: blocks. Every keep with both norms and both dtypes, every ex rank with both norms and both
#: dtypes, input ranks 24, 16, 49.
STACKED_CASES = [
    ((), 2, 5, 24, 72, 1, 3, "layer", "sum", (True, True, True, True), torch.bfloat16),
    ((2,), 2, 4, 24, 72, 0, 1, "rms", "normed", (False, True, True, False), torch.bfloat16),
    ((), 3, 3, 16, 72, 2, 0, "rms", "none", (True, True, False, False), torch.float32),
    ((2,), 1, 6, 24, 72, 3, 2, "rms", "sum", (True, True, True, False), torch.float32),
    ((2,), 2, 3, 24, 48, 1, 1, "rms", "sum", (False, True, True, False), torch.bfloat16),
    ((), 2, 5, 49, 48, 0, 2, "layer", "normed", (True, True, True, True), torch.float32),
    ((2,), 1, 4, 24, 48, 2, 0, "layer", "none", (True, False, True, True), torch.bfloat16),
    ((), 1, None, 24, 130, 1, 3, "layer", "sum", (True, True, True, True), torch.float32),
    ((2,), 1, 5, 16, 130, 2, 1, "rms", "normed", (False, True, True, False), torch.float32),
    ((), 2, 4, 24, 130, 0, 0, "layer", "none", (True, True, True, True), torch.bfloat16),
    ((), 2, 3, 49, 130, 3, 2, "layer", "normed", (False, True, False, True), torch.bfloat16),
]

#: The argument names of stl::decode_norm_encode, in order.
NORM_OP_ARGS = list(inspect.signature(ops.decode_norm_encode_aten).parameters)


def _norm_case(impl, call, gen, device, dtype, batch, a, c, rank, rank2, crop_rows, crop_cols,
               norm, keep, present, strided=False, offset=0.0, eps=None, residual_batch=None):
    """``residual_batch``: the residual's own batch dims, broadcast to ``batch``."""
    rows, cols = a * 4 - crop_rows, c * 4 - crop_cols
    has_bias, has_residual, has_weight, has_norm_bias = present
    if strided:  # tile-rows and tile-cols transposed in memory; the residual as in encode
        enc = _rand(gen, rank, *batch, c, a, dtype=dtype, device=device).transpose(-1, -2)
        residual = _rand(gen, rows, *batch, cols, dtype=dtype, device=device).movedim(0, -2)
    else:
        enc = _rand(gen, rank, *batch, a, c, dtype=dtype, device=device)
        residual_batch = batch if residual_batch is None else residual_batch
        residual = _rand(gen, *residual_batch, rows, cols, dtype=dtype, device=device)
    residual = (residual + offset) if has_residual else None
    d = _rand(gen, rank, 16, dtype=dtype, device=device)
    ex = _rand(gen, rank2, 16, dtype=dtype, device=device)
    # A bias shorter than the padded width, as decode_epilogue takes it.
    bias = _rand(gen, cols, dtype=dtype, device=device) if has_bias else None
    weight = _rand(gen, cols, dtype=dtype, device=device) if has_weight else None
    norm_bias = _rand(gen, cols, dtype=dtype, device=device) if has_norm_bias else None
    args = (enc, d, bias, residual, norm, weight, norm_bias, eps, ex, keep, 4, rows, cols)
    kept, out = call(impl.decode_norm_encode, ops.decode_norm_encode, *args)
    ref_kept, ref_out = _ref(ops.decode_norm_encode_aten, *args)
    _check(out, ref_out, dtype)
    if keep == "none":
        assert kept.shape == (0,) and kept.dtype == dtype
    else:
        _check(kept, ref_kept, dtype)


def _softmax_case(impl, call, gen, device, dtype, batch, a, c, rank, rank2, crop, mask_kind,
                  causal, mask_shape=None, dead_rows=()):
    """Attention scores of ``batch`` (…, a·4 − crop, c·4 − crop): encoded, decoded, masked,
    normalized and re-encoded; ``mask_shape`` broadcasts to the scores. ``dead_rows``: query
    rows masked entirely (probabilities 0, as SDPA gives)."""
    rows, cols = a * 4 - crop, c * 4 - crop
    enc = _rand(gen, rank, *batch, a, c, dtype=dtype, device=device) * 0.5
    d, ex = (_rand(gen, n, 16, dtype=dtype, device=device) for n in (rank, rank2))
    shape = mask_shape or (*batch, rows, cols)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(*shape, generator=gen) < 0.3
        mask[..., 0] = False  # one key per row, except in the dead rows
        mask[..., dead_rows, :] = True
        mask = mask.to(device)
    elif mask_kind == "additive":
        mask = _rand(gen, *shape, dtype=dtype, device=device)
        mask[..., dead_rows, :] = float("-inf")
    out = call(impl.decode_softmax_encode, ops.decode_softmax_encode, enc, d, 0.35, mask, causal,
               ex, 4, rows, cols)
    ref_mask = None if mask is None else (
        mask if mask.dtype == torch.bool else mask.double()).cpu()
    ref = _ref(lambda e, dd, x: ops.decode_softmax_encode_aten(e, dd, 0.35, ref_mask, causal, x,
                                                               4, rows, cols), enc, d, ex)
    _check(out, ref, dtype)


def _launch(launcher, op, *args):
    """Call the kernel launcher directly (CPU tensors under the interpreter)."""
    return launcher(*args)


def _dispatch(launcher, op, *args):
    """Call the registered op: on CUDA tensors it dispatches to the Triton kernels."""
    return op(*args)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class _KernelChecks:
    """The kernel checks, shared by the interpreter (CPU) and CUDA classes."""

    device: str
    call: Callable

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("case", ENCODE_CASES, ids=str)
    def test_encode(self, impl, dtype, case):
        gen = torch.Generator().manual_seed(hash(case) % 2**31)
        _encode_case(impl, self.call, gen, self.device, dtype, *case, strided=False)

    def test_encode_strided_input(self, impl):
        gen = torch.Generator().manual_seed(1)
        _encode_case(impl, self.call, gen, self.device, torch.float32, (3,), 12, 40, 24,
                     strided=True)

    @pytest.mark.parametrize("per_sm", [1, 3])
    def test_looping_programs(self, impl, monkeypatch, per_sm):
        """Fewer programs than blocks: each program loops over blocks, prefetching the next."""
        for kind in ("encode", "decode", "fused"):
            table = {rp: (*config[:3], per_sm, *config[4:])
                     for rp, config in impl.CONFIGS[kind].items()}
            monkeypatch.setitem(impl.CONFIGS, kind, table)
        gen = torch.Generator().manual_seed(per_sm)
        for batch, n, k, rank in ENCODE_CASES[1:3]:
            _encode_case(impl, self.call, gen, self.device, torch.float32, batch, n, k, rank,
                         strided=False)
        for batch, a, c, rank, crop_rows, crop_cols in DECODE_CASES[1:3]:
            _decode_case(impl, self.call, gen, self.device, torch.float32, batch, a, c, rank,
                         crop_rows, crop_cols, "relu", c * 4)
            _act_encode_case(impl, self.call, gen, self.device, torch.float32, batch, a, c,
                             rank, "gelu", 40)
            _glu_case(impl, self.call, gen, self.device, torch.float32, batch, a, c, rank,
                      "silu", 16)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("case", DECODE_CASES, ids=str)
    def test_decode(self, impl, dtype, case):
        gen = torch.Generator().manual_seed(hash(case) % 2**31)
        _decode_case(impl, self.call, gen, self.device, dtype, *case, "none", None)

    @pytest.mark.parametrize("activation", ACTIVATIONS)
    def test_decode_epilogue(self, impl, activation):
        gen = torch.Generator().manual_seed(2)
        for dtype in (torch.float32, torch.bfloat16):
            _decode_case(impl, self.call, gen, self.device, dtype, (2,), 9, 41, 24, 1, 2,
                         activation, 41 * 4 - 5)
        _decode_case(impl, self.call, gen, self.device, torch.float32, (), 6, 35, 49, 0, 3,
                     activation, None)

    @pytest.mark.parametrize("activation", ["none", "gelu", "silu", "sigmoid"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_decode_act_encode(self, impl, activation, dtype):
        gen = torch.Generator().manual_seed(3)
        _act_encode_case(impl, self.call, gen, self.device, dtype, (2,), 9, 37, 24,
                         activation, 40)
        _act_encode_case(impl, self.call, gen, self.device, dtype, (), 17, 5, 49,
                         activation, 16)

    @pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_decode_glu_encode(self, impl, activation, dtype):
        gen = torch.Generator().manual_seed(4)
        _glu_case(impl, self.call, gen, self.device, dtype, (2,), 9, 37, 24,
                  activation, 16)
        _glu_case(impl, self.call, gen, self.device, dtype, (), 5, 33, 40,
                  activation, 49)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("mask_kind, causal", [("none", False), ("none", True),
                                                   ("bool", False), ("additive", True)])
    def test_decode_softmax_encode(self, impl, dtype, mask_kind, causal):
        gen = torch.Generator().manual_seed(40)
        # Partial tiles, two batch dims (heads); short rows take several strips per program
        # (BI > 1, the last group part padding); in float32 long rows of two full-width key
        # blocks instead (BJ = the block, BI = 1).
        c = 2 * impl.CONFIGS["softmax"][32][0] - 2 if dtype == torch.float32 else 5
        _softmax_case(impl, self.call, gen, self.device, dtype, (2, 2), 3, c, 24, 24, 1,
                      mask_kind, causal)
        _softmax_case(impl, self.call, gen, self.device, dtype, (), 2, 3, 49, 16, 0,
                      mask_kind, causal)

    @pytest.mark.parametrize("mask_kind", ["bool", "additive"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_decode_softmax_encode_fully_masked_rows(self, impl, dtype, mask_kind):
        """Query rows that see no key (left padding) encode probabilities 0, not NaN: rows in
        the first and the last strip, one of them partial; causal too."""
        gen = torch.Generator().manual_seed(42)
        for causal in (False, True):
            _softmax_case(impl, self.call, gen, self.device, dtype, (2, 2), 3, 5, 24, 24, 1,
                          mask_kind, causal, dead_rows=[0, 2, 9])

    @pytest.mark.parametrize("mask_shape", [(2, 1, 1, 11), (1, 3, 11, 11), (11, 11)], ids=str)
    def test_decode_softmax_encode_broadcast_mask(self, impl, mask_shape):
        """Padding-style and per-head masks read through stride-0 dims, stacked encoders."""
        gen = torch.Generator().manual_seed(41)
        _softmax_case(impl, self.call, gen, self.device, torch.float32, (2, 3), 3, 3, 24, 72, 1,
                      "bool", False, mask_shape=mask_shape)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("index", range(len(NORM_CASES)),
                             ids=lambda i: "-".join(map(str, NORM_CASES[i][7:9])))
    def test_decode_norm_encode(self, impl, dtype, index):
        gen = torch.Generator().manual_seed(10 + index)
        _norm_case(impl, self.call, gen, self.device, dtype, *NORM_CASES[index])

    @pytest.mark.parametrize("index", range(len(STACKED_CASES)), ids=lambda i: "-".join(
        [str(STACKED_CASES[i][4]), *STACKED_CASES[i][7:9], str(STACKED_CASES[i][10])[6:]]))
    def test_decode_norm_encode_stacked_encoders(self, impl, index):
        """Output encoders of more than MAX_RANK rows, encoded in chunks of ranks from one
        normalized block (and 48 rows, one padded chunk)."""
        batch, a, c, rank, rank2, *rest, dtype = STACKED_CASES[index]
        if c is None:  # two column blocks
            c = impl.CONFIGS["row_norm"][max(impl.padded_rank(rank),
                                             impl.encoder_chunks(rank2)[0])][1] + 3
        gen = torch.Generator().manual_seed(30 + index)
        _norm_case(impl, self.call, gen, self.device, dtype, batch, a, c, rank, rank2, *rest)

    @pytest.mark.parametrize("norm", ["layer", "rms"])
    def test_decode_norm_encode_rounding(self, impl, norm):
        """bf16, two column blocks, stacked encoders, weight (and LayerNorm bias): ``h`` is
        bit-identical to the composite's on the same device, ``n`` rounds as the composite
        does (``n * weight`` rounded before the norm bias is added: a bf16 FMA there moves 1 in
        4 values by an ulp), and keep="sum", which normalizes the ``h`` it stored and re-read
        behind a barrier (the kept buffer is NaN-poisoned), encodes what keep="none", which
        re-decodes, encodes. Up to 1 % of the values may differ by the rounding of the row
        statistics, whose summation order is the compiler's."""
        gen = torch.Generator().manual_seed(32)
        r = lambda *shape: _rand(gen, *shape, dtype=torch.bfloat16,  # noqa: E731
                                 device=self.device)
        c = impl.CONFIGS["row_norm"][32][1] + 5
        cols = 4 * c - 1
        args = [r(24, 2, c), r(24, 16), r(cols), r(7, cols), norm, r(cols),
                r(cols) if norm == "layer" else None, 1e-5, r(72, 16), "sum", 4, 7, cols]
        keep = NORM_OP_ARGS.index("keep")

        def run(mode):
            args[keep] = mode
            return self.call(impl.decode_norm_encode, ops.decode_norm_encode, *args)

        def differ(a, b):
            return (a != b).float().mean().item()

        kept, out = run("sum")
        normed, _ = run("normed")
        _, out_none = run("none")
        ref_kept, ref_out = _ref(ops.decode_norm_encode_aten, *args[:keep], "sum", *args[keep + 1:])
        _check(kept, ref_kept, torch.bfloat16)
        _check(out, ref_out, torch.bfloat16)
        composite_h, _ = ops.decode_norm_encode_aten(*args[:keep], "sum", *args[keep + 1:])
        composite_n, _ = ops.decode_norm_encode_aten(*args[:keep], "normed", *args[keep + 1:])
        assert torch.equal(kept, composite_h)
        assert differ(normed, composite_n) < 0.01
        assert differ(out, out_none) < 0.01

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_fused_stacked_encoders(self, impl, dtype):
        """decode_act_encode and decode_glu_encode with output encoders past MAX_RANK."""
        gen = torch.Generator().manual_seed(31)
        _act_encode_case(impl, self.call, gen, self.device, dtype, (2,), 5, 37, 24, "gelu", 72)
        _glu_case(impl, self.call, gen, self.device, dtype, (), 3, 33, 24, "silu", 16,
                  ex_rank=130)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("norm", ["layer", "rms"])
    def test_decode_norm_encode_wide_row(self, impl, norm, dtype):
        """Three column blocks: the statistics merge across blocks, pass 2 re-reads each."""
        bj = impl.CONFIGS["row_norm"][32][1]
        gen = torch.Generator().manual_seed(20)
        _norm_case(impl, self.call, gen, self.device, dtype, (), 2, 2 * bj + 3, 24, 16, 1, 2,
                   norm, "sum", (True, True, True, True))

    def test_decode_norm_encode_large_mean(self, impl):
        """LayerNorm of rows whose mean (2000) is hundreds of times their spread, across three
        column blocks, to fp32 accuracy (a single-pass E[h²] − E[h]² in fp32 is off by ≈ 1e-2)."""
        bj = impl.CONFIGS["row_norm"][32][1]
        gen = torch.Generator().manual_seed(21)
        _norm_case(impl, self.call, gen, self.device, torch.float32, (), 1, 2 * bj + 3, 24, 16,
                   0, 1, "layer", "normed", (False, True, False, False), offset=2000.0,
                   eps=1e-6)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_decode_norm_encode_strided(self, impl, dtype):
        gen = torch.Generator().manual_seed(22)
        _norm_case(impl, self.call, gen, self.device, dtype, (2, 3), 2, 5, 24, 16, 3, 1,
                   "layer", "sum", (True, True, True, True), strided=True)
        _norm_case(impl, self.call, gen, self.device, dtype, (2,), 3, 4, 7, 49, 0, 3,
                   "rms", "normed", (False, True, True, False), strided=True)

    @pytest.mark.parametrize("residual_batch", [(), (1, 3)], ids=str)
    def test_decode_norm_encode_broadcast_residual(self, impl, residual_batch):
        """A residual broadcast over the batch dims (read with batch stride 0)."""
        gen = torch.Generator().manual_seed(25)
        _norm_case(impl, self.call, gen, self.device, torch.float32, (2, 3), 2, 5, 24, 16, 1, 2,
                   "rms", "sum", (True, True, True, False), residual_batch=residual_batch)

    @pytest.mark.parametrize("per_sm", [0, 1])
    def test_decode_norm_encode_looping(self, impl, monkeypatch, per_sm):
        """One program per strip (0), and few programs each looping over strips (1): the
        prefetch crosses from one strip's last block to the next strip's first."""
        table = {rp: (*config[:3], per_sm, *config[4:])
                 for rp, config in impl.CONFIGS["row_norm"].items()}
        monkeypatch.setitem(impl.CONFIGS, "row_norm", table)
        bj = impl.CONFIGS["row_norm"][32][1]
        gen = torch.Generator().manual_seed(23)
        _norm_case(impl, self.call, gen, self.device, torch.float32, (2,), 5, bj + 3, 24, 16, 2,
                   3, "layer", "sum", (True, True, True, True))
        # Without keep="sum" pass 2 re-decodes, and its last block prefetches the next strip.
        _norm_case(impl, self.call, gen, self.device, torch.float32, (2,), 3, bj + 3, 24, 72, 1,
                   2, "rms", "normed", (True, True, True, False))


class TestInterpreted(_KernelChecks):
    """The kernels under Triton's interpreter, on CPU tensors (runs in CI)."""

    device = "cpu"
    call = staticmethod(_launch)

    @pytest.fixture
    def impl(self, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
        module = _load_interpreted()
        _poison(module, monkeypatch)
        return module

    def test_decode_norm_encode_dispatch(self, impl, monkeypatch):
        """The op itself, with the interpreted kernels standing in for the compiled ones (they
        take CPU tensors): the kernel for what the guard lets through, the composite for the
        rest, and the op's own errors."""
        from stl_compiler.runtime import triton_kernels

        monkeypatch.setattr(triton_kernels, "kernels", lambda: impl)
        calls = []
        inner = impl.common.new_output
        monkeypatch.setattr(impl.common, "new_output", lambda *a: calls.append(a) or inner(*a))
        gen = torch.Generator().manual_seed(24)
        r = lambda *shape: _rand(gen, *shape, dtype=torch.bfloat16, device="cpu")  # noqa: E731
        enc, d, ex, res, w = r(24, 2, 2, 5), r(24, 16), r(16, 16), r(2, 7, 18), r(18)
        args = [enc, d, r(18), res, "rms", w, None, 1e-5, ex, "normed", 4, 7, 18]

        def run(**changes):
            calls.clear()
            call = list(args)
            for name, value in changes.items():
                call[NORM_OP_ARGS.index(name)] = value
            kept, out = ops.decode_norm_encode(*call)
            if calls:
                ref_kept, ref_out = _ref(ops.decode_norm_encode_aten, *call)
                _check(kept, ref_kept, kept.dtype)
                _check(out, ref_out, out.dtype)
            else:  # the composite itself, contiguous
                ref_kept, ref_out = ops.decode_norm_encode_aten(*call)
                assert torch.equal(kept, ref_kept) and torch.equal(out, ref_out)
                assert kept.is_contiguous() and out.is_contiguous()
            return len(calls)

        assert run() == 2
        with pytest.raises(ValueError, match="the residual is torch.float32"):
            run(residual=res.float())  # another dtype: refused, as on CPU
        assert run(weight=w[:1]) == 0  # broadcast weight
        assert run(norm_bias=r(1, 18)) == 0  # 2-D norm bias
        assert run(ex=r(80, 16)) == 2  # stacked encoders: chunks of ranks
        assert run(ex=r(256, 16)) == 2  # MAX_ENCODER_RANK
        assert run(ex=r(257, 16)) == 0  # past it
        assert run(encoded=r(80, 2, 2, 5), d=r(80, 16)) == 0  # input rank above MAX_RANK
        assert run(residual=res[0]) == 2  # broadcast over the batch dim
        with pytest.raises(ValueError, match="residual of shape"):
            run(residual=r(3, 7, 18))
        with pytest.raises(ValueError, match="unknown norm"):
            run(norm="batch")
        with pytest.raises(ValueError, match="does not fit"):
            run(rows=9)


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: the compiled kernels run on the device machine "
           "(python benchmarks/gpu_check.py); CI checks them under the interpreter instead")


@pytest.mark.gpu
@needs_cuda
class TestCUDA(_KernelChecks):
    """The compiled kernels through the registered ops on CUDA, and their gradients."""

    device = "cuda"
    call = staticmethod(_dispatch)

    @pytest.fixture
    def impl(self, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
        from stl_compiler.runtime import triton_kernels

        module = triton_kernels.kernels()
        assert module is not None, "triton is not importable on this CUDA machine"
        _poison(module, monkeypatch)
        return module

    def test_dispatches_to_triton(self, impl, monkeypatch):
        calls = []
        inner = impl.common.new_output
        monkeypatch.setattr(impl.common, "new_output", lambda *a: calls.append(a) or inner(*a))
        x = torch.randn(8, 16, device="cuda", dtype=torch.bfloat16)
        basis = torch.randn(24, 16, device="cuda", dtype=torch.bfloat16)
        ops.decode(ops.encode(x, basis, 4), basis, 4, 8, 16)
        assert len(calls) == 2

    def test_stacked_encoders_dispatch_to_triton(self, impl, monkeypatch):
        """decode_act_encode / decode_glu_encode with a 72-row ex take the kernels."""
        calls = []
        inner = impl.common.new_output
        monkeypatch.setattr(impl.common, "new_output", lambda *a: calls.append(a) or inner(*a))
        gen = torch.Generator().manual_seed(9)
        r = lambda *shape: _rand(gen, *shape, dtype=torch.bfloat16, device="cuda")  # noqa: E731
        out = ops.decode_act_encode(r(24, 2, 3, 10), r(24, 16), None, r(72, 16), "gelu", 1.0, 4,
                                    12, 40)
        assert out.shape == (72, 2, 3, 10)
        ops.decode_glu_encode(r(24, 3, 10), r(24, 16), None, r(24, 3, 10), r(24, 16), None,
                              r(72, 16), "silu", 1.0, 4, 12, 40)
        assert len(calls) == 2

    @pytest.mark.parametrize("name", ["encode", "decode", "decode_epilogue",
                                      "decode_act_encode", "decode_glu_encode"])
    def test_gradients_match_aten(self, impl, name):
        gen = torch.Generator().manual_seed(5)
        r = lambda *shape: _rand(gen, *shape, dtype=torch.float32, device="cuda")  # noqa: E731
        a, c = 6, 10
        cases = {
            "encode": (ops.encode, ops.encode_aten, (r(2, a * 4 - 1, c * 4 - 3), r(24, 16), 4)),
            "decode": (ops.decode, ops.decode_aten,
                       (r(24, 2, a, c), r(24, 16), 4, a * 4 - 2, c * 4 - 1)),
            "decode_epilogue": (ops.decode_epilogue, ops.decode_epilogue_aten,
                                (r(24, 2, a, c), r(24, 16), r(c * 4 - 2), "gelu", 0.5, 4,
                                 a * 4, c * 4 - 3)),
            "decode_act_encode": (ops.decode_act_encode, ops.decode_act_encode_aten,
                                  (r(24, 2, a, c), r(24, 16), r(c * 4), r(16, 16), "silu",
                                   0.5, 4, a * 4 - 1, c * 4 - 2)),
            "decode_glu_encode": (ops.decode_glu_encode, ops.decode_glu_encode_aten,
                                  (r(24, 2, a, c), r(24, 16), None, r(16, 2, a, c), r(16, 16),
                                   r(c * 4), r(24, 16), "silu", 1.0, 4, a * 4, c * 4 - 3)),
        }
        op, composite, args = cases[name]
        args = [v.requires_grad_() if isinstance(v, torch.Tensor) else v for v in args]
        out = op(*args)
        grad_out = torch.randn_like(out)
        tensors = [v for v in args if isinstance(v, torch.Tensor)]
        grads = torch.autograd.grad(out, tensors, grad_out)
        ref_args = [v.detach().double().cpu().requires_grad_() if isinstance(v, torch.Tensor)
                    else v for v in args]
        ref_out = composite(*ref_args)
        ref_tensors = [v for v in ref_args if isinstance(v, torch.Tensor)]
        ref_grads = torch.autograd.grad(ref_out, ref_tensors, grad_out.double().cpu())
        _check(out, ref_out.detach(), torch.float32)
        for grad, ref in zip(grads, ref_grads):
            _check(grad, ref, torch.float32)

    def test_compiled_stl_linear(self, impl):
        from stl_compiler import STLLinear, bases

        torch.manual_seed(6)
        linear = torch.nn.Linear(64, 96, device="cuda")
        layer = STLLinear.from_linear(linear, bases.strassen(4))
        x = torch.randn(3, 20, 64, device="cuda")
        compiled = torch.compile(layer, fullgraph=True)
        with torch.no_grad():
            _check(compiled(x), linear(x).double().cpu(), torch.float32)

    @pytest.mark.parametrize("ex_rows", [16, 72])
    def test_decode_norm_encode_dispatches_to_triton(self, impl, monkeypatch, ex_rows):
        calls = []
        inner = impl.common.new_output
        monkeypatch.setattr(impl.common, "new_output", lambda *a: calls.append(a) or inner(*a))
        gen = torch.Generator().manual_seed(7)
        r = lambda *shape: _rand(gen, *shape, dtype=torch.bfloat16, device="cuda")  # noqa: E731
        args = (r(24, 2, 3, 40), r(24, 16), r(158), r(2, 10, 158), "layer", r(158), r(158),
                None, r(ex_rows, 16), "sum", 4, 10, 158)
        kept, out = torch.ops.stl.decode_norm_encode(*args)
        assert len(calls) == 2  # the kernel, not the composite (72 rows: stacked Q, K, V)
        ref_kept, ref_out = _ref(ops.decode_norm_encode_aten, *args)
        _check(kept, ref_kept, torch.bfloat16)
        _check(out, ref_out, torch.bfloat16)

    @pytest.mark.parametrize("keep", ["sum", "none"])
    def test_decode_norm_encode_gradients_match_aten(self, impl, keep):
        gen = torch.Generator().manual_seed(8)
        r = lambda *shape: _rand(gen, *shape, dtype=torch.float32, device="cuda")  # noqa: E731
        a, c, rows, cols = 3, 10, 11, 37
        args = [r(24, 2, a, c), r(24, 16), r(cols), r(2, rows, cols), "layer", r(cols), r(cols),
                1e-5, r(16, 16), keep, 4, rows, cols]
        args = [v.requires_grad_() if isinstance(v, torch.Tensor) else v for v in args]
        kept, out = torch.ops.stl.decode_norm_encode(*args)
        outs = [out] if keep == "none" else [out, kept]
        grads_out = [torch.randn_like(o) for o in outs]
        tensors = [v for v in args if isinstance(v, torch.Tensor)]
        grads = torch.autograd.grad(outs, tensors, grads_out)
        ref_args = [v.detach().double().cpu().requires_grad_() if isinstance(v, torch.Tensor)
                    else v for v in args]
        ref_kept, ref_out = ops.decode_norm_encode_aten(*ref_args)
        ref_outs = [ref_out] if keep == "none" else [ref_out, ref_kept]
        ref_tensors = [v for v in ref_args if isinstance(v, torch.Tensor)]
        ref_grads = torch.autograd.grad(ref_outs, ref_tensors,
                                        [g.double().cpu() for g in grads_out])
        for o, ref in zip(outs, ref_outs):
            _check(o, ref.detach(), torch.float32)
        for grad, ref in zip(grads, ref_grads):
            _check(grad, ref, torch.float32)
