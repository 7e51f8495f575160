"""ONNX Runtime parity for transformers models (tiny random configs, no downloads).

Exact basis: ``stl_compile`` (fused) → ONNX, compared with the dense model. Rank 24:
``swap_linears_`` (unfused) → ONNX, compared with the converted model. Both at batch and
sequence sizes other than the export example, and TensorRT-parseable.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from stl_helpers import rel_err

import stl_compiler as stl
from stl_compiler.exporters import export_onnx, onnx_op_types, unsupported_tensorrt_ops
from stl_compiler.runtime import ort_session

transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 64


def bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
    return transformers.BertModel(config, add_pooling_layer=False)


def vit():
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, num_labels=5,
        attn_implementation="eager")
    return transformers.ViTForImageClassification(config)


def llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64,
        use_cache=False, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config)


def tokens(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq))


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16)


CASES = {
    "bert": (bert, tokens(2, 6), [tokens(3, 11), tokens(1, 4), tokens(5, 16)]),
    "vit": (vit, images(2), [images(3), images(1), images(5)]),
    "llama": (llama, tokens(2, 6), [tokens(3, 11), tokens(1, 4), tokens(5, 16)]),
}


def _first_output(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[0]


@pytest.mark.parametrize("basis", ["strassen", "rank24"])
@pytest.mark.parametrize("name", list(CASES))
def test_hf_model_ort_parity(tmp_path, name, basis):
    factory, example, inputs = CASES[name]
    dense = factory().eval()
    if basis == "strassen":
        config = stl.STLConfig(basis="strassen", tile=4, min_dim=1, max_cost_ratio=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = stl.stl_compile(dense, (example,), config, backend="eager")
        assert module.stl_report.converted
        reference = dense  # an exact basis keeps the dense outputs
    else:
        # token tiles on the causal LMs too (allow_non_causal): the export is checked here,
        # causality in tests/test_causality.py
        config = stl.STLConfig(basis="random", tile=4, rank=24, min_dim=1,
                               max_cost_ratio=None, row_grouping="tokens",
                               allow_non_causal=True)
        module = copy.deepcopy(dense)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "causality NOT kept" on the causal LMs
            outcome = stl.swap_linears_(module, config)
        assert "converted" in outcome.values()
        reference = module
    path = export_onnx(module, example, tmp_path / f"{name}.onnx")
    assert all("::" not in op for op in onnx_op_types(path))
    assert unsupported_tensorrt_ops(path) == {}
    session = ort_session(path)
    for x in inputs:
        assert rel_err(session.run(x)[0], _first_output(reference, x)) < TOL
