#!/usr/bin/env bash
# One device call = one stage (each must end well inside the 10-minute limit):
#   bash benchmarks/device_run.sh tests|mlp|model|passes|deploy|layer|strip|train|ort|decode|bf16examples
# Writes logs and JSON under $OUT. Records the device, versions and commit first.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 STL_COMMIT="${STL_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
OUT="${OUT:-out}"; mkdir -p "$OUT"
{
  date -u; echo "commit $STL_COMMIT"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$OUT/env_$1.txt"
case "$1" in
  tests)   timeout 420 python3 -m pytest -q -p no:cacheprovider ${STL_TESTS:-tests/runtime/test_triton_kernels.py \
             tests/passes tests/test_api.py} 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
  mlp)     timeout 420 python3 benchmarks/bench_mlp_block.py 2>&1 | tee "$OUT/mlp_block.log" ;;
  model)   timeout 560 python3 benchmarks/bench_model.py ${STL_MODEL_ARGS:-} 2>&1 | tee "$OUT/model.log" ;;
  passes)  timeout 400 python3 benchmarks/bench_pass_time.py 2>&1 | tee "$OUT/pass_time.log" ;;
  deploy)  timeout 400 python3 benchmarks/device_deploy_check.py 2>&1 | tee "$OUT/deploy.log" ;;
  layer)   timeout 560 python3 benchmarks/bench_layer.py 2>&1 | tee "$OUT/layer.log" ;;
  strip)   timeout 300 python3 benchmarks/bench_row_strip.py 2>&1 | tee "$OUT/row_strip.log" ;;
  train)   timeout 400 python3 benchmarks/bench_train_step.py 2>&1 | tee "$OUT/train_step.log" ;;
  ort)     timeout 400 python3 benchmarks/bench_ort.py --profile ${STL_ORT_ARGS:-} 2>&1 | tee "$OUT/ort.log" ;;
  decode)  timeout 240 python3 benchmarks/bench_decode_layer.py --out "$OUT" 2>&1 | tee "$OUT/decode_layer.log"
           timeout 300 python3 benchmarks/gpu_generation_check.py --hidden 4096 --intermediate 14336 \
             --heads 32 --kv-heads 8 --layers 4 --prompt 512 --new 128 --batches 1 32 --modes compiled \
             --skip exact rank24 --out "$OUT" 2>&1 | tail -3 > "$OUT/generation_speed.log" ;;
  # one process per rank: forked rank workers cannot run autograd on a CUDA machine
  bf16examples)
           for r in ${STL_RANKS:-16 24 32 40 48}; do
             timeout 420 python3 examples/digits_vit.py --ranks "$r" --bf16-cuda \
               --out "$OUT/digits_r$r.json" > "$OUT/digits_r$r.log" 2>&1 &
           done; wait
           python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
ranks, data = {}, {}
for f in sorted(out.glob("digits_r*.json")):
    data = json.loads(f.read_text()); ranks.update(data["ranks"])
    f.unlink()  # one merged file: the device returns a limited number of files
(out / "digits_bf16.json").write_text(json.dumps(
    {"dense": data.get("dense"), "dense_extra": data.get("dense_extra"), "ranks": ranks},
    indent=1))
print(json.dumps(ranks))
PY
           ;;
  *) echo "unknown stage $1"; exit 2 ;;
esac
