"""Row-strip kernel benchmark: ``stl::decode_norm_encode`` and ``stl::decode_softmax_encode``
against their unfused chains, on CUDA.

One transformer boundary: the encoded output of one STL site (rank 24) is decoded, added to
the residual stream, normalized (RMSNorm or LayerNorm) and encoded for every site that reads
the normalized value (Q, K, V: three encoders stacked, or one). Rows, timed side by side in
one run on the same tensors (bf16, t=4):

- fused:   ``torch.ops.stl.decode_norm_encode`` (the Triton row-strip kernel): reads the
           encoded tensor and the residual, writes the residual sum and the encoded input of
           the next sites;
- unfused: ``torch.compile`` of decode → add → norm → one encode per consumer (Triton decode
           and encode kernels; Inductor fuses the add and the norm into one kernel that writes
           the sum and the normalized value).

Attention (``decode_softmax_encode``, the QKᵀ site's encoded scores → scale → causal mask →
softmax → the AV site's encode), rank 24 in and out: fused op vs ``torch.compile`` of decode →
scale → mask → softmax → encode.

``GB/s`` is the fused op's minimal traffic (encoded in, residual in, sum out, encoded out)
over its time, for both rows: how close each comes to moving only the bytes that must move.
Times are medians of ``triton.testing.do_bench`` (L2 flushed), as in ``bench_layer.py``.
Correctness: fused vs unfused rel. difference (bf16; the same basis, so rounding only), and
the fused op in float32 against the aten composite (gate 1e-4: exit status 1 when it fails).

Usage (CUDA machine, ~1 min)::

    python benchmarks/bench_row_strip.py [--out DIR]

writes ``DIR/row_strip.json`` (``DIR`` defaults to ``$OUT``).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (  # noqa: E402  (after the path fix above)
    bench_ms,
    device_or_exit,
    environment,
    out_dir,
    print_env,
    rel_error,
    write_json,
)

from stl_compiler.runtime import ops, triton_kernels  # noqa: E402, F401  (CUDA kernels)

TILE = 4
RANK = 24
FP32_GATE = 1e-4

#: (name, batch, seq, hidden, norm, bias of the producing site, consumers)
CASES = [
    ("llama 4x2048x4096 rms -> q,k,v", 4, 2048, 4096, "rms", False, 3),
    ("llama 4x2048x4096 rms -> gate,up", 4, 2048, 4096, "rms", False, 2),
    ("llama 4x2048x4096 rms -> 1 site", 4, 2048, 4096, "rms", False, 1),
    ("vit-h 32x257x1280 layer -> q,k,v", 32, 257, 1280, "layer", True, 3),
    ("vit-h 32x257x1280 layer -> fc1", 32, 257, 1280, "layer", True, 1),
]


def operands(batch, seq, hidden, norm, bias, consumers, device, dtype, gen):
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)

    a, c = -(-seq // TILE), hidden // TILE
    return dict(
        encoded=rand(RANK, batch, a, c, scale=0.25), d=rand(RANK, TILE * TILE, scale=0.5),
        bias=rand(hidden) if bias else None, residual=rand(batch, seq, hidden),
        weight=rand(hidden), norm_bias=rand(hidden) if norm == "layer" else None,
        ex=rand(RANK * consumers, TILE * TILE, scale=0.5), rows=seq, cols=hidden, norm=norm)


def fused(o):
    return torch.ops.stl.decode_norm_encode(
        o["encoded"], o["d"], o["bias"], o["residual"], o["norm"], o["weight"], o["norm_bias"],
        1e-6, o["ex"], "sum", TILE, o["rows"], o["cols"])


def unfused(encoded, d, bias, residual, weight, norm_bias, ex, rows: int, cols: int,
            norm: str):
    y = torch.ops.stl.decode_epilogue(encoded, d, bias, "none", 1.0, TILE, rows, cols)
    h = residual + y
    n = ops.row_norm(h, norm, weight, norm_bias, 1e-6)
    # One encode per consumer site, as the unfused graph has them.
    return h, *(torch.ops.stl.encode(n, e, TILE) for e in ex.split(RANK))


#: (name, batch dims, sequence, causal)
SOFTMAX_CASES = [
    ("vit-h scores 32x16 heads x 257", (32, 16), 257, False),
    ("llama scores 1x32 heads x 2048 causal", (1, 32), 2048, True),
]


def unfused_softmax(encoded, d, ex, rows: int, cols: int, causal: bool):
    s = torch.ops.stl.decode(encoded, d, TILE, rows, cols) * 0.125
    if causal:
        keep = torch.ones(rows, cols, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return torch.ops.stl.encode(torch.softmax(s, dim=-1), ex, TILE)


def timed_row(name: str, fused_fn, unfused_fn, traffic: int, diff: float, fp32_err: float,
              device, runs: int, **fields) -> dict:
    """Time both callables side by side; the table row (printed) with ``traffic`` bytes as
    GB/s for each."""
    fused_ms = bench_ms(fused_fn, device, runs)
    unfused_ms = bench_ms(unfused_fn, device, runs)
    gbytes = traffic / 1e9
    row = {"case": name, **fields, "rank": RANK, "fused_ms": fused_ms, "unfused_ms": unfused_ms,
           "speedup": unfused_ms / fused_ms, "fused_gb_s": gbytes / fused_ms * 1e3,
           "unfused_gb_s": gbytes / unfused_ms * 1e3, "bf16_rel_diff_fused_vs_unfused": diff,
           "fp32_rel_err_vs_composite": fp32_err}
    print(f"  {name:<36} {fused_ms:>9.3f} {unfused_ms:>10.3f} {row['speedup']:>6.2f} "
          f"{row['fused_gb_s']:>10.0f} {row['unfused_gb_s']:>12.0f} {diff:>9.1e} "
          f"{fp32_err:>9.1e}")
    return row


def softmax_rows(args, device, gen) -> tuple[list[dict], list[str]]:
    compiled = torch.compile(unfused_softmax)
    rows, failed = [], []
    for name, batch, seq, causal in SOFTMAX_CASES:
        if args.smoke:
            batch, seq = (2, 2), 11
        a = -(-seq // TILE)

        def rand(*shape, scale, dtype=torch.bfloat16):
            return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)

        enc, d, ex = rand(RANK, *batch, a, a, scale=0.5), rand(RANK, 16, scale=0.5), rand(
            RANK, 16, scale=0.5)
        fused_fn = functools.partial(torch.ops.stl.decode_softmax_encode, enc, d, 0.125, None,
                                     causal, ex, TILE, seq, seq)
        unfused_fn = functools.partial(compiled, enc, d, ex, seq, seq, causal)
        diff = rel_error(fused_fn(), unfused_fn())
        e32, d32, x32 = enc.float(), d.float(), ex.float()
        fp32_err = rel_error(torch.ops.stl.decode_softmax_encode(
            e32, d32, 0.125, None, causal, x32, TILE, seq, seq),
            ops.decode_softmax_encode_aten(e32, d32, 0.125, None, causal, x32, TILE, seq, seq))
        if fp32_err > FP32_GATE:
            failed.append(name)
        # encoded scores in, encoded probabilities out
        rows.append(timed_row(name, fused_fn, unfused_fn, 2 * 2 * enc.numel(), diff, fp32_err,
                              device, args.runs, batch=list(batch), seq=seq, causal=causal))
    return rows, failed


def end_to_end_check(device) -> dict:
    """The repo's decoder (RMSNorm, causal SDPA decomposed, SwiGLU) through stl_compile with
    the exact basis, float32, Inductor, on the device: the row-strip kernels inside a compiled
    model must reproduce the dense model (gate 1e-4)."""
    from stl_compiler import STLConfig, stl_compile
    from stl_compiler.models import DecoderLM

    torch.manual_seed(0)
    model = DecoderLM(vocab=96, dim=64, depth=2, heads=4, kv_heads=2, mlp_dim=128).to(device)
    tokens = torch.randint(0, 96, (4, 32), device=device)
    fast = stl_compile(model.eval(), (tokens,), STLConfig(basis="strassen", decompose_sdpa=True),
                       backend="inductor")
    graph = getattr(fast, "_orig_mod", fast).graph  # the GraphModule inside torch.compile
    counts = {op: sum(n.target is getattr(torch.ops.stl, op).default for n in graph.nodes)
              for op in ("decode_norm_encode", "decode_softmax_encode")}
    with torch.no_grad():
        err = rel_error(fast(tokens), model(tokens))
    return {"rel_err_vs_dense": err, "row_strip_ops": counts, "gate": FP32_GATE,
            "passed": err < FP32_GATE}


def traffic_bytes(o) -> int:
    """Bytes the fused op must move: encoded in, residual in, sum out, encoded out."""
    size = o["residual"].element_size()
    return size * (o["encoded"].numel() + 2 * o["residual"].numel()
                   + o["ex"].shape[0] * o["encoded"][0].numel())


def run(args: argparse.Namespace) -> int:
    device = device_or_exit(args.smoke, "bench_row_strip")
    env = environment(device)
    print_env(env)
    gen = torch.Generator(device=device).manual_seed(0)
    compiled = torch.compile(unfused)
    rows, failed = [], []
    print(f"  {'case':<36} {'fused ms':>9} {'unfused ms':>10} {'x':>6} {'fused GB/s':>10} "
          f"{'unfused GB/s':>12} {'bf16 diff':>9} {'fp32 err':>9}")
    for name, batch, seq, hidden, norm, bias, consumers in CASES:
        if args.smoke:
            batch, seq, hidden = 2, 9, 64
        o = operands(batch, seq, hidden, norm, bias, consumers, device, torch.bfloat16, gen)
        args_unfused = dict(o)
        fused_out = fused(o)
        h, *encoded = compiled(**args_unfused)
        diff = max(rel_error(fused_out[0], h), rel_error(fused_out[1], torch.cat(encoded)))
        o32 = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in o.items()}
        composite = ops.decode_norm_encode_aten(
            o32["encoded"], o32["d"], o32["bias"], o32["residual"], norm, o32["weight"],
            o32["norm_bias"], 1e-6, o32["ex"], "sum", TILE, seq, hidden)
        fp32_err = max(rel_error(a, b) for a, b in zip(fused(o32), composite))
        if fp32_err > FP32_GATE:
            failed.append(name)
        rows.append(timed_row(name, functools.partial(fused, o),
                              functools.partial(compiled, **args_unfused), traffic_bytes(o),
                              diff, fp32_err, device, args.runs, batch=batch, seq=seq,
                              hidden=hidden, norm=norm, consumers=consumers))
    attention, attention_failed = softmax_rows(args, device, gen)
    failed += attention_failed
    e2e = end_to_end_check(device)
    print(f"  end to end (DecoderLM, exact basis, fp32, inductor): rel. err vs dense "
          f"{e2e['rel_err_vs_dense']:.1e}, row-strip ops {e2e['row_strip_ops']}")
    if not e2e["passed"]:
        failed.append("end to end")
    path = out_dir(args.out) / "row_strip.json"
    write_json(path, {"environment": env, "rank": RANK, "tile": TILE, "rows": rows,
                      "softmax_rows": attention, "end_to_end": e2e, "fp32_gate": FP32_GATE,
                      "failed": failed})
    print(f"wrote {path}")
    if failed:
        print(f"!!! float32 gate failed: {failed}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (aten path)")
    sys.exit(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
