"""`peftopt bench SPEC`: time a few training steps of the spec on this GPU, side by side: the seed notebook's
literal setting (unsloth defaults), and each backend as `peftopt run` would plan it. Every setting runs in
its own process through the same trainer set-up the job uses (`backends.trainer.build_trainer`), on the
spec's own data prepared as the job prepares it (or, for Hub data, synthetic rows of 1/8 to 3/4 of the
context), and is timed as the job's `steady_tokens_per_s` is: after the first warm-up steps.

    python -m job bench jobspecs/t1.json --set model.base=/path/to/llama-1b --steps 20
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from job import methods
from job.errors import ExternalError, SpecError
from job.spec import JobSpec

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "T4": 65.0}
WARMUP = 3


def model_flops_per_token(config, seq: int, checkpointing: str, reference: bool = False) -> float:
    from job.backends.plan import param_count

    # LoRA: forward 2N, backward through frozen weights 2N (no weight gradients); recomputation adds 2N; a
    # reference forward (dpo, kto: the base with the adapter off) another 2N.
    dense = (6 if checkpointing != "off" else 4) * param_count(config) + (2 * param_count(config) if reference else 0)
    attention = 6 * config.num_hidden_layers * config.hidden_size * seq  # causal, forward + backward
    return dense + attention


def peak_tflops(gpu_name: str) -> float | None:
    from job import settings

    if settings.get().peak_tflops:
        return settings.get().peak_tflops
    return next((v for k, v in PEAK_TFLOPS.items() if k in gpu_name), None)


def synthetic_rows(spec: JobSpec, vocab_size: int, n_rows: int) -> list[list[int]]:
    import torch

    seq = spec.model.max_seq_length
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(seq // 8, seq * 3 // 4, (n_rows,), generator=generator).tolist() \
        if spec.train.packing else [seq] * n_rows
    return [torch.randint(100, min(vocab_size, 32000), (n,), generator=generator).tolist() for n in lengths]


def synthetic_pairs(spec: JobSpec, tokenizer, n_rows: int) -> list[dict]:
    """Conversational preference rows of random text: a prompt of 1/8 to 1/4 of the context and answers of 1/4 to
    1/2 of it (a pair of long answers: the two sequences a preference method puts through the model)."""
    import torch

    seq = spec.model.max_seq_length
    generator = torch.Generator().manual_seed(0)

    def text(low: int, high: int) -> str:
        n = int(torch.randint(low, high, (1,), generator=generator))
        return tokenizer.decode(torch.randint(100, min(len(tokenizer), 32000), (n,), generator=generator).tolist())

    rows = []
    for _ in range(n_rows):
        prompt = [{"role": "user", "content": text(seq // 8, seq // 4)}]
        answers = [[{"role": "assistant", "content": text(seq // 4, seq // 2)}] for _ in range(2)]
        if family(spec) == "task":  # answers are sampled: a prompt and a check any answer can pass or fail
            rows.append({"prompt": prompt, "checks": json.dumps([{"type": "contains", "value": "e"}]),
                         "reference": None, "id": ""})
        else:
            rows.append({"prompt": prompt, "completion": answers[0], "label": True} if family(spec) == "unpaired"
                        else {"prompt": prompt, "chosen": answers[0], "rejected": answers[1]})
    return rows


def family(spec: JobSpec) -> str:
    return methods.get(spec.train.method).family


def worker(args: dict) -> dict:
    """Runs inside a fresh process: trains WARMUP + steps steps of one setting, times the last `steps`."""
    if args["backend"] == "unsloth":
        from job.backends import unsloth

        unsloth.import_library()  # before transformers/trl, which it patches
    import datasets
    import torch
    from transformers import AutoConfig

    from job import backends, modelsrc, settings
    from job.backends import trainer as shared
    from job.backends.plan import Plan

    shared.install_cpu_loss_head()
    spec = JobSpec.model_validate(args["spec"])
    chosen = Plan(**args["plan"])
    backend = backends.load(args["backend"])
    config = AutoConfig.from_pretrained(spec.model.base)
    torch.cuda.reset_peak_memory_stats()
    model, peft_config, info = backend.setup(spec, spec.model.base, "cuda", chosen, settings.get())
    tokenizer, _ = modelsrc.load_tokenizer(spec.model.base, spec)
    if args["data"]:
        dataset = datasets.Dataset.from_json(args["data"])
    else:
        rows = (args["steps"] + WARMUP) * chosen.micro_batch * chosen.accumulation * 3
        if family(spec) == "chat":
            dataset = datasets.Dataset.from_dict({"input_ids": synthetic_rows(spec, config.vocab_size, rows)})
        else:
            dataset = datasets.Dataset.from_list(synthetic_pairs(spec, tokenizer, rows))
    with tempfile.TemporaryDirectory() as scratch:
        trainer, session = shared.build_trainer(spec, model, tokenizer, dataset, "cuda", chosen, Path(scratch),
                                                peft_config=peft_config, backend=backend)
        info.update(session.backend_figures)
        with shared.CollectorPauses().frozen():  # as the job trains
            trainer.train()
        if session.batch_workers is not None:
            session.batch_workers.end()
    progress = session.progress
    (t0, n0), (t1, n1) = progress.clock[WARMUP - 1], progress.clock[-1]
    tokens_per_s = (n1 - n0) / (t1 - t0)
    gpu = torch.cuda.get_device_name(0)
    peak = peak_tflops(gpu)
    reference = methods.get(spec.train.method).reference_per_step(spec.train)
    flops = model_flops_per_token(config, spec.model.max_seq_length, chosen.gradient_checkpointing, reference) \
        * tokens_per_s
    return {"tokens_per_s": round(tokens_per_s, 1), "seconds_per_step": round((t1 - t0) / args["steps"], 4),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 1024**3, 2),
            "mfu": round(flops / (peak * 1e12), 4) if peak else None, "achieved_tflops": round(flops / 1e12, 1),
            "gpu": gpu, "batch_workers": trainer.args.dataloader_num_workers, **info}


def prepared_data(spec: JobSpec, steps: int, scratch: Path) -> str | None:
    """The spec's local data, prepared by the job's own prepare stage (enough rows for the timed steps)."""
    from job import settings
    from job.rundir import RunDir
    from job.stages import prepare
    from job.stages.base import RunContext

    if spec.data is None or not all(os.path.isfile(s.source) for s in spec.data.all_sources()):
        return None
    sequences = (steps + WARMUP) * spec.train.per_device_batch_size * spec.train.gradient_accumulation_steps
    enough = sequences * 8  # a packed row holds a few conversations
    limited = spec.model_copy(update={"data": spec.data.model_copy(update={
        "num_samples": min(spec.data.num_samples or enough, enough), "eval_split": None})})
    run_dir = RunDir(scratch / "bench")
    prepare.run(RunContext(spec=limited, run_dir=run_dir, settings=settings.get()))
    return str(run_dir.data_dir / "train.jsonl")


def run(spec: JobSpec, steps: int, extra: list[str], only: str | None = None) -> list[dict]:
    """Raises SpecError without CUDA or a local base model directory (an earlier run's merged model for `run:NAME`)."""
    import torch
    from transformers import AutoConfig

    from job import backends
    from job import settings as settings_module
    from job.backends import plan

    if not torch.cuda.is_available():
        raise SpecError("bench: needs a CUDA GPU")
    from job import modelsrc

    if modelsrc.source_kind(spec.model.base) == "run":  # a chained spec: the earlier run's merged model
        merged = str(modelsrc.earlier_run(spec) / "merged")
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"base": merged})})
    if spec.train is None or not os.path.isdir(spec.model.base):
        raise SpecError("bench: needs a train section and model.base as a local model directory "
                        "(--set model.base=DIR; random weights time the same as real ones)")
    config = AutoConfig.from_pretrained(spec.model.base)
    current = settings_module.get()
    settings = {  # each backend's own plan, as `peftopt run` makes it
        "literal (unsloth defaults, as the notebook ran it)": ("unsloth", plan.literal(spec)),
        "peftopt auto: unsloth": ("unsloth", backends.load("unsloth").plan(spec, config, "cuda", current)),
        "peftopt auto: hf": ("hf", backends.load("hf").plan(spec, config, "cuda", current)),
    }
    kept = replace(current, dequantize_base=False)
    for label, (backend, chosen) in list(settings.items()):  # what dequantizing a 4-bit base once buys
        if chosen.dequantize_base:
            settings[f"{label}, 4-bit base kept"] = (backend, backends.load(backend).plan(spec, config, "cuda", kept))
    in_loop = {}  # what collating batches in a worker process buys (settings.batch_workers_on)
    if current.batch_workers_on("cuda"):
        label = "peftopt auto: unsloth"
        in_loop[f"{label}, batches collated in the training loop"] = settings[label]
    settings.update(in_loop)
    verified = methods.get(spec.train.method).backends  # what backends.choose would run the method on
    settings = {label: setting for label, setting in settings.items() if setting[0] in verified}
    for text in extra:  # "8x1:off" or "hf:8x1:on" style extra candidates
        parts = text.split(":")
        backend = parts.pop(0) if parts[0] in ("hf", "unsloth") else "unsloth"
        micro, accumulation = (int(x) for x in parts[0].split("x"))
        mode = parts[1] if len(parts) > 1 else "off"
        settings[f"extra {text}"] = (backend, plan.Plan(micro, accumulation, mode, 0.0, 0.0, "asked for"))
    if only:  # one backend's settings alone
        settings = {label: setting for label, setting in settings.items() if setting[0] == only}
    timed = spec.model_copy(update={"train": spec.train.model_copy(update={"max_steps": steps + WARMUP, "epochs": None})})
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        data = prepared_data(timed, steps, Path(scratch))
        for label, (backend, chosen) in settings.items():
            args = {"spec": timed.model_dump(mode="json"), "backend": backend, "plan": asdict(chosen),
                    "steps": steps, "data": data}
            env = current.child_env(**({"PEFTOPT_BATCH_WORKERS": "0"} if label in in_loop else {}))
            proc = subprocess.run([sys.executable, "-m", "job.bench", "--worker", json.dumps(args)],
                                  capture_output=True, text=True, timeout=1800, env=env)
            line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
            shape = {"backend": backend, "micro_batch": chosen.micro_batch, "accumulation": chosen.accumulation,
                     "gradient_checkpointing": chosen.gradient_checkpointing, "estimated_gb": chosen.estimated_gb or None}
            if proc.returncode != 0 or line is None:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                results.append({"setting": label, "error": tail, **shape})
                continue
            results.append({"setting": label, **shape, **json.loads(line)})
    return results


def table(results: list[dict]) -> str:
    head = ("| setting | backend | micro x accum | checkpointing | base weights | tokens/s | MFU | peak reserved GiB "
            "| planner's estimate GiB | attention | kernels |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        shape = f"| {r['setting']} | {r['backend']} | {r['micro_batch']} x {r['accumulation']} | {r['gradient_checkpointing']} "
        if "error" in r:
            lines.append(f"{shape}| | failed: {r['error'][:80]} | | | | | |")
        else:
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "?"
            lines.append(f"{shape}| {r.get('base_weights', '')} | {r['tokens_per_s']:,.0f} | {mfu} | "
                         f"{r['peak_reserved_gib']} | {r.get('estimated_gb') or ''} | {r.get('attention', '')} | "
                         f"{r.get('kernels', '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        from job import settings
        from job.log import configure, events_to_stderr

        configure(settings=settings.init())
        events_to_stderr()
        try:
            print(json.dumps(worker(json.loads(sys.argv[2]))))
        except Exception as exc:  # reported by the parent as this setting's failure
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            raise ExternalError(str(exc)) from exc
