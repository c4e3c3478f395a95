#!/usr/bin/env bash
# On a machine with 2 GPUs, jobspecs/t1.json (1B shape with random weights, QLoRA, the same 12,000 long local
# conversations as bench/gpu_t1.sh; push=null):
#   bash bench/gpu_multi.sh OUT speed    600 steps data-parallel on both GPUs (`--nproc 2`, auto: the hf
#                                        backend), then the 1-GPU baselines of the same spec: hf on GPU 0 and
#                                        unsloth (auto) on GPU 1, the two at once to fit one call
#   bash bench/gpu_multi.sh OUT resume   a 2-rank run stopped by SIGTERM after checkpoint 10, resumed through
#                                        torchrun and finished (rank 0 alone merges and writes the q8_0 GGUF),
#                                        beside an uninterrupted 2-rank run of the same spec; then 10 steps
#                                        under `accelerate launch`
# Training figures come from each run's metrics.json (what the job measures), not from a bench.
set -uo pipefail
out=${1:?OUT_DIR}; mode=${2:-speed}
work=/tmp/peftopt-gpu; mkdir -p "$work" "$out"
export PEFTOPT_LOG_FORMAT=json
[ -f "$work/l1b/config.json" ] || python3 bench/gpu_models.py llama1b "$work/l1b" >/dev/null
[ -f "$work/long.jsonl" ] || python3 bench/gpu_models.py data "$work/long.jsonl" 12000 >/dev/null
for dir in ${PYTHONPATH//:/ }; do [[ $dir == /tmp/* ]] && python3 -m compileall -q -j 16 "$dir" >/dev/null; done
common=(--output-dir "$work/runs" --set model.base="$work/l1b" --set data.source="$work/long.jsonl" --set push=null
        --set export.tokenizer_pre=llama-bpe)
training_only=(--set evaluate=null --set export.merge=false --set export.gguf=[])
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpus.txt"
python3 -c 'import torch, transformers, trl, peft; print("torch", torch.__version__, "cuda", torch.version.cuda,
"transformers", transformers.__version__, "trl", trl.__version__, "peft", peft.__version__)' | tee -a "$out/gpus.txt"
keep() { [ -n "${OUT:-}" ] && tar czf "$OUT/o.tgz" -C "$out" .; }  # what finished comes back if the call times out

figures() {  # NAME: the run's training figures from its metrics.json, one JSON line
  cp "$work/runs/$1/metrics.json" "$out/$1-metrics.json" 2>/dev/null
  python3 - "$out/$1-metrics.json" "$1" <<'EOF' | tee -a "$out/summary.jsonl"
import json, sys
try:
    t = json.load(open(sys.argv[1]))["train"]
except (OSError, KeyError):
    print(json.dumps({"run": sys.argv[2], "metrics": None})); sys.exit(0)
print(json.dumps({"run": sys.argv[2], **{k: t.get(k) for k in (
    "backend", "world_size", "micro_batch", "accumulation", "gradient_checkpointing", "attention", "kernels",
    "global_step", "session_runtime_s", "session_tokens", "tokens_per_s", "steady_tokens_per_s", "peak_gpu_gb",
    "final_loss", "checkpointing")}}))
EOF
}

run() {  # NAME [args...]: one `peftopt run` of t1 with its exit code and wall clock
  local name=$1; shift
  local started=$(date +%s.%N)
  python3 -m job run jobspecs/t1.json "${common[@]}" --set name="$name" "$@" > "$out/$name.jsonl" 2> "$out/$name.err"
  local code=$?
  echo "{\"run\": \"$name\", \"exit\": $code, \"wall_s\": $(python3 -c "import time; print(round(time.time() - $started, 1))")}" \
    | tee -a "$out/summary.jsonl"
  figures "$name"; keep
  return $code
}

case "$mode" in
  speed)
    run dp2 "${training_only[@]}" --nproc 2
    CUDA_VISIBLE_DEVICES=0 run one-hf "${training_only[@]}" --set train.backend=hf &
    CUDA_VISIBLE_DEVICES=1 run one-unsloth "${training_only[@]}" &
    wait
    python3 - "$out" <<'EOF' | tee "$out/speedup.json"
import json, sys
m = {n: json.load(open(f"{sys.argv[1]}/{n}-metrics.json"))["train"] for n in ("dp2", "one-hf", "one-unsloth")}
ratio = lambda key, base: round(m["dp2"][key] / m[base][key], 3)
print(json.dumps({"whole_run_vs_hf": ratio("tokens_per_s", "one-hf"), "whole_run_vs_unsloth": ratio("tokens_per_s", "one-unsloth"),
                  "steady_vs_hf": ratio("steady_tokens_per_s", "one-hf"), "steady_vs_unsloth": ratio("steady_tokens_per_s", "one-unsloth"),
                  "final_loss": {n: m[n]["final_loss"] for n in m},
                  "final_loss_rel_diff_vs_hf": abs(m["dp2"]["final_loss"] - m["one-hf"]["final_loss"]) / m["one-hf"]["final_loss"]}))
EOF
    keep
    ;;
  resume)
    small=(--set evaluate=null --set train.max_steps=30)
    run straight "${training_only[@]}" --set train.max_steps=30 --nproc 2
    python3 -m job run jobspecs/t1.json "${common[@]}" --set name=preempted "${small[@]}" --nproc 2 \
      > "$out/preempted.jsonl" 2> "$out/preempted.err" &
    pid=$!
    for _ in $(seq 1200); do
      ls "$work"/runs/preempted/checkpoints/checkpoint-10/peftopt-checkpoint.json >/dev/null 2>&1 && break; sleep 0.25
    done
    t0=$(date +%s.%N); kill -TERM $pid; wait $pid; code=$?; t1=$(date +%s.%N)
    grep -h '"checkpoint_saved"\|"job_interrupted"\|"train_interrupted"' "$out/preempted.jsonl" | tail -3
    echo "{\"sigterm_exit\": $code, \"seconds_to_exit\": $(python3 -c "print(round($t1 - $t0, 2))")}" | tee -a "$out/summary.jsonl"
    ls "$work"/runs/preempted/checkpoints/ | tee "$out/preempted-checkpoints.txt"
    started=$(date +%s.%N)
    python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m job run jobspecs/t1.json "${common[@]}" \
      --set name=preempted "${small[@]}" > "$out/resumed.jsonl" 2> "$out/resumed.err"
    echo "{\"run\": \"resumed (torchrun)\", \"exit\": $?, \"wall_s\": $(python3 -c "import time; print(round(time.time() - $started, 1))")}" \
      | tee -a "$out/summary.jsonl"
    figures preempted
    grep -h '"train_resumed"\|"gguf_written"\|"gguf_verified"\|"job_finished"' "$out/resumed.jsonl" | head -8
    python3 - "$work/runs/straight/adapter/adapter_model.safetensors" "$work/runs/preempted/adapter/adapter_model.safetensors" \
      <<'EOF' | tee "$out/resume-vs-straight.json"
import json, sys
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
print(json.dumps({"tensors": len(a), "same_names": set(a) == set(b), "max_abs_diff": diff,
                  "identical": all(bool((a[k] == b[k]).all()) for k in a)}))
EOF
    cp "$work/runs/preempted/state.json" "$out/preempted-state.json"; keep
    accelerate launch --multi_gpu --num_processes 2 -m job run jobspecs/t1.json "${common[@]}" --set name=accel \
      "${training_only[@]}" --set train.max_steps=10 > "$out/accel.jsonl" 2> "$out/accel.err"
    echo "{\"run\": \"accelerate launch\", \"exit\": $?}" | tee -a "$out/summary.jsonl"
    figures accel; keep
    ;;
esac
