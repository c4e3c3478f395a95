"""One-off GPU probe: where does the first generate() of a process lose its time after unsloth patched Llama?

    python tests/gpu_probe_decode.py MODEL_DIR VARIANT     # VARIANT: default | no-cudnn | graphs | math

Loads the model as unsloth does (which patches Llama's forward), then as the evaluate stage does (4-bit,
a LoRA adapter), and answers the suite twice in one left-padded batch, timing every decode step.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    model_dir, variant = sys.argv[1], sys.argv[2]
    if variant == "graphs":
        os.environ["UNSLOTH_DECODE_CUDA_GRAPHS"] = "1"
    started = time.perf_counter()
    import unsloth  # noqa: F401
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LogitsProcessor, LogitsProcessorList

    from job import modelsrc
    from job.evaluation import generate
    from job.specfile import load_spec

    spec = load_spec("jobspecs/t1.json", [f"model.base={model_dir}", "push=null"])
    unsloth.FastLanguageModel.from_pretrained(model_dir, max_seq_length=2048, load_in_4bit=True)  # the patches
    imported = time.perf_counter() - started
    torch.cuda.empty_cache()
    tokenizer, _ = modelsrc.load_tokenizer(model_dir, spec.model_copy(
        update={"model": spec.model.model_copy(update={"chat_template": "tokenizer"})}))
    model = modelsrc.load_model(model_dir, spec, "cuda")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    prompts = generate.load_suite(spec.evaluate)

    class Clock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    original = model.generate

    def timed(*args, **kwargs):
        kwargs["logits_processor"] = LogitsProcessorList([clock])
        return original(*args, **kwargs)

    model.generate = timed
    out = {"variant": variant, "import_and_patch_s": round(imported, 1)}
    for attempt in (1, 2):
        clock = Clock()
        began = time.perf_counter()
        if variant in ("no-cudnn", "math"):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            allowed = [SDPBackend.MATH] if variant == "math" else \
                [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
            with sdpa_kernel(allowed):
                generate.generate_hf(model, tokenizer, prompts, spec.evaluate)
        else:
            generate.generate_hf(model, tokenizer, prompts, spec.evaluate)
        total = time.perf_counter() - began
        steps = [round(1000 * (b - a), 1) for a, b in zip(clock.times, clock.times[1:])]
        ordered = sorted(steps)
        out[f"run{attempt}"] = {"total_s": round(total, 2), "prefill_ms": round(1000 * (clock.times[0] - began), 1),
                                "first_steps_ms": steps[:8], "median_ms": ordered[len(ordered) // 2],
                                "p90_ms": ordered[int(len(ordered) * 0.9)], "max_ms": ordered[-1],
                                "steps_over_100ms": sum(s > 100 for s in steps), "steps": len(steps),
                                "ms_by_quarter": [round(sum(q) / len(q), 1) for q in
                                                  (steps[i * len(steps) // 4:(i + 1) * len(steps) // 4] for i in range(4))]}
    out["sdp_priority"] = [str(torch.nn.attention.SDPBackend(i)) for i in torch._C._get_sdp_priority_order()]
    out["forward"] = type(model.base_model.model).forward.__module__
    print(json.dumps(out))


if __name__ == "__main__":
    main()
