#!/usr/bin/env bash
# On the GPU machine: the 1B-shaped model, `peftopt bench` on t1, and t1 shortened to 50 steps end to end.
#   bash tests/gpu_bench.sh OUT_DIR [BENCH_STEPS]
set -euo pipefail
out=${1:?OUT_DIR}; steps=${2:-15}
work=/tmp/peftopt-gpu; mkdir -p "$work"
[ -f "$work/l1b/config.json" ] || python3 tests/gpu_models.py llama1b "$work/l1b" >/dev/null
[ -f "$work/long.jsonl" ] || python3 tests/gpu_models.py data "$work/long.jsonl" 12000 >/dev/null
python3 -m job bench jobspecs/t1.json --set model.base="$work/l1b" --steps "$steps" --json "${@:3}" \
  | tee "$out/bench-t1.json"
python3 -m job bench jobspecs/t1.json --set model.base="$work/l1b" --set train.max_memory_gb=2.6 --steps "$steps" --json \
  | tee "$out/bench-t1-cap2.6.json"
PEFTOPT_LOG_FORMAT=json python3 -m job run jobspecs/t1.json --output-dir "$work/runs" --set model.base="$work/l1b" \
  --set data.source="$work/long.jsonl" --set train.max_steps=50 --set push=null --set evaluate=null \
  --set export.tokenizer_pre=llama-bpe > "$out/t1-50.jsonl"
cp "$work/runs/baseline_1B_r16_10k_600steps/metrics.json" "$out/t1-50-metrics.json"
