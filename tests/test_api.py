"""stl_compile end to end: exactness, dynamic shapes, report, training, ties, errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from model_zoo import CASES, output_tensor
from stl_helpers import rel_err
from torch import nn

from stl_compiler import STLConfig, stl_compile, stl_flops
from stl_compiler.capture import CaptureError
from stl_compiler.tiling import padded_rows


def _compile(case, config, backend):
    model = case.build().eval()
    b, s = case.example
    return model, stl_compile(model, case.args(b, s), config, example_kwargs=case.kwargs(b, s),
                              backend=backend)


def _outputs(model, compiled, case, size):
    b, s = size
    args, kwargs = case.args(b, s), case.kwargs(b, s)
    with torch.no_grad():
        return output_tensor(compiled(*args, **kwargs)), output_tensor(model(*args, **kwargs))


@pytest.mark.parametrize("backend", ["eager", "inductor"])
@pytest.mark.parametrize("name", list(CASES))
def test_exact_basis_reproduces_the_model(name, backend):
    case = CASES[name]
    config = STLConfig(basis="strassen", min_dim=8, max_cost_ratio=None,
                       decompose_sdpa=case.uses_sdpa)
    model, compiled = _compile(case, config, backend)
    report = compiled.stl_report
    assert report.converted, str(report)
    assert report.model_rel_error < 1e-4
    for size in (case.example, case.other):
        out, ref = _outputs(model, compiled, case, size)
        assert rel_err(out, ref) < 1e-4, f"{name} at batch/seq {size}"


@pytest.mark.parametrize("name", ["mlp", "vit", "llama", "bert", "hf_vit", "decoder"])
def test_rank24_converts_every_linear_and_attention_matmul(name):
    case = CASES[name]
    # token tiles on the decoders too ("llama", "decoder"): the automatic grouping would keep
    # their attention matmuls dense (tests/test_causality.py)
    config = STLConfig(rank=24, basis="random", min_dim=8, max_cost_ratio=None,
                       decompose_sdpa=case.uses_sdpa, row_grouping="tokens",
                       allow_non_causal=True)
    model, compiled = _compile(case, config, "eager")
    report = compiled.stl_report
    linear_names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    converted = {s.name for s in report.converted if s.kind == "linear"}
    tied = {s.name for s in report.skipped if s.reason.startswith("tied weight")}
    assert linear_names - tied == converted, str(report)
    matmuls = [s for s in report.sites if s.kind == "matmul"]
    if name != "mlp":
        assert matmuls and all(s.converted for s in matmuls), str(report)
    for site in report.converted:
        assert site.rank == 24 and site.rel_error is not None and site.rel_error > 0
    # the report's FLOPs are stl_flops of each site's shapes
    for site in report.converted:
        if site.kind == "linear":
            k, m = site.w_shape
            rows = padded_rows(site.x_shape, 4, "tokens")
            assert site.stl_flops == stl_flops(rows, k, m, 4, 24) * site.calls
        else:
            batch = math.prod(torch.broadcast_shapes(site.x_shape[:-2], site.w_shape[:-2]))
            n, k, m = site.x_shape[-2], site.x_shape[-1], site.w_shape[-1]
            assert site.stl_flops == batch * stl_flops(n, k, m, 4, 24, encode_w=True)
    dense, after = report.flops()
    assert report.flop_ratio == pytest.approx(after / dense)
    assert "sites converted" in str(report)
    assert '"flop_ratio"' in report.to_json()


def test_matmul_target_off_keeps_attention_dense():
    case = CASES["vit"]
    config = STLConfig(basis="random", min_dim=8, targets={"linear"})
    _, compiled = _compile(case, config, "eager")
    matmuls = [s for s in compiled.stl_report.sites if s.kind == "matmul"]
    assert matmuls and not any(s.converted for s in matmuls)
    assert all("targets" in s.reason for s in matmuls)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_training_backward_and_optimizer_step(backend):
    case = CASES["vit"]
    model = case.build()
    images = torch.randn(4, 3, 16, 16)
    labels = torch.randint(0, 10, (4,))
    compiled = stl_compile(model, (images,),
                           STLConfig(basis="random", min_dim=8, max_cost_ratio=None),
                           backend=backend)
    params = dict(compiled.named_parameters())
    stl_params = {n: p for n, p in params.items()
                  if n.rsplit(".", 1)[-1] in {"weight_encoded", "ex", "ew", "d"}}
    assert stl_params
    optimizer = torch.optim.Adam(compiled.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(compiled(images), labels)
        optimizer.zero_grad()
        loss.backward()
        for n, p in stl_params.items():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state = compiled.state_dict()
    assert any(k.endswith("weight_encoded") for k in state)


def test_tied_weights_are_reported_and_kept_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, use_cache=False,
        tie_word_embeddings=True)).eval()
    ids = torch.randint(0, 96, (2, 8))
    compiled = stl_compile(model, (), STLConfig(basis="strassen", min_dim=8),
                           example_kwargs={"input_ids": ids}, backend="eager")
    (head,) = [s for s in compiled.stl_report.sites if s.name == "lm_head"]
    assert not head.converted and head.reason.startswith("tied weight")
    with torch.no_grad():
        assert rel_err(compiled(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-4


class SharedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.weight = nn.Parameter(torch.randn(16, 32) / 6)

    def forward(self, x):
        y = self.proj(torch.relu(self.proj(x)))  # one weight, two call sites
        return F.linear(y, self.weight)  # a functional linear on a bare parameter


def test_shared_weight_is_converted_once_and_functional_linear_is_converted():
    model = SharedLayer().eval()
    x = torch.randn(2, 8, 32)
    compiled = stl_compile(model, (x,), STLConfig(basis="strassen", min_dim=8, max_cost_ratio=None),
                           backend="eager")
    sites = {s.name: s for s in compiled.stl_report.sites}
    assert sites["proj"].converted and sites["proj"].calls == 2
    assert sites["weight"].converted
    encoded = [n for n in compiled.state_dict() if n.endswith("weight_encoded")]
    assert len(encoded) == 2
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5


class WithConvAndEinsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        h = self.proj(self.conv(x))
        gram = torch.einsum("bij,bkj->bik", h, h)
        return torch.einsum("bii->bi", gram)


def test_unsupported_ops_stay_dense_and_are_reported():
    model = WithConvAndEinsum().eval()
    x = torch.randn(2, 8, 16)
    compiled = stl_compile(model, (x,), STLConfig(basis="strassen", min_dim=8, max_cost_ratio=None),
                           backend="eager")
    rows = {s.op: s for s in compiled.stl_report.sites}
    assert not rows["aten.conv1d"].converted
    assert "unsupported op" in rows["aten.conv1d"].reason
    assert any(s.kind == "matmul" and s.converted for s in compiled.stl_report.sites)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5


def test_nothing_converted_says_so_loudly():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="NOTHING"):
        compiled = stl_compile(model, (torch.randn(2, 4),), STLConfig(basis="strassen"),
                               backend="eager")
    assert "NOTHING WAS CONVERTED" in str(compiled.stl_report)
    assert "too small" in compiled.stl_report.sites[0].reason


def test_overrides_filter_and_min_dim():
    model = CASES["mlp"].build().eval()
    x = torch.randn(2, 8, 32)
    seen = {}

    def keep(module, fqn):
        seen[fqn] = module
        return fqn != "layers.0"

    config = STLConfig(basis="random", min_dim=8, max_cost_ratio=None,
                       overrides={"layers.1": "skip", "layers.2": {"rank": 8}}, filter_fn=keep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = stl_compile(model, (x,), config, backend="eager")
    sites = {s.name: s for s in compiled.stl_report.sites}
    assert sites["layers.0"].reason == "filtered by filter_fn"
    assert sites["layers.1"].reason == "skipped by an override"
    assert sites["layers.2"].converted and sites["layers.2"].rank == 8
    # torchao's order: the user's own nn.Linear, not a captured stand-in
    assert seen["layers.0"] is model.layers[0]


def test_batch_row_grouping_keeps_attention_dense():
    case = CASES["decoder"]
    config = STLConfig(min_dim=8, max_cost_ratio=None, decompose_sdpa=True, row_grouping="batch")
    _, compiled = _compile(case, config, "eager")
    matmuls = [s for s in compiled.stl_report.sites if s.kind == "matmul"]
    assert matmuls and all("causality" in s.reason for s in matmuls)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        if x.sum() > 0:
            return self.proj(x)
        return x


def test_capture_failure_names_the_construct():
    with pytest.raises(CaptureError, match="How to work around it"):
        stl_compile(DataDependent(), (torch.randn(2, 16),), STLConfig(basis="strassen"),
                    backend="eager")


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        stl_compile(lambda x: x, (torch.randn(2, 2),))
    with pytest.raises(ValueError, match="backend"):
        stl_compile(nn.Linear(4, 4), (torch.randn(2, 4),), backend="tvm")
    with pytest.raises(TypeError, match="STLConfig"):
        stl_compile(nn.Linear(4, 4), (torch.randn(2, 4),), config={"rank": 24})


def test_tensorrt_backend_without_torch_tensorrt_names_the_extra():
    pytest.importorskip("stl_compiler.exporters.tensorrt")
    try:
        import torch_tensorrt  # noqa: F401
        pytest.skip("torch_tensorrt is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"stl-compiler\[tensorrt\]"):
        stl_compile(CASES["mlp"].build(), (torch.randn(2, 8, 32),),
                    STLConfig(basis="strassen", min_dim=8), backend="tensorrt")


def test_layers_already_converted_are_kept_and_reported():
    from stl_compiler import swap_linears_
    from stl_compiler.models import MLP

    model = MLP([32, 64, 48, 16], ["gelu", "relu"]).eval()
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        dense = model(x)
    config = STLConfig(basis="strassen", min_dim=8, max_cost_ratio=None)
    swap_linears_(model, config)
    compiled = stl_compile(model, (x,), config,
                           backend="eager")
    report = compiled.stl_report
    assert [s.name for s in report.sites] == ["layers.0", "layers.1", "layers.2"]
    assert all(s.converted and "already converted" in s.op for s in report.sites)
    assert [b.kind for b in report.boundaries] == ["elementwise", "elementwise"]
    with torch.no_grad():
        assert rel_err(compiled(x), dense) < 1e-5


@pytest.mark.parametrize("name", ["decoder", "vit", "llama"])
def test_dynamic_sizes_hold_below_one_tile_and_above_the_example(name):
    # example batch 2 x seq 8; a sequence of 4 is a single tile and a batch of 9 is > 4x the
    # example: neither may be specialized away by the capture
    case = CASES[name]
    config = STLConfig(basis="strassen", min_dim=8, max_cost_ratio=None,
                       decompose_sdpa=case.uses_sdpa)
    model, compiled = _compile(case, config, "eager")
    for size in ((3, 4), (9, 13), (5, 7)):
        out, ref = _outputs(model, compiled, case, size)
        assert rel_err(out, ref) < 1e-4, size


# --- entry-point checks ------------------------------------------------------------------

def _linear():
    return nn.Linear(32, 32).eval()


class KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)

    def forward(self, *, hidden):
        return self.proj(hidden)


def test_dynamic_shapes_must_be_auto_none_or_a_spec():
    with pytest.raises(ValueError, match=r'dynamic_shapes must be "auto".*None.*spec.*bogus'):
        stl_compile(_linear(), (torch.randn(2, 32),), dynamic_shapes="bogus", backend="eager")
    with pytest.raises(ValueError, match="dynamic_shapes must be"):
        stl_compile(_linear(), (torch.randn(2, 32),), dynamic_shapes=3, backend="eager")


def test_example_inputs_that_do_not_fit_forward_name_the_expected_inputs():
    x = torch.randn(2, 8, 32)
    with pytest.raises(ValueError, match=r"do not fit Linear\.forward\(input.*example_kwargs"):
        stl_compile(_linear(), (x, x), backend="eager")
    with pytest.raises(TypeError, match=r"must be a tuple.*got a list of 1.*tuple\("):
        stl_compile(_linear(), [x], backend="eager")
    with pytest.raises(ValueError, match=r"forward\(\*, hidden\).*example_kwargs"):
        stl_compile(KeywordOnly().eval(), (x,), backend="eager")
    compiled = stl_compile(KeywordOnly().eval(), (), STLConfig(basis="strassen", min_dim=8,
                                                                max_cost_ratio=None),
                           example_kwargs={"hidden": x}, backend="eager")
    assert compiled.stl_report.converted


def test_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = nn.Linear(32, 32)
    with pytest.raises(ValueError, match=r"meta device.*'weight'.*[Ll]oad the weights"):
        stl_compile(model, (torch.randn(2, 32),), backend="eager")


def test_nan_in_the_example_is_refused():
    x = torch.randn(2, 8, 32)
    x[1, 3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"\['input 0'\] contain NaN.*finite"):
        stl_compile(_linear(), (x,), backend="eager")


def test_non_finite_model_output_on_the_example_warns():
    x = torch.randn(2, 8, 32)
    x[0, 0, 0] = float("inf")
    with pytest.warns(UserWarning, match="not finite"):
        stl_compile(_linear(), (x,), STLConfig(basis="strassen", max_cost_ratio=None),
                    backend="eager")


def test_train_mode_with_dropout_warns_and_eval_mode_does_not():
    model = nn.Sequential(nn.Linear(32, 32), nn.Dropout(0.1), nn.Linear(32, 32))
    x = torch.randn(2, 8, 32)
    config = STLConfig(basis="strassen", max_cost_ratio=None)
    with pytest.warns(UserWarning, match=r"train\(\) mode.*dropout.*model\.eval\(\)"):
        stl_compile(model, (x,), config, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stl_compile(model.eval(), (x,), config, backend="eager")
        # train mode without training-only ops: nothing differs, nothing to say
        stl_compile(nn.Sequential(nn.Linear(32, 32)), (x,), config, backend="eager")


def test_compiling_a_compiled_model_says_it_is_already_stl():
    x = torch.randn(2, 8, 32)
    compiled = stl_compile(_linear(), (x,), STLConfig(basis="strassen", max_cost_ratio=None),
                           backend="eager")
    with pytest.raises(ValueError, match="already the output of stl_compile"):
        stl_compile(compiled, (x,), backend="eager")


# --- torch.compile options -----------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"mode": "reduce-overhead"}, {"mode": "max-autotune"},
                                    {"options": {"max_autotune": True}, "dynamic": True},
                                    {}])
def test_mode_options_dynamic_reach_torch_compile(monkeypatch, kwargs):
    seen = {}

    def fake_compile(module, **given):
        seen.update(given)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    stl_compile(_linear(), (torch.randn(2, 8, 32),), STLConfig(basis="strassen",
                                                               max_cost_ratio=None), **kwargs)
    expected = {"backend": "inductor", "mode": None, "options": None, "dynamic": None} | kwargs
    assert seen == expected


@pytest.mark.parametrize("kwargs, error, match", [
    ({"mode": "turbo"}, ValueError, r"mode must be None or one of \[.*'reduce-overhead'"),
    ({"mode": "max-autotune", "options": {"max_autotune": True}}, ValueError,
     "mode or options, not both"),
    ({"options": {"no_such_option": 1}}, ValueError, r"unknown Inductor options"),
    ({"options": "fast"}, TypeError, "options must be a dict"),
    ({"dynamic": "yes"}, TypeError, "dynamic must be None, True or False"),
    ({"mode": "reduce-overhead", "backend": "eager"}, ValueError,
     r"mode apply to backend='inductor'.*'eager'"),
])
def test_bad_compile_options_are_refused_before_capture(kwargs, error, match):
    with pytest.raises(error, match=match):
        stl_compile(DataDependent(), (torch.randn(2, 16),), **kwargs)


class _LinearThenGram(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        h = self.fc(x)
        return h @ h.transpose(-2, -1)


@pytest.mark.parametrize("dtype,name", [(torch.float32, "fitted4x24"),
                                        (torch.bfloat16, "fitted4x24-bf16")])
def test_default_basis_follows_the_site_dtype(dtype, name):
    """basis="auto": the linear site (by its weight) and the act x act site (by its inputs) of
    a bf16 model get the bf16-conditioned basis, of a float32 model the minimum-alpha one."""
    torch.manual_seed(0)
    model = _LinearThenGram().to(dtype).eval()
    compiled = stl_compile(model, (torch.randn(2, 16, 64, dtype=dtype),),
                           STLConfig(max_cost_ratio=None), backend="eager")
    sites = {s.name: (s.kind, s.converted, s.basis) for s in compiled.stl_report.sites}
    assert sites == {"fc": ("linear", True, name), "matmul": ("matmul", True, name)}
