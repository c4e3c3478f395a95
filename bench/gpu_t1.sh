#!/usr/bin/env bash
# On the GPU machine: jobspecs/t1.json for real on the 1B-shaped model with random weights and long local
# conversations (push=null): each stage timed by the job itself (metrics.json), beside `peftopt bench`.
#   bash bench/gpu_t1.sh OUT check      the GPU tests of the packed-attention path, 60-step runs of each
#                                       backend end to end, a short bench
#   bash bench/gpu_t1.sh OUT methods    SFT on unsloth for 60 steps (every stage), then DPO on hf for 30 steps on its merged model
#   bash bench/gpu_t1.sh OUT grpo       issue 36: t1 for 60 steps (merged), then jobspecs/t5.json chained onto it for
#                                       T5_STEPS (30) steps (every stage), then 20 steps of t5 sampling with transformers' continuous
#                                       batching (PEFTOPT_SAMPLER=continuous) against the same 20 steps of the first
#   bash bench/gpu_t1.sh OUT unsloth    the whole 600-step run (auto: unsloth), 50 steps of the slow path
#                                       (unsloth's per-segment SDPA) for the loss curve, and the bench
#   bash bench/gpu_t1.sh OUT final      the whole 600-step run (auto), then the bench of both backends
#   bash bench/gpu_t1.sh OUT threads    after `final`: llama.cpp answering its GGUF with every logical CPU,
#                                       physical cores only and half of them
#   bash bench/gpu_t1.sh OUT pair       the whole 600-step training of unsloth, then of hf (no evaluation, no export)
#   bash bench/gpu_t1.sh OUT hf         the whole 600-step run on the hf backend (training only; the unsloth
#                                       mode's bench times both backends side by side)
#   bash bench/gpu_t1.sh OUT probe      the GPU kernel tests, the hf backend with and without Liger's kernels
#                                       (bench), and 60 steps of unsloth with evaluation timed
#   bash bench/gpu_t1.sh OUT dpo        60 steps of t1 end to end (unsloth: every stage and target; FULL=0 skips it),
#                                       then DPO (reference at every step, and precomputed) beside SFT on the same
#                                       model and backend (hf, 60 steps of 8 pairs or 8 sequences), then `peftopt
#                                       bench` of the DPO spec; PAIR_WORDS=700-1100 for pairs near t1's 2,048 tokens
#   bash bench/gpu_t1.sh OUT dpo-micro  SFT beside DPO with a micro-batch of DPO_MICRO (4) pairs, both references
#   bash bench/gpu_t1.sh OUT speed      issue 25 as the image runs it (every module with its bytecode): the whole
#                                       run (auto), then 50 steps with the 4-bit base kept (PEFTOPT_DEQUANTIZE_BASE=0)
#                                       for the loss curve, then the unsloth bench (literal, planned, the base kept)
#   bash bench/gpu_t1.sh OUT speed-hf   the whole run on the hf backend, and its bench
#   bash bench/gpu_t1.sh OUT speed-profile  issue 37: the whole run sampled by py-spy (every thread of the job and of the
#                                       converter, idle time included: a timeline of where the time goes), the
#                                       unsloth import under -X importtime with and without its generated code cached
#   bash bench/gpu_t1.sh OUT speed-37   issue 37 after its changes: the whole run (auto), its evaluation answers against
#                                       the way they were made before (bench/gpu_eval_same.py), unsloth's import with
#                                       the restricted trainer rewriting, then the unsloth bench
#   bash bench/gpu_t1.sh OUT speed-40   the whole run (auto: prepare in its child process), then its training alone with
#                                       prepare in turn (PEFTOPT_PREPARE_AHEAD=0) on the same machine, then the unsloth
#                                       bench (at 86be0d9 the second run also wrote checkpoints with a thread, the first
#                                       with a process: docs/performance.md, "tried, and taken back")
#   bash bench/gpu_t1.sh OUT speed-41   the whole run (auto: unsloth's kernels compiled ahead by a child process), then
#                                       its training alone with PEFTOPT_KERNELS_AHEAD=0 (cold caches both), the bench,
#                                       and tests/integration/test_kernels_ahead.py on the GPU
#   bash bench/gpu_t1.sh OUT speed-42   the whole run (auto: unsloth's kernels compiled ahead on a model of one layer), a
#                                       torch profile of t1's steady steps (bench/gpu_step_profile.py), the bench, and
#                                       the GPU test of kernels_ahead
#   bash bench/gpu_t1.sh OUT speed-43   the whole run (a packed micro-batch padded to a multiple of 16 tokens), its first
#                                       50 losses against BEFORE_JSONL's, the adapter's decode loop free and pinned
#                                       (bench/gpu_decode_probe.py), the bench
#   bash bench/gpu_t1.sh OUT speed-44   the whole run with the machine's busiest threads sampled (bench/thread_sampler.py),
#                                       its first 50 losses against BEFORE_JSONL's, the bench, kernels_ahead's GPU tests
#   bash bench/gpu_t1.sh OUT speed-45   the whole run (checkpoints copied without stopping the GPU, the collector held off
#                                       the objects that exist when training starts), its first 50 losses against
#                                       BEFORE_JSONL's, the same t1 training on the hf backend (no evaluation or export),
#                                       a torch profile of hf's steady steps, the HostSnapshot GPU test
#   bash bench/gpu_t1.sh OUT speed-46   the whole run (bitsandbytes' step without its per-parameter syncs) with Triton's
#                                       cache kept and listed by time (what compiles during training) and torch's
#                                       recompiles logged, its first 50 losses against BEFORE_JSONL's; hf's training
#                                       (fused LoRA layers) against BEFORE_HF_JSONL's; the GPU tests of both; hf's profile
#   bash bench/gpu_t1.sh OUT speed-47   the GPU tests of the fused LoRA layers and the checkpoint snapshot, then t1's
#                                       training on hf (fused LoRA layers) and on unsloth (Triton's cache listed), each
#                                       on the 600-step schedule stopped at step STOP_AT (200), their tokens/s after step
#                                       4 on the same host, first 50 losses against BEFORE_HF_JSONL's and BEFORE_JSONL's
#   bash bench/gpu_t1.sh OUT speed-48   issue 37's closing figures in one call: the whole run (auto: unsloth), its first 50
#                                       losses against BEFORE_JSONL's; t1's whole 600-step training on hf (no evaluation
#                                       or export) against BEFORE_HF_JSONL's; then the unsloth bench
#   bash bench/gpu_t1.sh OUT merge-probe  why merge took 12 s after 2026-12-04's third session (4 s before): t1 for
#                                       PROBE_STEPS (120) steps through every stage as the tree is, then without the
#                                       collector held off, then with the old checkpoint copy (bench/patched_run.py),
#                                       the machine's threads sampled during each
#   bash bench/gpu_t1.sh OUT merge-profile  the same 120-step run from cold caches, every thread sampled by py-spy (idle
#                                       included: where the adapter's loading waits), the kernel's compaction counters
#   bash bench/gpu_t1.sh OUT speed-49   the whole run (auto: unsloth) with the batch worker ended when training ends, its
#                                       first 50 losses against BEFORE_JSONL's, then the unsloth bench
#   bash bench/gpu_t1.sh OUT save-probe-2  the checkpoint's packs written whole against tensor by tensor: the GPU
#                                       snapshot test, then t1's training on unsloth to step STOP_AT (100) as the tree
#                                       is and with `tensor-writes`, on one host (sync-probe.json: the save-adjacent steps)
#   bash bench/gpu_t1.sh OUT save-probe  what a checkpoint save costs the next step: t1's training on unsloth to step
#                                       STOP_AT (200) as the tree is, with the writer thread writing nothing, and with a
#                                       0.1 ms switch interval (bench/patched_run.py); the step after a save against
#                                       the others (save-steps.json)
#   bash bench/gpu_t1.sh OUT step-probe  t1's training on unsloth to step STOP_AT (120) as the tree is, without the
#                                       FLOP count made once, and as the tree is again (bench/patched_run.py); at
#                                       7c3284d it also ran the direct 8-bit step's GPU test and a run without it
#   bash bench/gpu_t1.sh OUT speed-50   the whole run (auto: unsloth; each step's loss read a step late), its first 50
#                                       losses against BEFORE_JSONL's (bench/baselines/: the first 50 logged steps of
#                                       c9cf8a5's unsloth run and 196d022's hf run), then the unsloth bench
#   bash bench/gpu_t1.sh OUT speed-51   the GPU snapshot and resume tests, then speed-50's run and bench
#   bash bench/gpu_t1.sh OUT speed-52   the GPU test of unsloth's segment lengths from the host, speed-50's run and
#                                       bench, then t1's training to step STOP_AT (80) as the tree is and `device-reads`
#   bash bench/gpu_t1.sh OUT pair-50    t1's whole 600-step training on hf, then on unsloth (no evaluation or export),
#                                       one host: hf against unsloth over the whole run
#   bash bench/gpu_t1.sh OUT sync-probe  the GPU snapshot and resume tests; t1's training on unsloth to step STOP_AT (100)
#                                       as the tree is, with each step's loss read as it ends and blocking batch copies
#                                       (as before), with blocking copies alone; a torch profile of the tree's steps
#   bash bench/gpu_t1.sh OUT sync-probe-2  the GPU tests of the snapshot and the host's segment lengths; t1's training
#                                       on unsloth to step STOP_AT (100) as the tree is and with the loss kept on the
#                                       device, the lengths found there and blocking copies (`device-reads`); a torch
#                                       profile of the tree's steps with one step's syncs listed
#   bash bench/gpu_t1.sh OUT sync-probe-3  the GPU tests of the host's lengths and kept-label count and of the
#                                       checkpoint's packed files; t1's training on unsloth to step STOP_AT (100) as
#                                       the tree is, `gpu-count` and `tensor-writes`; a torch profile of the tree's
#                                       steps with one step's syncs listed
#   bash bench/gpu_t1.sh OUT compile-probe  what t1's first training step compiles: 12 steps with every compile cache
#                                       empty, with inductor's or Triton's alone emptied, and warm; the kernels cached
#   bash bench/gpu_t1.sh OUT speed-38   the whole run (auto), then the run's GGUF suite answered by each CPU variant of
#                                       a llama.cpp prefix built with GGML_CPU_ALL_VARIANTS (bench/gpu_llama_variants.py:
#                                       docs/performance.md, "tried, and taken back"), then the bench
#   bash bench/gpu_t1.sh OUT gguf       only the gguf stage's pieces on the 1B shape (bench/gpu_gguf.py): this
#                                       tree's converter shim, then SHIM_BEFORE's (another shim) for comparison
# Expects the bundle (.gpu) unpacked on PYTHONPATH and LLAMA_CPP_DIR pointing at the pinned llama.cpp. The
# bundle's modules are compiled to bytecode first, as pip does when it installs them into the image.
set -uo pipefail
out=${1:?OUT_DIR}; mode=${2:-check}
work=/tmp/peftopt-gpu; mkdir -p "$work" "$out"
export PEFTOPT_LOG_FORMAT=json
if [[ $mode == gguf ]]; then
  # bytecode for what the converter imports, as the image has it, made while the model is
  export PYTHONPYCACHEPREFIX=/tmp/pycache
  python3 -I -X pycache_prefix=/tmp/pycache -c 'import numpy, safetensors, torch, transformers
transformers.AutoConfig, transformers.AutoTokenizer' &
  [ -f "$work/l1b/config.json" ] || python3 bench/gpu_models.py llama1b "$work/l1b" >/dev/null
  wait
  { nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; lscpu | grep -m1 "Model name"; nproc; } > "$out/machine.txt"
  python3 bench/gpu_gguf.py "$work/l1b" "$work/gguf" "$out/gguf.json" ${SHIM_BEFORE:-} 2>&1 | tee "$out/gguf.txt"
  exit
fi
[ -f "$work/l1b/config.json" ] || python3 bench/gpu_models.py llama1b "$work/l1b" >/dev/null
[ -f "$work/long.jsonl" ] || python3 bench/gpu_models.py data "$work/long.jsonl" 12000 >/dev/null
common=(--output-dir "$work/runs" --set model.base="$work/l1b" --set data.source="$work/long.jsonl" --set push=null
        --set export.tokenizer_pre=llama-bpe)
for dir in ${PYTHONPATH//:/ }; do [[ $dir == /tmp/* ]] && python3 -m compileall -q -j 16 "$dir" >/dev/null; done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# The device machine's copy of the checkout carries the tree, not its HEAD: the caller writes the commit beside the
# bundle (`git rev-parse --short HEAD > .gpu/commit`) and it is kept with the figures.
[ -f .gpu/commit ] && cp .gpu/commit "$out/commit.txt"
python3 -c 'import torch, transformers, trl, peft; print("torch", torch.__version__, "cuda", torch.version.cuda,
"transformers", transformers.__version__, "trl", trl.__version__, "peft", peft.__version__)' | tee -a "$out/gpu.txt"

run() {  # NAME [overrides...]: one `peftopt run` of t1; events, metrics and the stage times kept under OUT
  local name=$1; shift
  local started=$(date +%s.%N)
  local -n shared=${SHARED:-common}
  ${PROFILER:-} python3 ${ENTRY:--m job} run ${SPEC:-jobspecs/t1.json} "${shared[@]}" --set name="$name" "$@" > "$out/$name.jsonl" 2> "$out/$name.err"
  local code=$?
  python3 - "$out/$name.jsonl" "$started" "$name" "$code" <<'EOF' | tee -a "$out/runs.jsonl"
import datetime, json, sys, time
events = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
first = next((e for e in events if e.get("event") == "job_started"), None)
start = float(sys.argv[2])
startup = round(datetime.datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00")).timestamp() - start, 1) \
    if first else None
print(json.dumps({"run": sys.argv[3], "exit": int(sys.argv[4]), "wall_s": round(time.time() - start, 1),
                  "process_start_to_job_started_s": startup}))
EOF
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
                  "checkpointing": t.get("checkpointing"), "collector": t.get("collector"), "final_loss": t.get("final_loss"), "kernels": t.get("kernels"),
                  "eval_timing": {k: v.get("timing") for k, v in m.get("evaluate", {}).items() if isinstance(v, dict)},
                  "gguf_eval_timing": {k: v.get("timing") for k, v in m.get("gguf", {}).get("eval", {}).items()},
                  "gguf_verify": {q: {"agreement": f["verify"]["agreement"], "tokenizer_match": f["verify"]["tokenizer_match"]}
                                  for q, f in m.get("gguf", {}).get("files", {}).items()}}))
EOF
  [ -n "${OUT:-}" ] && tar czf "$OUT/o.tgz" -C "$out" .  # what finished comes back even if the call times out
  return $code
}

first_steps() {  # NAME...: each run's first training step, and what compiling ahead did
  python3 - "$out" "$@" > "$out/first-steps.txt" <<'EOF2'
import datetime, json, sys
t = lambda e: datetime.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
for name in sys.argv[2:]:
    events = [json.loads(l) for l in open(f"{sys.argv[1]}/{name}.jsonl") if l.startswith("{")]
    first = {}
    for e in events:
        first.setdefault(e["event"], e)
    steps = [t(e) for e in events if e["event"] == "train_progress"]
    print(json.dumps({"run": name, "first_step_s": round(steps[0] - t(first["train_started"]), 2),
                      "train_started_after_job_started_s": round(t(first["train_started"]) - t(first["job_started"]), 2),
                      "ahead": {k: v for k, v in first.get("kernels_compiled_ahead", {}).items() if k in ("seconds", "steps", "skipped", "error")}}))
EOF2
  cat "$out/first-steps.txt"
}

first50() {  # NAME [overrides...]: a training-only run on t1's 600-step schedule, stopped by SIGTERM at step 50
  # (STOP_AT: another step)
  local name=$1; shift
  ( run "$name" --set evaluate=null --set export.merge=false --set export.gguf=[] "$@" ) &
  until grep -q "\"step\": ${STOP_AT:-50}," "$out/$name.jsonl" 2>/dev/null || ! kill -0 $! 2>/dev/null; do sleep 0.5; done
  pkill -TERM -f "name=$name"; wait
}

patched_runs() {  # PREFIX STOP CHANGE...: t1's training on unsloth stopped at step STOP_AT (STOP) with each change of
  # bench/patched_run.py (none: the tree as it is), one after the other on this host; their step table to sync-probe.json
  local prefix=$1 stop=$2 names=() change; shift 2
  for change in "$@"; do
    names+=("$prefix-$change")
    ENTRY="bench/patched_run.py $change --" STOP_AT=${STOP_AT:-$stop} first50 "${names[-1]}"
  done
  step_table "${names[@]}" > "$out/sync-probe.json"; cat "$out/sync-probe.json"
}

compare50() {  # FULL.jsonl OTHER.jsonl: the first 50 logged losses of two runs of the same schedule
  python3 - "$1" "$2" <<'EOF'
import json, sys
def losses(path):
    return {e["step"]: e["loss"] for e in map(json.loads, filter(lambda l: l.startswith("{"), open(path)))
            if e.get("event") == "train_progress" and e["step"] <= 50}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
rel = [abs(a[s] - b[s]) / abs(b[s]) for s in sorted(set(a) & set(b))]
print(json.dumps({"steps_compared": len(rel), "max_rel_diff": max(rel, default=None),
                  "mean_rel_diff": sum(rel) / len(rel) if rel else None}))
EOF
}

step_table() {  # NAME...: each stopped run's step time after a checkpoint save and otherwise (median), and its
  # tokens/s from step 5 to the last (saves included)
  python3 - "$out" "$@" <<'EOF2'
import datetime, json, statistics, sys
t = lambda e: datetime.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
for name in sys.argv[2:]:
    steps = [e for e in map(json.loads, filter(lambda l: l.startswith("{"), open(f"{sys.argv[1]}/{name}.jsonl")))
             if e.get("event") == "train_progress"]
    gaps = {b["step"]: t(b) - t(a) for a, b in zip(steps, steps[1:]) if b["step"] > 5}
    after = [g for s, g in gaps.items() if s % 10 == 1]
    other = [g for s, g in gaps.items() if s % 10 != 1]
    print(json.dumps({"run": name, "steps": len(gaps), "after_save_ms": round(statistics.median(after) * 1000, 1),
                      "other_ms": round(statistics.median(other) * 1000, 1),
                      "tokens_per_s": round((steps[-1]["tokens"] - steps[4]["tokens"]) / (t(steps[-1]) - t(steps[4])))}))
EOF2
}

triton_listing() {  # DIR NAME: the kernels in Triton's cache DIR by when they were written, against run NAME's steps
  python3 - "$1" "$out/$2.jsonl" > "$out/triton-$2.txt" <<'EOF2'
import datetime, json, os, sys
t = lambda e: datetime.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
events = [json.loads(l) for l in open(sys.argv[2]) if l.startswith("{")]
start = next(t(e) for e in events if e["event"] == "train_started")
steps = {e["step"]: t(e) for e in events if e["event"] == "train_progress"}
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        if f.endswith(".json") and not f.startswith("__grp__"):
            path = os.path.join(root, f)
            try:
                meta = json.load(open(path))
            except ValueError:
                continue
            at = os.path.getmtime(path)
            step = max([s for s, ts in steps.items() if ts <= at], default=0)
            print(f"{at - start:9.2f} s after train_started (after step {step}): {meta.get('name')} "
                  f"{json.dumps({k: meta.get(k) for k in ('constants', 'signature', 'num_warps') if k in meta})[:300]}")
EOF2
  sort -n "$out/triton-$2.txt" | tail -25
}

bench_table() {  # NAME [bench args...]
  local name=$1; shift
  timeout ${BENCH_TIMEOUT:-300} python3 -m job bench jobspecs/t1.json "${common[@]:2}" "$@" --json > "$out/$name.json" 2> "$out/$name.err"
  python3 -c 'import json, sys; sys.path.insert(0, "."); from job.bench import table; print(table(json.load(open(sys.argv[1]))))' \
    "$out/$name.json" | tee "$out/$name.md"
  [ -n "${OUT:-}" ] && tar czf "$OUT/o.tgz" -C "$out" .
}

if [[ $mode == speed* || $mode == compile-probe || $mode == merge-* || $mode == sync-probe || $mode == pair-50 ]]; then
  # The GPU machine's own site-packages carry no bytecode and cannot be written; the image's do (pip compiles
  # at install). Every module gets its bytecode once here, before anything is timed. (The converter runs
  # with -I, which ignores this prefix: it alone still compiles torch's sources at each conversion here.)
  # unsloth writes the code it generates under UNSLOTH_COMPILE_LOCATION, /tmp in the image: new in each container,
  # so each timed run here starts without it.
  export PYTHONPYCACHEPREFIX=/tmp/pycache UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache
  python3 -m compileall -q -j 16 /opt/torch/.venv/lib/python3.12/site-packages /tmp/s/site >/dev/null 2>&1
fi

case "$mode" in
  speed-37)
    rm -rf "$UNSLOTH_COMPILE_LOCATION"; run t1-37
    timeout 150 python3 bench/gpu_eval_same.py "$work/runs/t1-37" jobspecs/t1.json "$out/eval-same.json" "${common[@]:2}" \
      --set name=t1-37 --set output_dir="$work/runs" > "$out/eval-same.txt" 2>&1; tail -2 "$out/eval-same.txt"
    rm -rf "$UNSLOTH_COMPILE_LOCATION"; TIMEFORMAT="import_library (restricted), cold compile cache: %R s"
    { time python3 -c "from job.backends import unsloth; unsloth.import_library()" >/dev/null 2>&1; } 2>> "$out/import-times.txt"
    cat "$out/import-times.txt"; tar czf "$OUT/o.tgz" -C "$out" .
    bench_table bench-unsloth --steps ${BENCH_STEPS:-10} --backend unsloth
    ;;
  speed-40)
    rm -rf "$UNSLOTH_COMPILE_LOCATION"; run t1-40
    grep -ho "Unsloth should be imported before[^\"]*" "$out/t1-40.jsonl" "$out/t1-40.err" | head -2 > "$out/import-order.txt"
    rm -rf "$UNSLOTH_COMPILE_LOCATION"
    PEFTOPT_PREPARE_AHEAD=0 run t1-40-before --set evaluate=null \
      --set export.merge=false --set 'export.gguf=[]'
    bench_table bench-unsloth --steps ${BENCH_STEPS:-10} --backend unsloth
    ;;
  speed-41)
    rm -rf "$UNSLOTH_COMPILE_LOCATION" "$HOME/.triton/cache"; run t1-41
    rm -rf "$UNSLOTH_COMPILE_LOCATION" "$HOME/.triton/cache"
    PEFTOPT_KERNELS_AHEAD=0 run t1-41-off --set evaluate=null --set export.merge=false --set 'export.gguf=[]'
    first_steps t1-41 t1-41-off
    tar czf "$OUT/o.tgz" -C "$out" .
    BENCH_TIMEOUT=120 bench_table bench-unsloth --steps ${BENCH_STEPS:-10} --backend unsloth
    timeout 90 python3 -m pytest -q -rs -p no:cacheprovider tests/integration/test_kernels_ahead.py > "$out/gpu-test.txt" 2>&1; tail -3 "$out/gpu-test.txt"
    ;;
  speed-42)
    rm -rf "$UNSLOTH_COMPILE_LOCATION" "$HOME/.triton/cache"; run t1-42
    first_steps t1-42
    rm -rf "$UNSLOTH_COMPILE_LOCATION"
    timeout 150 python3 bench/gpu_step_profile.py jobspecs/t1.json "$out/profile" "$work/runs/t1-42/data/train.jsonl" \
      model.base="$work/l1b" data.source="$work/long.jsonl" push=null > "$out/profile.txt" 2>&1; tail -1 "$out/profile.txt"
    tar czf "$OUT/o.tgz" -C "$out" .
    BENCH_TIMEOUT=170 bench_table bench-unsloth --steps ${BENCH_STEPS:-10} --backend unsloth
    timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/integration/test_kernels_ahead.py -k "finds_its_kernels or cache_is_the_jobs" > "$out/gpu-test.txt" 2>&1; tail -3 "$out/gpu-test.txt"
    ;;
  speed-43)
    rm -rf "$UNSLOTH_COMPILE_LOCATION" "$HOME/.triton/cache"; run t1-43
    first_steps t1-43
    compare50 "$out/t1-43.jsonl" "${BEFORE_JSONL:-$out/t1-43.jsonl}" | tee "$out/loss50.json"
    timeout 120 python3 bench/gpu_decode_probe.py "$work/runs/t1-43" jobspecs/t1.json "$out/decode.json" "${common[@]:2}" \
      --set name=t1-43 --set output_dir="$work/runs" --set evaluate.max_new_tokens=64 > "$out/decode.txt" 2>&1; tail -1 "$out/decode.txt"
    tar czf "$OUT/o.tgz" -C "$out" .
    BENCH_TIMEOUT=170 bench_table bench-unsloth --steps ${BENCH_STEPS:-10} --backend unsloth
    ;;
  speed-44)
    python3 bench/thread_sampler.py "$out/threads.jsonl" 2 & sampler=$!
    rm -rf "$UNSLOTH_COMPILE_LOCATION" "$HOME/.triton/cache"; run t1-44
    kill $sampler
    first_steps t1-44
    compare50 "$out/t1-44.jsonl" "${BEFORE_JSONL:-$out/t1-44.jsonl}" | tee "$out/loss50.json"
    tar czf "$OUT/o.tgz" -C "$out" .
    BENCH_TIMEOUT=170 bench_table bench-unsloth --steps ${BENCH_STEPS:-10} --backend unsloth
    timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/integration/test_kernels_ahead.py -k "does_not_wait or cache_is_the_jobs" > "$out/gpu-test.txt" 2>&1; tail -3 "$out/gpu-test.txt"
    ;;
  speed-45)
    rm -rf "$UNSLOTH_COMPILE_LOCATION" "$HOME/.triton/cache"; run t1-45
    first_steps t1-45
    compare50 "$out/t1-45.jsonl" "${BEFORE_JSONL:-$out/t1-45.jsonl}" | tee "$out/loss50.json"
    timeout 60 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_gpu.py -k checkpoint_snapshot > "$out/gpu-test.txt" 2>&1; tail -2 "$out/gpu-test.txt"
    run t1-45-hf --set train.backend=hf --set evaluate=null --set export.merge=false --set 'export.gguf=[]'
    BACKEND=hf timeout 120 python3 bench/gpu_step_profile.py jobspecs/t1.json "$out/profile-hf" "$work/runs/t1-45/data/train.jsonl" \
      model.base="$work/l1b" data.source="$work/long.jsonl" push=null > "$out/profile-hf.txt" 2>&1; tail -1 "$out/profile-hf.txt"
    tar czf "$OUT/o.tgz" -C "$out" .
    ;;
  speed-46)
    rm -rf "$UNSLOTH_COMPILE_LOCATION" "$HOME/.triton/cache" "$work/triton-46"; mkdir -p "$work/triton-46"
    TRITON_CACHE_DIR="$work/triton-46" TORCH_LOGS=recompiles run t1-46
    first_steps t1-46
    compare50 "$out/t1-46.jsonl" "${BEFORE_JSONL:-$out/t1-46.jsonl}" | tee "$out/loss50.json"
    triton_listing "$work/triton-46" t1-46
    run t1-46-hf --set train.backend=hf --set evaluate=null --set export.merge=false --set 'export.gguf=[]'
    compare50 "$out/t1-46-hf.jsonl" "${BEFORE_HF_JSONL:-$out/t1-46-hf.jsonl}" | tee "$out/loss50-hf.json"
    timeout 90 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_gpu.py -k "checkpoint_snapshot or fused_lora or liger" > "$out/gpu-test.txt" 2>&1; tail -3 "$out/gpu-test.txt"
    tar czf "$OUT/o.tgz" -C "$out" .
    BACKEND=hf timeout 110 python3 bench/gpu_step_profile.py jobspecs/t1.json "$out/profile-hf" "$work/runs/t1-46/data/train.jsonl" \
      model.base="$work/l1b" data.source="$work/long.jsonl" push=null > "$out/profile-hf.txt" 2>&1; tail -1 "$out/profile-hf.txt"
    tar czf "$OUT/o.tgz" -C "$out" .
    ;;
  speed-47)
    timeout 60 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_gpu.py -k "checkpoint_snapshot or fused_lora" > "$out/gpu-test.txt" 2>&1; tail -3 "$out/gpu-test.txt"
    STOP_AT=${STOP_AT:-200} first50 t1-47-hf --set train.backend=hf
    compare50 "$out/t1-47-hf.jsonl" "${BEFORE_HF_JSONL:-$out/t1-47-hf.jsonl}" | tee "$out/loss50-hf.json"
    tar czf "$OUT/o.tgz" -C "$out" .
    rm -rf "$UNSLOTH_COMPILE_LOCATION" "$HOME/.triton/cache" "$work/triton-47"; mkdir -p "$work/triton-47"
    TRITON_CACHE_DIR="$work/triton-47" STOP_AT=${STOP_AT:-200} first50 t1-47
    triton_listing "$work/triton-47" t1-47
    first_steps t1-47-hf t1-47
    compare50 "$out/t1-47.jsonl" "${BEFORE_JSONL:-$out/t1-47.jsonl}" | tee "$out/loss50.json"
    python3 - "$out" t1-47-hf t1-47 <<'EOF2' | tee "$out/steady.txt"
import datetime, json, sys
t = lambda e: datetime.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
for name in sys.argv[2:]:
    steps = [e for e in map(json.loads, filter(lambda l: l.startswith("{"), open(f"{sys.argv[1]}/{name}.jsonl")))
             if e.get("event") == "train_progress"]
    a, b = steps[3], steps[-1]
    print(json.dumps({"run": name, "steps": [a["step"], b["step"]],
                      "tokens_per_s_after_step_4": round((b["tokens"] - a["tokens"]) / (t(b) - t(a)), 1)}))
EOF2
    tar czf "$OUT/o.tgz" -C "$out" .
    ;;
  speed-48)
    rm -rf "$UNSLOTH_COMPILE_LOCATION" "$HOME/.triton/cache"; run t1-48
    first_steps t1-48
    compare50 "$out/t1-48.jsonl" "${BEFORE_JSONL:-$out/t1-48.jsonl}" | tee "$out/loss50.json"
    run t1-48-hf --set train.backend=hf --set evaluate=null --set export.merge=false --set 'export.gguf=[]'
    compare50 "$out/t1-48-hf.jsonl" "${BEFORE_HF_JSONL:-$out/t1-48-hf.jsonl}" | tee "$out/loss50-hf.json"
    first_steps t1-48 t1-48-hf
    tar czf "$OUT/o.tgz" -C "$out" .
    BENCH_TIMEOUT=160 bench_table bench-unsloth --steps ${BENCH_STEPS:-10} --backend unsloth
    ;;
  speed-49|speed-50|speed-51|speed-52)  # the same run and bench, named for the session that measured with them
    name=t1-${mode#speed-}
    if [ "$mode" = speed-51 ]; then
      timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_gpu.py -k "resume or snapshot" > "$out/gpu-test.txt" 2>&1; tail -3 "$out/gpu-test.txt"
    elif [ "$mode" = speed-52 ]; then
      timeout 90 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_gpu.py -k "from_the_host" > "$out/gpu-test.txt" 2>&1; tail -3 "$out/gpu-test.txt"
    fi
    rm -rf "$UNSLOTH_COMPILE_LOCATION" "$HOME/.triton/cache"; run "$name"
    first_steps "$name"
    compare50 "$out/$name.jsonl" "${BEFORE_JSONL:-bench/baselines/t1-unsloth-first50.jsonl}" | tee "$out/loss50.json"
    tar czf "$OUT/o.tgz" -C "$out" .
    BENCH_TIMEOUT=170 bench_table bench-unsloth --steps ${BENCH_STEPS:-10} --backend unsloth
    if [ "$mode" = speed-52 ]; then  # then the tree against its three syncs back (`device-reads`), one host
      tar czf "$OUT/o.tgz" -C "$out" .
      patched_runs sync3 80 none device-reads
    fi
    ;;
  pair-50)
    run t1-50-hf --set train.backend=hf --set evaluate=null --set export.merge=false --set 'export.gguf=[]'
    rm -rf "$UNSLOTH_COMPILE_LOCATION" "$HOME/.triton/cache"
    run t1-50-train --set evaluate=null --set export.merge=false --set 'export.gguf=[]'
    compare50 "$out/t1-50-train.jsonl" "${BEFORE_JSONL:-bench/baselines/t1-unsloth-first50.jsonl}" | tee "$out/loss50.json"
    compare50 "$out/t1-50-hf.jsonl" "${BEFORE_HF_JSONL:-bench/baselines/t1-hf-first50.jsonl}" | tee "$out/loss50-hf.json"
    first_steps t1-50-hf t1-50-train
    tar czf "$OUT/o.tgz" -C "$out" .
    ;;
  save-probe-2)  # issue 37: the writer thread's hold on the interpreter lock, with and without the packs written whole
    timeout 100 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_gpu.py -k "snapshot" > "$out/gpu-test.txt" 2>&1; tail -3 "$out/gpu-test.txt"
    patched_runs save2 100 none tensor-writes
    tar czf "$OUT/o.tgz" -C "$out" .
    ;;
  save-probe)
    for change in none quiet-writer switch-interval; do
      ENTRY="bench/patched_run.py $change --" STOP_AT=${STOP_AT:-200} first50 "save-$change"
    done
    step_table save-none save-quiet-writer save-switch-interval > "$out/save-steps.json"; cat "$out/save-steps.json"
    ;;
  step-probe)
    names=()
    for change in none no-flops-once none; do
      names+=("step-$change-${#names[@]}")
      ENTRY="bench/patched_run.py $change --" STOP_AT=${STOP_AT:-120} first50 "${names[-1]}"
    done
    step_table "${names[@]}" > "$out/step-probe.json"; cat "$out/step-probe.json"
    ;;
  sync-probe-3)  # issue 37: the GPU tests of the host's lengths and kept-label count and of the checkpoint's packed
    # files, t1's training on unsloth to step STOP_AT (100) as the tree is, with the kept labels counted on the GPU
    # (`gpu-count`) and with the checkpoint's files written tensor by tensor (`tensor-writes`); a torch profile of the
    # tree's steady steps with one step's syncs listed
    timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_gpu.py -k "from_the_host or reads_nothing_back or snapshot" > "$out/gpu-test.txt" 2>&1; tail -3 "$out/gpu-test.txt"
    patched_runs sync4 100 none gpu-count tensor-writes
    compare50 "$out/sync4-none.jsonl" "${BEFORE_JSONL:-bench/baselines/t1-unsloth-first50.jsonl}" | tee "$out/loss50.json"
    tar czf "$OUT/o.tgz" -C "$out" .
    timeout 130 python3 bench/gpu_step_profile.py jobspecs/t1.json "$out/profile" "$work/runs/sync4-none/data/train.jsonl" \
      model.base="$work/l1b" data.source="$work/long.jsonl" push=null > "$out/profile.txt" 2>&1; tail -1 "$out/profile.txt"
    tar czf "$OUT/o.tgz" -C "$out" .
    ;;
  sync-probe-2)  # issue 37: the GPU tests of the snapshot and the host's segment lengths, t1's training on unsloth to
    # step STOP_AT (100) as the tree is and with the session's three changes taken back (`device-reads`), then a torch
    # profile of the tree's steady steps with one step's syncs listed (syncs.txt)
    timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_gpu.py -k "snapshot or from_the_host or varlen" > "$out/gpu-test.txt" 2>&1; tail -3 "$out/gpu-test.txt"
    patched_runs sync2 100 none device-reads
    compare50 "$out/sync2-none.jsonl" "${BEFORE_JSONL:-bench/baselines/t1-unsloth-first50.jsonl}" | tee "$out/loss50.json"
    tar czf "$OUT/o.tgz" -C "$out" .
    timeout 130 python3 bench/gpu_step_profile.py jobspecs/t1.json "$out/profile" "$work/runs/sync2-none/data/train.jsonl" \
      model.base="$work/l1b" data.source="$work/long.jsonl" push=null > "$out/profile.txt" 2>&1; tail -1 "$out/profile.txt"
    tar czf "$OUT/o.tgz" -C "$out" .
    ;;
  sync-probe)  # issue 37: the per-step syncs: the GPU tests of the checkpoint snapshot and resume, t1's training on
    # unsloth to step STOP_AT (100) as the tree is, with each step's loss read at its own end and blocking batch copies,
    # with blocking copies alone; then a torch profile of the tree's steady steps (syncs listed)
    timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_gpu.py -k "resume or snapshot" > "$out/gpu-test.txt" 2>&1; tail -3 "$out/gpu-test.txt"
    names=()
    for change in none step-sync; do  # c9cf8a5 also ran `blocking-copy` (batches copied without blocking: no gain)
      names+=("sync-$change")
      ENTRY="bench/patched_run.py $change --" STOP_AT=${STOP_AT:-100} first50 "${names[-1]}"
    done
    step_table "${names[@]}" > "$out/sync-probe.json"; cat "$out/sync-probe.json"
    tar czf "$OUT/o.tgz" -C "$out" .
    timeout 130 python3 bench/gpu_step_profile.py jobspecs/t1.json "$out/profile" "$work/runs/sync-none/data/train.jsonl" \
      model.base="$work/l1b" data.source="$work/long.jsonl" push=null > "$out/profile.txt" 2>&1; tail -1 "$out/profile.txt"
    tar czf "$OUT/o.tgz" -C "$out" .
    ;;
  merge-probe)
    for change in none no-freeze old-copy; do
      python3 bench/thread_sampler.py "$out/threads-$change.jsonl" 1 & sampler=$!
      ENTRY="bench/patched_run.py $change --" run "probe-$change" --set train.max_steps=${PROBE_STEPS:-120}
      kill $sampler
    done
    ;;
  merge-profile)
    pip install -q --no-index --no-deps --target /tmp/pyspy .whl/py_spy-*.whl && export PATH=/tmp/pyspy/bin:$PATH
    grep -E "compact|thp" /proc/vmstat > "$out/vmstat-before.txt"; free -m > "$out/free-before.txt"
    python3 bench/thread_sampler.py "$out/threads-profile.jsonl" 1 & sampler=$!
    rm -rf "$UNSLOTH_COMPILE_LOCATION" "$HOME/.triton/cache"
    PROFILER="py-spy record --idle --threads --rate 40 --format speedscope -o $out/probe.speedscope.json --" \
      run probe-profile --set train.max_steps=${PROBE_STEPS:-120}
    kill $sampler
    grep -E "compact|thp" /proc/vmstat > "$out/vmstat-after.txt"; free -m > "$out/free-after.txt"
    gzip -f "$out/probe.speedscope.json"
    ;;
  compile-probe)
    # What the first training step compiles: 12 steps of t1's training with every compile cache empty, then with
    # inductor's cache alone emptied, then with Triton's alone emptied; the kernels each cache holds after the first.
    short=(--set evaluate=null --set export.merge=false --set 'export.gguf=[]' --set train.max_steps=12)
    tri=$HOME/.triton/cache; ind=/tmp/torchinductor_$(whoami)
    rm -rf "$UNSLOTH_COMPILE_LOCATION" "$tri" "$ind"; run probe-cold "${short[@]}"
    python3 - "$tri" "$ind" > "$out/compiled.txt" <<'EOF2'
import json, os, sys
tri, ind = sys.argv[1:3]
names = []
for root, _, files in os.walk(tri):
    for f in files:
        if f.endswith(".json") and not f.startswith("__grp__"):
            try:
                names.append(json.load(open(os.path.join(root, f))).get("name"))
            except Exception:
                pass
print("triton kernels:", len(names)); print(sorted(set(n for n in names if n)))
count = sum(len(files) for _, _, files in os.walk(ind)) if os.path.isdir(ind) else 0
print("inductor cache files:", count)
EOF2
    rm -rf "$ind" "$UNSLOTH_COMPILE_LOCATION"; run probe-no-inductor-cache "${short[@]}"
    rm -rf "$tri" "$UNSLOTH_COMPILE_LOCATION"; run probe-no-triton-cache "${short[@]}"
    rm -rf "$UNSLOTH_COMPILE_LOCATION"; run probe-warm "${short[@]}"
    python3 - "$out" > "$out/first-steps.txt" <<'EOF2'
import datetime, json, sys
t = lambda e: datetime.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
for name in ("probe-cold", "probe-no-inductor-cache", "probe-no-triton-cache", "probe-warm"):
    events = [json.loads(l) for l in open(f"{sys.argv[1]}/{name}.jsonl") if l.startswith("{")]
    marks = {e["event"]: t(e) for e in events if e["event"] in ("stage_started", "batch_plan", "train_started")}
    steps = [t(e) for e in events if e["event"] == "train_progress"]
    print(json.dumps({"run": name, "train_started_after_plan_s": round(marks["train_started"] - marks["batch_plan"], 2),
                      "first_step_s": round(steps[0] - marks["train_started"], 2),
                      "next_steps_s": round((steps[-1] - steps[0]) / (len(steps) - 1), 3)}))
EOF2
    cat "$out/compiled.txt" "$out/first-steps.txt"
    ;;
  speed-38)
    rm -rf "$UNSLOTH_COMPILE_LOCATION"; run t1-38
    python3 bench/gpu_llama_variants.py "$work/runs/t1-38" "$LLAMA_CPP_DIR" /tmp/llama-variants | tee "$out/llama-variants.json"
    [ -n "${OUT:-}" ] && tar czf "$OUT/o.tgz" -C "$out" .
    bench_table bench-unsloth --steps ${BENCH_STEPS:-10} --backend unsloth
    ;;
  speed-profile)
    { lscpu; nvidia-smi; free -g; df -h /tmp; } > "$out/machine.txt" 2>&1
    pip install -q --no-index --no-deps --target /tmp/pyspy .whl/py_spy-*.whl && export PATH=/tmp/pyspy/bin:$PATH
    for cache in cold warm; do
      [[ $cache == cold ]] && rm -rf "$UNSLOTH_COMPILE_LOCATION"
      TIMEFORMAT="$cache: %R s"
      { time python3 -X importtime -c "import unsloth" 2> "$out/importtime-unsloth-$cache.txt" >/dev/null; } 2>> "$out/import-times.txt"
    done
    rm -rf "$UNSLOTH_COMPILE_LOCATION"
    PROFILER="py-spy record --subprocesses --idle --threads --rate 50 --format speedscope -o $out/t1.speedscope.json --" run t1-profile
    gzip -f "$out/t1.speedscope.json"
    tar czf "$OUT/o.tgz" -C "$out" .
    ;;
  speed)
    rm -rf "$UNSLOTH_COMPILE_LOCATION"; run t1-speed
    rm -rf "$UNSLOTH_COMPILE_LOCATION"; PEFTOPT_DEQUANTIZE_BASE=0 first50 t1-kept50
    compare50 "$out/t1-speed.jsonl" "$out/t1-kept50.jsonl" | tee "$out/loss50.json"
    bench_table bench-unsloth --steps 10 --backend unsloth
    ;;
  speed-hf)
    rm -rf "$UNSLOTH_COMPILE_LOCATION"; run t1-speed-hf --set train.backend=hf
    bench_table bench-hf --steps 10 --backend hf
    ;;
  speed-final)  # the whole run (auto) after the export and evaluation changes, the hf backend's GPU test of the
    # dequantized base, and the hf bench (planned: dequantized; the base kept)
    python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_gpu.py -k "dequantized_once and hf" 2>&1 | tail -5 | tee "$out/gpu-tests.txt"
    rm -rf "$UNSLOTH_COMPILE_LOCATION"; du -s ~/.triton /tmp/torchinductor_* 2>/dev/null | tee "$out/caches-before.txt"
    run t1-final
    du -s ~/.triton /tmp/torchinductor_* 2>/dev/null | tee "$out/caches-after.txt"
    bench_table bench-hf --steps 10 --backend hf
    for fla in 1 0; do  # unsloth's import alone, warm, with and without its linear-attention kernels registered
      rm -rf "$UNSLOTH_COMPILE_LOCATION"
      TIMEFORMAT="UNSLOTH_DISABLE_VENDORED_FLA=$fla: %R s"
      { time env UNSLOTH_DISABLE_VENDORED_FLA=$fla python3 -c "import unsloth" >/dev/null 2>&1; } 2>> "$out/import-times.txt"
    done
    [ -n "${OUT:-}" ] && tar czf "$OUT/o.tgz" -C "$out" .
    ;;
  speed-8b)  # the unsloth bench on the Llama-3.1-8B shape under t1's settings (planned, the base kept, literal)
    [ -f "$work/l8b/config.json" ] || python3 bench/gpu_models.py llama8b "$work/l8b" >/dev/null 2>&1
    common[3]=model.base="$work/l8b"
    bench_table bench-8b --steps ${STEPS:-4} --backend unsloth
    ;;
  check)
    python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_gpu.py -k "varlen or unsloth_takes or liger" 2>&1 | tail -15 | tee "$out/kernel-tests.txt"
    run u60 --set train.max_steps=60 --set evaluate.max_new_tokens=64
    run h60 --set train.max_steps=60 --set train.backend=hf --set evaluate=null --set export.merge=false --set export.gguf=[]
    python3 -m job bench jobspecs/t1.json "${common[@]:2}" --steps 10 --json > "$out/bench.json" 2> "$out/bench.err"
    python3 -m job bench jobspecs/t1.json "${common[@]:2}" --steps 10 | tee "$out/bench.md"
    ;;
  grpo)  # issue 36: t5 (GRPO) chained onto a 60-step t1, whole job; then the continuous-batching sampler
    run u60 --set train.max_steps=60 --set evaluate=null --set export.gguf=[]
    t5common=(--output-dir "$work/runs" --set push=null --set export.tokenizer_pre=llama-bpe --set model.base=run:u60)
    # 30 of t5's 60 steps: at ~7 s a step (eager generate) the whole job and the sampler comparison fit one call
    SPEC=jobspecs/t5.json SHARED=t5common run t5 --set train.max_steps=${T5_STEPS:-30}
    PEFTOPT_SAMPLER=continuous SPEC=jobspecs/t5.json SHARED=t5common run t5-continuous20 --set train.max_steps=20 \
      --set evaluate=null --set export.merge=false --set export.gguf=[]
    python3 - "$out" <<'EOF2' | tee "$out/grpo.json"
import datetime, json, sys
out = sys.argv[1]
def at(path, step):
    events = [json.loads(l) for l in open(path) if l.startswith("{")]
    ts = lambda e: datetime.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
    start = next(ts(e) for e in events if e["event"] == "train_started")
    done = next((ts(e) for e in events if e["event"] == "train_progress" and e["step"] == step), None)
    return round(done - start, 2) if done else None
m = json.load(open(f"{out}/t5-metrics.json"))
t = m["train"]
curve = t.get("reward_curve", [])
print(json.dumps({"stages": {k: v["runtime_s"] for k, v in m.get("stages", {}).items()}, "tokens_per_s": t.get("tokens_per_s"),
                  "time_split": t.get("time_split"), "peak_gpu_gb": t.get("peak_gpu_gb"),
                  "reward_first10": sum(p["reward"] for p in curve[:10]) / max(len(curve[:10]), 1),
                  "reward_last10": sum(p["reward"] for p in curve[-10:]) / max(len(curve[-10:]), 1),
                  "completion_length_first_last": [curve[0]["completion_length"], curve[-1]["completion_length"]] if curve else None,
                  "evaluate": {k: v.get("pass_rate") for k, v in m.get("evaluate", {}).items() if isinstance(v, dict)},
                  "first20_s": {"generate": at(f"{out}/t5.jsonl", 20), "continuous": at(f"{out}/t5-continuous20.jsonl", 20)}}, indent=1))
EOF2
    [ -n "${OUT:-}" ] && tar czf "$OUT/o.tgz" -C "$out" .
    left=$(( ${CALL_BUDGET_S:-560} - SECONDS ))  # `peftopt bench` of t5 in what is left of the call
    if (( left > 60 )); then
      timeout $(( left - 10 )) python3 -m job bench jobspecs/t5.json --set model.base=run:u60 --set output_dir="$work/runs" \
        --set push=null --steps 3 --json > "$out/bench-t5.json" 2> "$out/bench-t5.err"
      python3 -c 'import json, sys; sys.path.insert(0, "."); from job.bench import table; print(table(json.load(open(sys.argv[1]))))' \
        "$out/bench-t5.json" | tee "$out/bench-t5.md"
      [ -n "${OUT:-}" ] && tar czf "$OUT/o.tgz" -C "$out" .
    fi
    ;;
  sampler)  # issue 36, item 4: t5's sampling, eager generate against continuous batching, SAMPLER_STEPS (5) steps each
    # on the 1B shape itself (no t1 first), training only
    t5raw=(--output-dir "$work/runs" --set push=null --set model.base="$work/l1b" --set evaluate=null
           --set export.merge=false --set export.gguf=[] --set train.max_steps=${SAMPLER_STEPS:-5})
    SPEC=jobspecs/t5.json SHARED=t5raw run s-generate
    PEFTOPT_SAMPLER=continuous SPEC=jobspecs/t5.json SHARED=t5raw run s-continuous
    for name in s-generate s-continuous; do
      python3 -c 'import json, sys; t = json.load(open(sys.argv[1]))["train"]; print(sys.argv[2], json.dumps({k: t.get(k) for k in ("time_split", "tokens_per_s", "session_runtime_s", "peak_gpu_gb")}))' \
        "$out/$name-metrics.json" $name | tee -a "$out/sampler.txt"
    done
    ;;
  methods)  # a method as one declaration (job/methods/): SFT on unsloth, every stage, then DPO on hf chained onto it
    run u60 --set train.max_steps=60 --set evaluate.max_new_tokens=64
    [ -f "$work/pairs.jsonl" ] || python3 bench/gpu_models.py pairs "$work/pairs.jsonl" 600 >/dev/null
    run d30 --set model.base=run:u60 --set train.method=dpo --set train.beta=0.1 --set data.source="$work/pairs.jsonl" \
      --set data.format=preference --set train.max_steps=30 --set evaluate=null --set export.merge=false --set export.gguf=[]
    ;;
  unsloth)
    run t1-unsloth
    # The slow path on the same 600-step schedule, stopped by SIGTERM once step 50 is logged: the first 50
    # losses are compared with the run above (same learning rates at every step).
    UNSLOTH_TORCH_VARLEN=0 first50 t1-slow50
    compare50 "$out/t1-unsloth.jsonl" "$out/t1-slow50.jsonl" | tee "$out/loss50.json"
    bench_table bench --steps 12
    ;;
  probe)
    python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_gpu.py -k "varlen or unsloth_takes or liger" 2>&1 | tail -15 | tee "$out/kernel-tests.txt"
    for fused in 1 0; do
      PEFTOPT_LIGER=$fused python3 -m job bench jobspecs/t1.json "${common[@]:2}" --steps 10 --backend hf --extra hf:8x1:off \
        --json > "$out/bench-hf-liger$fused.json" 2> "$out/bench-hf-liger$fused.err"
      python3 -c 'import json, sys; sys.path.insert(0, "."); from job.bench import table; print(table(json.load(open(sys.argv[1]))))' \
        "$out/bench-hf-liger$fused.json" | tee -a "$out/bench.md"
      [ -n "${OUT:-}" ] && tar czf "$OUT/o.tgz" -C "$out" .
    done
    run u60 --set train.max_steps=60 --set export.merge=false --set export.gguf=[] --set evaluate.targets='["adapter"]'
    ;;
  final)
    run t1-final
    timeout 240 python3 -m job bench jobspecs/t1.json "${common[@]:2}" --steps 12 --json > "$out/bench.json" 2> "$out/bench.err"
    python3 -c 'import json, sys; sys.path.insert(0, "."); from job.bench import table; print(table(json.load(open(sys.argv[1]))))' \
      "$out/bench.json" | tee "$out/bench.md"
    [ -n "${OUT:-}" ] && tar czf "$OUT/o.tgz" -C "$out" .
    ;;
  threads)  # llama.cpp answering the GGUF of a finished t1-final run with each thread count
    python3 - "$work/runs/t1-final" <<'EOF' | tee "$out/llama-threads.json"
import json, os, sys, time
sys.path.insert(0, ".")
from pathlib import Path
from transformers import AutoTokenizer
from job import llamacpp
from job.evaluation import generate
from job.evaluation import suite as suites
from job.specfile import load_spec
run = Path(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(str(run / "merged"))
evaluate = load_spec("jobspecs/t1.json").evaluate
texts = [generate.render(tokenizer, p["prompt"], evaluate) for p in suites.load(evaluate)]
gguf = next((run / "gguf").glob("*.gguf"))
out = {"physical_cores": llamacpp.physical_cores(), "logical": os.cpu_count()}
for threads in sorted({os.cpu_count(), llamacpp.physical_cores(), max(llamacpp.physical_cores() // 2, 1)}):
    started = time.perf_counter()
    answers = llamacpp.generate_many(llamacpp.find(), gguf, texts, 256, threads=threads)
    out[f"threads_{threads}_s"] = round(time.perf_counter() - started, 2)
    out[f"threads_{threads}_tokens"] = sum(len(a.token_ids) for a in answers)
print(json.dumps(out))
EOF
    ;;
  pair)  # both backends' whole 600-step training, one after the other in one call (no evaluation or export)
    run t1-unsloth-train --set evaluate=null --set export.merge=false --set export.gguf=[]
    run t1-hf-train --set train.backend=hf --set evaluate=null --set export.merge=false --set export.gguf=[]
    ;;
  dpo-micro)  # SFT beside DPO with a micro-batch of DPO_MICRO pairs (default 4), per step and precomputed reference
    [ -f "$work/pairs.jsonl" ] || python3 bench/gpu_models.py pairs "$work/pairs.jsonl" 1200 "${PAIR_WORDS:-150-400}" >/dev/null
    bare=(--set evaluate=null --set export.merge=false --set export.gguf=[] --set train.max_steps=60)
    prefs=(--set train.method=dpo --set train.beta=0.1 --set data.source="$work/pairs.jsonl" --set data.format=preference
           --set train.micro_batch_size=${DPO_MICRO:-4})
    run sft-hf60 --set train.backend=hf "${bare[@]}"
    run dpo-m${DPO_MICRO:-4}-hf60 "${prefs[@]}" "${bare[@]}"
    run dpo-pre-m${DPO_MICRO:-4}-hf60 "${prefs[@]}" --set train.precompute_reference=true "${bare[@]}"
    ;;
  hf)
    run t1-hf --set train.backend=hf --set evaluate=null --set export.merge=false --set export.gguf=[]
    ;;
  dpo)
    # PAIR_WORDS=LO-HI sets the answers' length (the tiny tokenizer gives about 1.7 tokens a word)
    [ -f "$work/pairs.jsonl" ] || python3 bench/gpu_models.py pairs "$work/pairs.jsonl" 1200 "${PAIR_WORDS:-150-400}" >/dev/null
    python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_gpu.py -k "varlen" 2>&1 | tail -5 | tee "$out/kernel-tests.txt"
    [ "${FULL:-1}" = 1 ] && run u60 --set train.max_steps=60 --set evaluate.max_new_tokens=64 \
      --set 'evaluate.targets=["base","adapter","merged","gguf"]'
    bare=(--set evaluate=null --set export.merge=false --set export.gguf=[] --set train.max_steps=60)
    run sft-hf60 --set train.backend=hf "${bare[@]}"
    run dpo-pre-hf60 --set train.method=dpo --set train.beta=0.1 --set data.source="$work/pairs.jsonl" \
      --set data.format=preference --set train.precompute_reference=true "${bare[@]}"
    run dpo-hf60 --set train.method=dpo --set train.beta=0.1 --set data.source="$work/pairs.jsonl" \
      --set data.format=preference "${bare[@]}"
    [ "${BENCH:-1}" = 1 ] || exit 0
    timeout 200 python3 -m job bench jobspecs/t1.json "${common[@]:2}" --set data.source="$work/pairs.jsonl" \
      --set data.format=preference --set train.method=dpo --steps 8 --json > "$out/bench-dpo.json" 2> "$out/bench-dpo.err"
    python3 -c 'import json, sys; sys.path.insert(0, "."); from job.bench import table; print(table(json.load(open(sys.argv[1]))))' \
      "$out/bench-dpo.json" | tee "$out/bench-dpo.md"
    [ -n "${OUT:-}" ] && tar czf "$OUT/o.tgz" -C "$out" .
    ;;
esac
