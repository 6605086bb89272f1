#!/usr/bin/env bash
# GPU check, one command, under 5 minutes on one NVIDIA GPU:
#
#   bash benchmarks/gpu_check.sh                         # -> gpu_check.json
#   bash benchmarks/gpu_check.sh --out FILE.json
#   bash benchmarks/gpu_check.sh --device cpu            # dry mode: tiny sizes, on the CPU
#
# resnet56 -> resnet20 KD on synthetic CIFAR-shaped data, bf16-mixed and channels-last:
# images/second of live KD, recorded KD and the student alone (benchmarks/recorded_teacher.py),
# the Lightning-vs-plain-loop ratio (benchmarks/step_overhead.py), eager vs compiled vs CUDA-graph
# steps at the protocol's batch of 64 (benchmarks/compiled_step.py), and 1, 2 and 4 concurrent
# jobs on the one GPU (benchmarks/concurrent_jobs.py). Installs nothing: it runs the checkout with
# the machine's torch + lightning + torchmetrics (no Hydra needed).
set -euo pipefail

device=cuda
out=gpu_check.json
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--device cuda|cpu] [--out FILE.json]" >&2; exit 2 ;;
  esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if [ "$device" = cpu ]; then  # dry mode: checks the script end to end in seconds
  models=(--teacher resnet8 --student resnet8)
  recorded=(--train-size 128 --batch-size 32 --repeats 1 --top-k 5)
  overhead=(--batch-size 16 --steps 2 --pairs 1)
  compiled=(--variants eager --batch-size 16 --warmup 1 --steps 2 --repeats 1)
  concurrent=(--jobs 1 2 --batch-size 16 --warmup 1 --steps 2)
else
  "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch; use --device cpu for the dry mode')"
  models=(--teacher resnet56 --student resnet20)
  recorded=(--train-size 25600 --batch-size 256 --repeats 3 --top-k 10)
  overhead=(--batch-size 256 --steps 200 --pairs 5)  # enough steps that Trainer start-up is not what is measured
  compiled=(--variants eager compiled graphs --batch-size 64 --warmup 20 --steps 300 --repeats 2)
  concurrent=(--jobs 1 2 4 --batch-size 64 --warmup 20 --steps 300)
fi
precision=(--device "$device" --precision bf16-mixed --channels-last)

"$python" "$repo/benchmarks/recorded_teacher.py" "${models[@]}" "${recorded[@]}" "${precision[@]}" --json "$tmp/recorded.json"
"$python" "$repo/benchmarks/step_overhead.py" "${models[@]}" "${overhead[@]}" "${precision[@]}" --json "$tmp/overhead.json"
"$python" "$repo/benchmarks/compiled_step.py" "${models[@]}" "${compiled[@]}" "${precision[@]}" --json "$tmp/compiled.json"
"$python" "$repo/benchmarks/concurrent_jobs.py" "${models[@]}" "${concurrent[@]}" "${precision[@]}" --json "$tmp/concurrent.json"
"$python" - "$tmp/recorded.json" "$tmp/overhead.json" "$tmp/compiled.json" "$tmp/concurrent.json" "$out" <<'PY'
import json, sys
recorded, overhead, compiled, concurrent = (json.load(open(path)) for path in sys.argv[1:5])
out = sys.argv[5]
full = recorded["full"]
summary = {
    "machine": recorded["machine"], "torch": recorded["torch"], "lightning": recorded["lightning"],
    "pair": f"{recorded['teacher']} -> {recorded['student']}", "precision": recorded["precision"], "channels_last": recorded["channels_last"],
    "images_per_s": full["images_per_s"],
    "recorded_over_alone_time": round(full["epoch_s"]["recorded"] / full["epoch_s"]["alone"], 3),
    "live_over_recorded_time": round(full["epoch_s"]["live"] / full["epoch_s"]["recorded"], 3),
    "lightning_over_plain_time": overhead["ratio"],
    "compiled_images_per_s": compiled["images_per_s"],
    "concurrent_images_per_s": {str(r["jobs"]): r["images_per_s"] for r in concurrent["rounds"]},
    "details": {"recorded_teacher": recorded, "step_overhead": overhead, "compiled_step": compiled, "concurrent_jobs": concurrent},
}
json.dump(summary, open(out, "w"), indent=2)
print(json.dumps({k: v for k, v in summary.items() if k != "details"}, indent=2))
print(f"written: {out}")
PY
