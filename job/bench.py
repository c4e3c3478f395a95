"""`peftopt bench SPEC`: time a few training steps of the spec's architecture on this GPU, as written
(unsloth defaults, the seed notebook's way) and as `micro_batch_size: auto` would run it, side by side.
Each setting runs in its own process on synthetic full-length rows, so one cannot skew the other.

    python -m job bench jobspecs/t1.json --set model.base=/path/to/llama-1b --steps 20
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from job.errors import ExternalError, SpecError
from job.spec import JobSpec

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "T4": 65.0}


def model_flops_per_token(config, seq: int, checkpointing: str) -> float:
    from job.backends.plan import param_count

    # LoRA: forward 2N, backward through frozen weights 2N (no weight gradients); recomputation adds 2N.
    dense = (6 if checkpointing != "off" else 4) * param_count(config)
    attention = 6 * config.num_hidden_layers * config.hidden_size * seq  # causal, forward + backward
    return dense + attention


def peak_tflops(gpu_name: str) -> float | None:
    if os.environ.get("PEFTOPT_PEAK_TFLOPS"):
        return float(os.environ["PEFTOPT_PEAK_TFLOPS"])
    return next((v for k, v in PEAK_TFLOPS.items() if k in gpu_name), None)


def worker(args: dict) -> dict:
    """Runs inside a fresh process: train `warmup + steps` steps, time the last `steps`."""
    import unsloth  # noqa: F401  (must come before transformers/trl)
    import datasets
    import torch
    from transformers import AutoConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from job.backends import unsloth as backend
    from job.backends.trainer import install_cpu_loss_head
    from job.spec import JobSpec

    install_cpu_loss_head()
    spec = JobSpec.model_validate(args["spec"])
    micro, accumulation, mode = args["micro"], args["accumulation"], args["checkpointing"]
    seq, steps, warmup = spec.model.max_seq_length, args["steps"], args["warmup"]
    config = AutoConfig.from_pretrained(spec.model.base)
    torch.cuda.reset_peak_memory_stats()
    model, _ = backend.load(spec.model.base, spec, mode)
    model = backend.wrap(model, spec, mode)
    # Conversations of 1/8 to 3/4 of the context, packed as the spec packs them (trl's padding-free bfd,
    # variable-length attention), so the figure is what a real packed run costs, not a dense best case.
    generator = torch.Generator().manual_seed(0)
    high = min(config.vocab_size, 32000)
    n_rows = (steps + warmup) * micro * accumulation * (3 if spec.train.packing else 1)
    lengths = torch.randint(seq // 8, seq * 3 // 4, (n_rows,), generator=generator).tolist() \
        if spec.train.packing else [seq] * n_rows
    rows = [torch.randint(100, high, (n,), generator=generator).tolist() for n in lengths]
    dataset = datasets.Dataset.from_dict({"input_ids": rows})
    times: list[float] = []
    counted: list[float] = []
    seen = [0.0]

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            times.append(time.perf_counter())
            counted.append(seen[0])

        def on_train_end(self, *a, **k):
            torch.cuda.synchronize()
            times.append(time.perf_counter())
            counted.append(seen[0])

    cfg = SFTConfig(output_dir="/tmp/peftopt-bench", max_steps=steps + warmup, per_device_train_batch_size=micro,
                    gradient_accumulation_steps=accumulation, learning_rate=2e-4, optim="adamw_8bit", bf16=True,
                    logging_steps=1000, save_strategy="no", report_to="none", packing=spec.train.packing, max_length=seq,
                    dataloader_num_workers=0, disable_tqdm=True, seed=0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.model.base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()])
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        seen[0] += float(mask.sum()) if mask is not None else float(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    trainer.train()
    seconds = times[-1] - times[warmup]
    # Batches may be drawn before or after on_step_begin fires; the mean over all steps is exact enough
    # (rows are drawn from one distribution) and immune to that off-by-one.
    tokens = counted[-1] / (steps + warmup) * steps
    tokens_per_s = tokens / seconds
    gpu = torch.cuda.get_device_name(0)
    peak = peak_tflops(gpu)
    flops = model_flops_per_token(config, seq, mode) * tokens_per_s
    return {"tokens_per_s": round(tokens_per_s, 1), "seconds_per_step": round(seconds / steps, 4),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 1024**3, 2),
            "mfu": round(flops / (peak * 1e12), 4) if peak else None, "achieved_tflops": round(flops / 1e12, 1),
            "gpu": gpu}


def run(spec: JobSpec, steps: int, extra: list[str]) -> list[dict]:
    """Raises SpecError without CUDA or a local base model directory."""
    import torch
    from transformers import AutoConfig

    from job.backends import plan

    if not torch.cuda.is_available():
        raise SpecError("bench: needs a CUDA GPU")
    if spec.train is None or not os.path.isdir(spec.model.base):
        raise SpecError("bench: needs a train section and model.base as a local model directory "
                        "(--set model.base=DIR; random weights time the same as real ones)")
    config = AutoConfig.from_pretrained(spec.model.base)
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1024**3
    settings = {"literal (unsloth defaults)": plan.literal(spec), "peftopt auto": plan.choose(spec, config, gpu_gb)}
    for text in extra:  # "8x1:off" style extra candidates
        shape, _, mode = text.partition(":")
        micro, accumulation = (int(x) for x in shape.split("x"))
        settings[f"extra {text}"] = plan.Plan(micro, accumulation, mode or "off", 0.0, 0.0, "asked for")
    results = []
    for label, chosen in settings.items():
        args = {"spec": spec.model_dump(mode="json"), "micro": chosen.micro_batch, "accumulation": chosen.accumulation,
                "checkpointing": chosen.gradient_checkpointing, "steps": steps, "warmup": 3}
        proc = subprocess.run([sys.executable, "-m", "job.bench", "--worker", json.dumps(args)],
                              capture_output=True, text=True, timeout=1800)
        line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"setting": label, "error": tail, **_shape(chosen)})
            continue
        results.append({"setting": label, **_shape(chosen), **json.loads(line)})
    return results


def _shape(chosen) -> dict:
    return {"micro_batch": chosen.micro_batch, "accumulation": chosen.accumulation,
            "gradient_checkpointing": chosen.gradient_checkpointing}


def table(results: list[dict]) -> str:
    head = "| setting | micro x accum | checkpointing | tokens/s | MFU | peak reserved GiB |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['setting']} | {r['micro_batch']} x {r['accumulation']} | {r['gradient_checkpointing']} "
                         f"| failed: {r['error'][:80]} | | |")
        else:
            lines.append(f"| {r['setting']} | {r['micro_batch']} x {r['accumulation']} | {r['gradient_checkpointing']} "
                         f"| {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['peak_reserved_gib']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        try:
            print(json.dumps(worker(json.loads(sys.argv[2]))))
        except Exception as exc:  # reported by the parent as this setting's failure
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            raise ExternalError(str(exc)) from exc
