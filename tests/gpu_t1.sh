#!/usr/bin/env bash
# On the GPU machine: jobspecs/t1.json for real on the 1B-shaped model with random weights and long local
# conversations (push=null): each stage timed by the job itself (metrics.json), beside `peftopt bench`.
#   bash tests/gpu_t1.sh OUT check      the GPU tests of the packed-attention path, 60-step runs of each
#                                       backend end to end, a short bench
#   bash tests/gpu_t1.sh OUT unsloth    the whole 600-step run (auto: unsloth), 50 steps of the slow path
#                                       (unsloth's per-segment SDPA) for the loss curve, and the bench
#   bash tests/gpu_t1.sh OUT hf         the whole 600-step run on the hf backend
# Expects the bundle (.gpu) unpacked on PYTHONPATH and LLAMA_CPP_DIR pointing at the pinned llama.cpp.
set -uo pipefail
out=${1:?OUT_DIR}; mode=${2:-check}
work=/tmp/peftopt-gpu; mkdir -p "$work" "$out"
export PEFTOPT_LOG_FORMAT=json
[ -f "$work/l1b/config.json" ] || python3 tests/gpu_models.py llama1b "$work/l1b" >/dev/null
[ -f "$work/long.jsonl" ] || python3 tests/gpu_models.py data "$work/long.jsonl" 12000 >/dev/null
common=(--output-dir "$work/runs" --set model.base="$work/l1b" --set data.source="$work/long.jsonl" --set push=null
        --set export.tokenizer_pre=llama-bpe)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import torch, transformers, trl, peft; print("torch", torch.__version__, "cuda", torch.version.cuda,
"transformers", transformers.__version__, "trl", trl.__version__, "peft", peft.__version__)' | tee -a "$out/gpu.txt"

run() {  # NAME [overrides...]: one `peftopt run` of t1; events, metrics and the stage times kept under OUT
  local name=$1; shift
  local started=$(date +%s.%N)
  python3 -m job run jobspecs/t1.json "${common[@]}" --set name="$name" "$@" > "$out/$name.jsonl" 2> "$out/$name.err"
  local code=$?
  echo "{\"run\": \"$name\", \"exit\": $code, \"wall_s\": $(python3 -c "import time; print(round(time.time() - $started, 1))")}" \
    | tee -a "$out/runs.jsonl"
  cp "$work/runs/$name/metrics.json" "$out/$name-metrics.json" 2>/dev/null
  python3 - "$out/$name-metrics.json" <<'EOF' | tee -a "$out/summary.txt"
import json, sys
try:
    m = json.load(open(sys.argv[1]))
except OSError:
    sys.exit(0)
t = m.get("train", {})
print(json.dumps({"run": m.get("run", {}).get("name"), "stages": {k: v["runtime_s"] for k, v in m.get("stages", {}).items()},
                  "backend": t.get("backend"), "attention": t.get("attention"), "plan": [t.get("micro_batch"), t.get("accumulation"), t.get("gradient_checkpointing")],
                  "tokens_per_s": t.get("tokens_per_s"), "steady_tokens_per_s": t.get("steady_tokens_per_s"),
                  "peak_gpu_gb": t.get("peak_gpu_gb"), "peak_gpu_share": t.get("peak_gpu_share"),
                  "checkpointing": t.get("checkpointing"), "final_loss": t.get("final_loss"),
                  "gguf_verify": {q: {"agreement": f["verify"]["agreement"], "tokenizer_match": f["verify"]["tokenizer_match"]}
                                  for q, f in m.get("gguf", {}).get("files", {}).items()}}))
EOF
  [ -n "${OUT:-}" ] && tar czf "$OUT/o.tgz" -C "$out" .  # what finished comes back even if the call times out
  return $code
}

case "$mode" in
  check)
    python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py -k "varlen or unsloth_takes" 2>&1 | tail -15 | tee "$out/kernel-tests.txt"
    run u60 --set train.max_steps=60 --set evaluate.max_new_tokens=64
    run h60 --set train.max_steps=60 --set train.backend=hf --set evaluate=null --set export.merge=false --set export.gguf=[]
    python3 -m job bench jobspecs/t1.json "${common[@]:2}" --steps 10 --json > "$out/bench.json" 2> "$out/bench.err"
    python3 -m job bench jobspecs/t1.json "${common[@]:2}" --steps 10 | tee "$out/bench.md"
    ;;
  unsloth)
    run t1-unsloth
    UNSLOTH_TORCH_VARLEN=0 run t1-slow50 --set train.max_steps=50 --set evaluate=null --set export.merge=false --set export.gguf=[]
    python3 -m job bench jobspecs/t1.json "${common[@]:2}" --steps 12 --json > "$out/bench.json" 2> "$out/bench.err"
    python3 -c 'import json, sys; sys.path.insert(0, "."); from job.bench import table; print(table(json.load(open(sys.argv[1]))))' \
      "$out/bench.json" | tee "$out/bench.md"
    [ -n "${OUT:-}" ] && tar czf "$OUT/o.tgz" -C "$out" .
    ;;
  hf)
    run t1-hf --set train.backend=hf --set evaluate=null --set export.merge=false --set export.gguf=[]
    python3 -m job bench jobspecs/t1.json "${common[@]:2}" --steps 10 --json > "$out/bench.json" 2> "$out/bench.err"
    python3 -c 'import json, sys; sys.path.insert(0, "."); from job.bench import table; print(table(json.load(open(sys.argv[1]))))' \
      "$out/bench.json" | tee "$out/bench.md"
    [ -n "${OUT:-}" ] && tar czf "$OUT/o.tgz" -C "$out" .
    ;;
esac
