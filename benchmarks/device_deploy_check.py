"""Deployment parity on the device machine: ONNX Runtime (CPU provider) against torch.

For each model (the repo's MLP, ViT encoder and Llama-style decoder, and tiny transformers
BERT / ViT / Llama when transformers is installed) and each basis (exact Strassen, rank-24
random):

1. ``stl_compile(..., backend="eager")`` on CPU, ``export_onnx``, run it in ONNX Runtime at
   batch / sequence sizes other than the example: relative error against the same module in
   torch on CPU and on CUDA (fp32, TF32 off; the CUDA run uses the Triton kernels of the STL
   ops when they are registered), and against the dense model for the exact basis;
2. the MLP also as an AOTInductor package compiled for CUDA, loaded and compared.

TensorRT and the ORT CUDA provider are not on the machine: not checked. Writes
``$OUT/device_deploy_check.json`` (or ``--out``) and prints a table; exits 1 when a check
fails its tolerance (float32 relative error 1e-4).

Usage: ``STL_COMMIT=$(git rev-parse HEAD) python benchmarks/device_deploy_check.py``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stl_compiler as stl  # noqa: E402  (after the path fix above)
from stl_compiler.exporters import export_aoti, export_onnx, load_aoti  # noqa: E402
from stl_compiler.models import MLP, DecoderLM, ViTEncoder  # noqa: E402
from stl_compiler.runtime import ort_session  # noqa: E402

TOL = 1e-4


def _cases() -> dict:
    """name → (factory, example input, test inputs): the repo's models (stl_compiler.models)
    and, when transformers is installed, tiny random BERT / ViT / Llama."""
    ids = lambda b, s: torch.randint(0, 128, (b, s))  # noqa: E731
    cases = {
        "mlp": (lambda: MLP([64, 256, 128, 64], ["gelu", "relu"]), torch.randn(2, 6, 64),
                [torch.randn(3, 11, 64), torch.randn(8, 33, 64)]),
        "vit": (lambda: ViTEncoder(image_size=32, patch=4, dim=64, depth=2, heads=4),
                torch.randn(2, 3, 32, 32), [torch.randn(3, 3, 32, 32),
                                            torch.randn(5, 3, 32, 32)]),
        "decoder": (lambda: DecoderLM(vocab=128, dim=64, depth=2, heads=4, kv_heads=2),
                    ids(2, 6), [ids(3, 11), ids(4, 40)]),
    }
    try:
        import transformers as tf
    except ImportError:
        return cases
    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128}
    cases["hf_bert"] = (lambda: tf.BertModel(tf.BertConfig(
        vocab_size=128, max_position_embeddings=128, attn_implementation="eager", **small),
        add_pooling_layer=False), ids(2, 6), [ids(3, 11), ids(4, 40)])
    cases["hf_vit"] = (lambda: tf.ViTForImageClassification(tf.ViTConfig(
        image_size=32, patch_size=4, num_labels=10, attn_implementation="eager", **small)),
        torch.randn(2, 3, 32, 32), [torch.randn(3, 3, 32, 32), torch.randn(5, 3, 32, 32)])
    cases["hf_llama"] = (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=128, max_position_embeddings=128, num_key_value_heads=2, use_cache=False,
        attn_implementation="sdpa", **small)), ids(2, 6), [ids(3, 11), ids(4, 40)])
    return cases


def _first(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def _compile(model: nn.Module, example: torch.Tensor, config: stl.STLConfig) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stl.stl_compile(model, (example,), config, backend="eager")


def check_onnx(name, factory, example, inputs, basis: str, tmp: Path) -> dict:
    """ORT (CPU) against torch. The exact basis converts every matmul site and is compared
    with the dense model; the rank-24 basis converts the linear layers only, so that the
    eager ``swap_linears_`` model (any input shape, CPU and CUDA) is its reference. The
    compiled GraphModules are compared at the first test shape only: their shape guards
    admit shapes near the example's."""
    torch.manual_seed(0)
    dense = factory().eval()
    targets = ("linear", "matmul") if basis == "strassen" else ("linear",)
    # Deployment parity, not causality: token tiles with any basis, on decoders too.
    config = stl.STLConfig(basis=basis, tile=4, rank=24, min_dim=1, targets=targets,
                           row_grouping="tokens", allow_non_causal=True)
    compiled = _compile(copy.deepcopy(dense), example, config)
    start = time.perf_counter()
    path = export_onnx(compiled, example, tmp / f"{name}-{basis}.onnx")
    row = {"model": name, "basis": basis, "sites": len(compiled.stl_report.converted),
           "export_s": round(time.perf_counter() - start, 1)}
    session = ort_session(path)
    row["provider"] = session.provider
    references = {"stl_compile_cpu": (compiled, inputs[:1])}
    if basis == "strassen":
        references["dense_cpu"] = (dense, inputs)
    else:
        eager = copy.deepcopy(dense)
        stl.swap_linears_(eager, config)
        references["swap_linears_cpu"] = (eager, inputs)
        if torch.cuda.is_available():
            references["swap_linears_cuda"] = (copy.deepcopy(eager).cuda(), inputs)
    if torch.cuda.is_available():
        gpu = _compile(copy.deepcopy(dense).cuda(), example.cuda(), config)
        references["stl_compile_cuda"] = (gpu, inputs[:1])
    for label, (module, xs) in references.items():
        device = "cuda" if label.endswith("cuda") else "cpu"
        try:
            with torch.no_grad():
                row[f"ort_vs_{label}"] = max(
                    _rel(session.run(x)[0], _first(module(x.to(device)))) for x in xs)
        except AssertionError as err:  # a GraphModule shape guard
            row[f"ort_vs_{label}"] = f"guard: {str(err)[:120]}"
    return row


def check_aoti(factory, example, inputs, tmp: Path) -> dict:
    torch.manual_seed(0)
    dense = factory().eval().cuda()
    config = stl.STLConfig(basis="strassen", min_dim=1)
    compiled = _compile(copy.deepcopy(dense), example.cuda(), config)
    start = time.perf_counter()
    package = export_aoti(compiled, example.cuda(), tmp / "mlp.pt2")
    row = {"model": "mlp", "basis": "strassen", "aoti_compile_s":
           round(time.perf_counter() - start, 1)}
    loaded = load_aoti(package)
    with torch.no_grad():
        row["aoti_cuda_vs_dense_cuda"] = max(_rel(loaded(x.cuda()), dense(x.cuda()))
                                             for x in inputs)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--models", nargs="*", help="subset of the model names")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import onnxruntime

    result = {
        "commit": os.environ.get("STL_COMMIT", "unknown"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "ort_providers": onnxruntime.get_available_providers(),
        "python": platform.python_version(), "tolerance": TOL, "rows": [], "failures": [],
    }
    cases = _cases()
    names = args.models or list(cases)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for basis in ("strassen", "random"):
                try:
                    row = check_onnx(name, *cases[name], basis, Path(tmp))
                except Exception as err:  # noqa: BLE001 - recorded, the run goes on
                    row = {"model": name, "basis": basis, "error": repr(err)[:300],
                           "trace": traceback.format_exc()[-1500:]}
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
        if torch.cuda.is_available() and "mlp" in names:
            try:
                row = check_aoti(*cases["mlp"], Path(tmp))
            except Exception as err:  # noqa: BLE001
                row = {"model": "mlp", "aoti_error": repr(err)[:300],
                       "trace": traceback.format_exc()[-1500:]}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    for row in result["rows"]:
        for key, value in row.items():
            if "error" in key or (("_vs_" in key) and isinstance(value, float) and value > TOL):
                result["failures"].append(f"{row['model']}/{row.get('basis')}: {key}={value}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_deploy_check.json").write_text(json.dumps(result, indent=1))
    print(f"{len(result['rows'])} checks, {len(result['failures'])} failures: "
          f"{result['failures']}\nwrote {out / 'device_deploy_check.json'}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
