"""One stl_compile serves every batch >= 1 and every sequence length (1, odd, above the
example) through the eager and Inductor backends and export_onnx; explicit Dim specs with
min=1 capture; calls outside what was compiled get a ValueError naming the input."""

from __future__ import annotations

import pytest
import torch
from model_zoo import CASES, SERVING_CASES, output_tensor
from stl_helpers import rel_err
from torch.export import Dim

from stl_compiler import STLConfig, stl_compile

ALL_CASES = CASES | SERVING_CASES
#: compiled at batch 2 x seq 8; served at batch 1 (the most common inference call), one
#: token, odd lengths, and a batch above the example
SERVED = [(1, 8), (1, 1), (3, 5), (1, 13)]
TOL = 1e-4  # exact basis, float32: only rounding differs from the dense model


def exact(case) -> STLConfig:
    return STLConfig(basis="strassen", min_dim=8, max_cost_ratio=None,
                     decompose_sdpa=case.uses_sdpa)


def _compile(case, backend="eager", **kwargs):
    model = case.build().eval()
    compiled = stl_compile(model, case.args(2, 8), exact(case),
                           example_kwargs=case.kwargs(2, 8), backend=backend, **kwargs)
    assert compiled.stl_report.converted, str(compiled.stl_report)
    return model, compiled


def _check_served(model, compiled, case, sizes=SERVED):
    for batch, seq in sizes:
        args, kwargs = case.args(batch, seq), case.kwargs(batch, seq)
        with torch.no_grad():
            out = output_tensor(compiled(*args, **kwargs))
            ref = output_tensor(model(*args, **kwargs))
        assert rel_err(out, ref) < TOL, f"{case.name} at batch {batch}, seq {seq}"


@pytest.mark.parametrize("name", [
    "gpt2", "decoder", "hf_vit",
    *(pytest.param(name, marks=pytest.mark.slow)
      for name in ("llama", "bert", "hf_swin", "torch_encoder_layer", "vit")),
])
def test_batch_one_and_any_sequence_after_one_compile(name):
    # before: "Guard failed: input_ids.size()[0] != 1" (GPT-2, Swin, nn.MultiheadAttention)
    # and "tokens.size()[1] != 1" (one-token sequences) from size-oblivious guards
    case = ALL_CASES[name]
    model, compiled = _compile(case)
    _check_served(model, compiled, case)


@pytest.mark.slow
def test_inductor_serves_batch_one_and_one_token():
    case = SERVING_CASES["gpt2"]
    model, compiled = _compile(case, backend="inductor")
    _check_served(model, compiled, case, [(1, 8), (1, 1), (3, 5)])


def test_explicit_dims_with_min_1_capture_and_bound_the_inputs():
    # before: CaptureError "Constraints violated (batch)"
    case = SERVING_CASES["gpt2"]
    model = case.build().eval()
    spec = ({0: Dim("batch", min=1, max=8), 1: 4 * Dim("s4", min=1, max=16)},)
    compiled = stl_compile(model, case.args(2, 8), exact(case), dynamic_shapes=spec,
                           backend="eager")
    _check_served(model, compiled, case, [(1, 4), (1, 64), (8, 12)])
    with pytest.raises(ValueError, match=r"input 'input_ids'.*dim 0 must be in 1\.\.8.*\[9, 8\]"):
        compiled(case.args(9, 8)[0])
    with pytest.raises(ValueError, match=r"dim 1 must be in 4\.\.64"):
        compiled(case.args(1, 68)[0])


@pytest.mark.slow
def test_export_onnx_of_the_compiled_model_serves_every_size(tmp_path):
    pytest.importorskip("onnxruntime")
    from stl_compiler.exporters import export_onnx
    from stl_compiler.runtime.ort import ort_session

    case = CASES["decoder"]
    model, compiled = _compile(case)
    path = export_onnx(compiled, case.args(2, 8), tmp_path / "decoder.onnx")
    session = ort_session(path)
    for batch, seq in SERVED:
        tokens = case.args(batch, seq)[0]
        (got,) = session.run(tokens)
        with torch.no_grad():
            assert rel_err(torch.as_tensor(got), model(tokens)) < TOL, (batch, seq)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_wrong_dtype_or_feature_size_at_run_time_names_the_input(backend):
    case = CASES["mlp"]  # input (batch, seq, 32), float32
    _, compiled = _compile(case, backend=backend)
    x = torch.randn(3, 5, 32)
    with pytest.raises(ValueError, match=r"input 'x'.*float32.*got torch.float64"):
        compiled(x.double())
    with pytest.raises(ValueError, match=r"input 'x': dim 2 must be 32.*got shape \[3, 5, 16\]"):
        compiled(torch.randn(3, 5, 16))
    with pytest.raises(ValueError, match=r"expected 3 dims.*got shape \[5, 32\]"):
        compiled(torch.randn(5, 32))
    with pytest.raises(ValueError, match=r"takes \(x: float32\[\*, \*, 32\]\).*got"):
        compiled(x, x)
