"""Merge: fold the LoRA adapter into a 16-bit copy of the base and save it with its tokenizer."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from job import modelsrc
from job.errors import ExternalError
from job.fingerprint import model_dir_digest
from job.log import get_logger
from job.rundir import RunDir, atomic_dir
from job.spec import JobSpec
from job.stages.base import RunContext, Stage, StageResult

log = get_logger("peftopt.merge")


def merge_source(spec: JobSpec, run_dir: RunDir) -> tuple[str, str]:
    """(where the 16-bit base comes from, how): a named 16-bit copy, else the base itself, dequantized
    when it was stored in 4-bit (no download of another checkpoint)."""
    if spec.model.merge_base:
        return spec.model.merge_base, "merge_base"
    location = modelsrc.model_location(spec, run_dir)
    config = Path(location) / "config.json"
    stored_4bit = config.is_file() and "quantization_config" in json.loads(config.read_text())
    if not config.is_file() and spec.model.load_in_4bit and "4bit" in location.lower():
        stored_4bit = True  # a Hub *-bnb-4bit repo
    return location, "dequantized-4bit" if stored_4bit else "base-16bit"


def merge(spec: JobSpec, run_dir: RunDir, adapter_dir: str, timing: dict | None = None):
    """Returns the merged model in float32 on CPU (the caller casts and saves); `timing` gets the seconds of
    loading (`load_s`, the turn's wait included) and folding (`fold_s`)."""
    import torch

    started = time.perf_counter()
    with modelsrc.loading_turn("merge"):
        model = _merge_model(spec, run_dir, adapter_dir)
    loaded = time.perf_counter()
    merged = model.merge_and_unload().to(torch.float32)
    if timing is not None:
        timing.update(load_s=round(loaded - started, 2), fold_s=round(time.perf_counter() - loaded, 2))
    return merged


def _merge_model(spec: JobSpec, run_dir: RunDir, adapter_dir: str):
    """The base in float32 on the CPU with the adapter on it (a 4-bit checkpoint dequantized first)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    location, how = merge_source(spec, run_dir)
    if how == "dequantized-4bit":
        # A pre-quantized checkpoint loads only as 4-bit (bitsandbytes, on the GPU when there is one);
        # dequantize it there, then fold in float32 on the CPU.
        from job.backends import device

        try:
            quantized = AutoModelForCausalLM.from_pretrained(
                location, device_map={"": 0} if device(spec) == "cuda" else {"": "cpu"}, dtype=torch.bfloat16)
        except (OSError, ValueError) as exc:
            raise ExternalError(f"cannot load model {location}: {str(exc).splitlines()[0]}") from None
        from transformers import AutoConfig

        # Rebuild as a plain model: the dequantized one still carries its quantizer, which breaks saving.
        config = AutoConfig.from_pretrained(location)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state = {k: v.to("cpu", torch.float32) for k, v in quantized.dequantize().state_dict().items()}
        missing, unexpected = base.load_state_dict(state, strict=False)
        if [k for k in missing if "lm_head" not in k] or unexpected:
            raise ExternalError(f"{location}: dequantized weights do not fit (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]})")
        base.tie_weights()
        del quantized, state
    else:
        # Merging in float32 keeps the fold exact before the one rounding to 16-bit.
        base = modelsrc.load_model(location, spec.model_copy(update={"model": spec.model.model_copy(
            update={"dtype": "float32"})}), "cpu", four_bit=False)
    try:
        return PeftModel.from_pretrained(base, adapter_dir)
    except (OSError, ValueError) as exc:
        raise ExternalError(f"cannot load the adapter from {adapter_dir}: {exc}") from None


def run(ctx: RunContext) -> StageResult:
    import torch

    spec, run_dir = ctx.spec, ctx.run_dir
    run_dir.own(run_dir.adapter_dir)  # read back, and handed to peft: all of it the train stage's own
    location, how = merge_source(spec, run_dir)
    timing: dict[str, float] = {}
    merged = merge(spec, run_dir, str(run_dir.adapter_dir), timing)
    tokenizer, _ = modelsrc.load_tokenizer(str(run_dir.adapter_dir), spec.model_copy(
        update={"model": spec.model.model_copy(update={"chat_template": "tokenizer"})}))
    dtype = getattr(torch, spec.model.merged_dtype)
    saving = time.perf_counter()
    with atomic_dir(run_dir.merged_dir) as out:
        merged.to(dtype).save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        # llama.cpp's converter picks the tokenizer type from these files; save_pretrained drops them.
        modelsrc.copy_tokenizer_files(location, out)
        # the base's own code references would make the converter (and any loader) run code the model names
        dropped = modelsrc.drop_custom_code(out)
    timing["save_s"] = round(time.perf_counter() - saving, 2)
    log.info("merged", source=location, how=how, dtype=str(dtype).removeprefix("torch."), custom_code_dropped=dropped,
             **timing)
    return StageResult(artifacts=("merged",), metrics={"merged_into": how, "source": location,
                                                       "dtype": str(dtype).removeprefix("torch."),
                                                       "custom_code_dropped": dropped, "timing": timing})


def reads(spec: JobSpec) -> dict[str, Any]:
    return {"merge_base": model_dir_digest(spec.model.merge_base) if spec.model.merge_base else None}


STAGE = Stage(
    name="merge",
    doc="folds the adapter into a 16-bit copy of the base",
    enabled=lambda spec: bool(spec.export and spec.export.merge),
    run=run, reads=reads, fields=("model.merge_base", "model.dtype", "export.merge"),
    needs=lambda spec: ("train",),
    artifacts=("merged",),
)
