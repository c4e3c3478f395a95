"""Evaluate: answer the prompt suite with the base model and/or the trained adapter, and check answers.

The merged model and the GGUF files are evaluated by the stages that make them, with the same suite and
the same generation rules, so that every target lands in `eval/` side by side.
"""
from __future__ import annotations

import time

from job import backends, modelsrc
from job.evaluation import generate, suite
from job.log import get_logger, route_library_logs
from job.rundir import RunDir
from job.spec import JobSpec

log = get_logger("peftopt.evaluate")


def run(spec: JobSpec, run_dir: RunDir, ctx) -> dict:
    route_library_logs()
    prompts = generate.load_suite(spec.evaluate)
    device = backends.device()
    location = modelsrc.model_location(spec, run_dir)
    results, artifacts = {}, []
    for target in [t for t in spec.evaluate.targets if t in ("base", "adapter")]:
        tokenizer_source = str(run_dir.adapter_dir) if target == "adapter" else location
        template_spec = spec if target == "base" else spec.model_copy(
            update={"model": spec.model.model_copy(update={"chat_template": "tokenizer"})})
        started = time.perf_counter()
        tokenizer, _ = modelsrc.load_tokenizer(tokenizer_source, template_spec)
        model = modelsrc.load_model(location, spec, device)
        if target == "adapter":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(run_dir.adapter_dir))
        loaded = time.perf_counter()
        answers = generate.generate_hf(model, tokenizer, prompts, spec.evaluate)
        results[target] = suite.record(run_dir, target, prompts, answers)
        results[target]["timing"] = suite.timing(answers, loaded - started, time.perf_counter() - loaded)
        artifacts.append(f"eval/{target}.jsonl")
        log.info("target_evaluated", target=target, **results[target])
        del model
    if spec.data and spec.data.eval_split is not None and "adapter" in spec.evaluate.targets:
        results["heldout"] = heldout_loss(spec, run_dir, device)
    return {"artifacts": artifacts, "metrics": results}


def heldout_loss(spec: JobSpec, run_dir: RunDir, device: str) -> dict:
    """Mean loss (and perplexity) on the held-out rows, for the base and the adapter."""
    import json
    import math

    import torch
    from peft import PeftModel

    rows = [json.loads(line) for line in (run_dir.data_dir / "eval.jsonl").read_text().splitlines()]
    location = modelsrc.model_location(spec, run_dir)
    model = PeftModel.from_pretrained(modelsrc.load_model(location, spec, device), str(run_dir.adapter_dir))
    model.eval()
    out = {}
    for label, context in (("adapter", torch.inference_mode), ("base", model.disable_adapter)):
        total, count = 0.0, 0
        with context(), torch.inference_mode():
            for row in rows:
                ids = torch.tensor([row["input_ids"]], device=device)
                labels = ids.clone()
                if "assistant_masks" in row:
                    labels[0, torch.tensor(row["assistant_masks"]) == 0] = -100
                n = int((labels[0, 1:] != -100).sum())
                if n:
                    total += float(model(input_ids=ids, labels=labels).loss) * n
                    count += n
        loss = total / count if count else None
        out[label] = {"loss": round(loss, 5) if loss is not None else None,
                      "perplexity": round(math.exp(loss), 3) if loss is not None else None}
    return out
