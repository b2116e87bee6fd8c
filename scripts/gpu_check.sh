#!/usr/bin/env bash
# The GPU check, one command of at most 8 minutes on one GPU. It writes its figures under $OUT (the folder a device
# machine sends back) or build/gpu-check:
#   card.txt        the GPU, its driver, torch and CUDA
#   cuda_tests.txt  tests/test_cuda.py: bf16 sampling, guidance fitting, LM training and greedy evaluation on the GPU
#   round.json      a short round of configs/gpu.yaml at the quick profile's sizes (`ptg quick --small`: tiny models,
#                   the GPU's precision), the metrics of each stage; round.log its output
#   perf.json       `ptg perf`: sampling, greedy decoding, guidance scoring and a training step of SmolLM2-135M against
#                   transformers' own generate / training step in the same dtype; perf.txt its table
#   steps.txt       the seconds each step took, and the exit status of each
# It needs the project's environment with torch's CUDA build (the ptg:cuda image of the Dockerfile, or `make setup`
# and then the CUDA build as docs/reference.md says). `--dry`: the same steps on the CPU with perf at its smallest
# (tests/test_gpu_check.py runs it). The exit status is non-zero when a step failed; every step runs regardless.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
[ "${1:-}" = "--dry" ] && dry=1
out=${OUT:-build/gpu-check}
py=${PY:-.venv/bin/python}
bin=$(dirname "$py")
export PATH="$bin:$PATH" DVC_NO_ANALYTICS=1  # dvc and the stages' python from the same environment
round_dir=${ROUND_DIR:-build/gpu-check-round}
mkdir -p "$out"
device=cuda
perf_args=(--prompts 24)
if [ "$dry" = 1 ]; then
  device=cpu
  perf_args=(--prompts 2 --batch-size 2 --threads 1)  # one thread: the test suite runs beside it
fi
failed=0
: > "$out/steps.txt"

step() {  # step NAME COMMAND...: run it, log its seconds and exit status
  local name=$1 start=$SECONDS
  shift
  "$@"
  local rc=$?
  echo "$name: $((SECONDS - start)) s, exit $rc" >> "$out/steps.txt"
  [ "$rc" = 0 ] || failed=1
}

card() {
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "gpu: none (nvidia-smi absent)"
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'
  grep -m1 "model name" /proc/cpuinfo || true
}

round_metrics() {  # the metrics of every stage of round 1 in one file
  "$py" - "$round_dir" "$out/round.json" <<'PY'
import json, sys
from pathlib import Path
root, target = Path(sys.argv[1]), Path(sys.argv[2])
metrics = {p.stem: json.loads(p.read_text()) for p in sorted((root / "metrics" / "rounds" / "1").glob("*.json"))}
target.write_text(json.dumps({"params": "configs/gpu.yaml at the quick profile's sizes", "stages": metrics}, indent=2))
assert metrics.get("train_lm") and metrics.get("evaluate"), f"round 1 is incomplete in {root}: {sorted(metrics)}"
PY
}

step card card > "$out/card.txt" 2>&1
step cuda_tests "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$out/cuda_tests.txt" 2>&1
step round "$bin/ptg" quick --params configs/gpu.yaml --small --dir "$round_dir" > "$out/round.log" 2>&1
step round_metrics round_metrics
step perf "$bin/ptg" perf --device "$device" "${perf_args[@]}" --out "$out/perf.json" > "$out/perf.txt" 2>&1
cat "$out/steps.txt"
exit "$failed"
