#!/usr/bin/env bash
# On a machine with 2 GPUs: t1 (1B shape, QLoRA, hf backend) on 1 GPU and data-parallel on 2, same global batch
# (8 sequences of 2048 tokens per step); then a 2-rank run stopped by SIGTERM, resumed through torchrun and
# finished with rank 0 alone merging and writing the q8_0 GGUF; then a short run under `accelerate launch`.
#   bash tests/gpu_multi.sh OUT_DIR [STEPS] [speed]     (speed: only the 1-GPU / 2-GPU pair)
set -uo pipefail
out=${1:?OUT_DIR}; steps=${2:-40}; only=${3:-all}
work=/tmp/peftopt-gpu; mkdir -p "$work" "$out"
[ -f "$work/l1b/config.json" ] || python3 tests/gpu_models.py llama1b "$work/l1b" >/dev/null
[ -f "$work/long.jsonl" ] || python3 tests/gpu_models.py data "$work/long.jsonl" 6000 >/dev/null
export PEFTOPT_LOG_FORMAT=json
common=(--set model.base="$work/l1b" --set data.source="$work/long.jsonl" --set train.backend=hf
        --set train.micro_batch_size=4 --set train.gradient_checkpointing=off --set push=null --set evaluate=null)
summary() {  # whole-session and steady-state (after step 5) tokens/s from a run's events
  python3 - "$1" <<'EOF'
import json, sys, datetime
ev = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
p = [e for e in ev if e["event"] == "train_progress"]
t = lambda e: datetime.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
fin = next((e for e in ev if e["event"] == "train_finished"), {})
a = next((e for e in p if e["step"] == 5), None)
steady = (p[-1]["tokens"] - a["tokens"]) / (t(p[-1]) - t(a)) if a and len(p) > 6 else None
print(json.dumps({"file": sys.argv[1], "steps": fin.get("global_step"), "world_size": fin.get("world_size"),
                  "micro_batch": fin.get("micro_batch"), "accumulation": fin.get("accumulation"),
                  "tokens": fin.get("tokens"), "session_tokens_per_s": fin.get("tokens_per_s"),
                  "steady_tokens_per_s": round(steady, 1) if steady else None,
                  "peak_gpu_gb_rank0": fin.get("peak_gpu_gb"), "final_loss": fin.get("final_loss")}))
EOF
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpus.txt"

python3 -m job run jobspecs/t1.json --output-dir "$work/one" "${common[@]}" --set train.max_steps="$steps" \
  --set export=null > "$out/one-gpu.jsonl" 2> "$out/one-gpu.err"; echo "1 GPU exit $?"
summary "$out/one-gpu.jsonl" | tee -a "$out/summary.jsonl"

python3 -m job run jobspecs/t1.json --output-dir "$work/two" "${common[@]}" --set train.max_steps="$steps" \
  --set export=null --nproc 2 > "$out/two-gpu.jsonl" 2> "$out/two-gpu.err"; echo "2 GPUs exit $?"
summary "$out/two-gpu.jsonl" | tee -a "$out/summary.jsonl"

[ "$only" = speed ] && exit 0

# Preemption on 2 ranks: SIGTERM to the launcher after the step-10 checkpoint, then resume under torchrun.
python3 -m job run jobspecs/t1.json --output-dir "$work/resume" "${common[@]}" --set train.max_steps=30 \
  --set export.tokenizer_pre=llama-bpe --nproc 2 > "$out/resume-1.jsonl" 2> "$out/resume-1.err" &
pid=$!
for _ in $(seq 600); do
  ls "$work"/resume/*/checkpoints/checkpoint-10/peftopt-checkpoint.json >/dev/null 2>&1 && break; sleep 0.5
done
t0=$(date +%s.%N); kill -TERM $pid; wait $pid; code=$?; t1=$(date +%s.%N)
echo "{\"sigterm_exit\": $code, \"seconds_to_exit\": $(python3 -c "print(round($t1-$t0,2))")}" | tee -a "$out/summary.jsonl"
python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m job run jobspecs/t1.json --output-dir "$work/resume" \
  "${common[@]}" --set train.max_steps=30 --set export.tokenizer_pre=llama-bpe > "$out/resume-2.jsonl" \
  2> "$out/resume-2.err"; echo "torchrun resume exit $?"
grep -h '"train_resumed"\|"gguf_written"\|"gguf_verified"\|"job_finished"' "$out/resume-2.jsonl" | head -8
cp "$work"/resume/*/metrics.json "$out/resume-metrics.json"; cp "$work"/resume/*/state.json "$out/resume-state.json"

accelerate launch --multi_gpu --num_processes 2 -m job run jobspecs/t1.json --output-dir "$work/accel" \
  "${common[@]}" --set train.max_steps=10 --set export=null > "$out/accelerate.jsonl" 2> "$out/accelerate.err"
echo "accelerate launch exit $?"
summary "$out/accelerate.jsonl" | tee -a "$out/summary.jsonl"
