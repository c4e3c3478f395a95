"""Stage fingerprints: which parts of the spec each stage's result depends on, hashed. A finished stage
whose fingerprint still matches is skipped; checkpoints carry the train fingerprint so that another
experiment's checkpoints are never resumed (locally or from the Hub)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from job.rundir import STAGES, file_sha256
from job.spec import JobSpec

# Settings that change how a run executes but not what it computes (backend, micro-batch, grace period)
# are left out, so a retry on another machine resumes instead of being refused.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "prepare": ("model.base", "model.chat_template", "model.max_seq_length", "data"),
    "train": ("model.load_in_4bit", "model.dtype", "lora", "train.max_steps", "train.per_device_batch_size",
              "train.gradient_accumulation_steps", "train.learning_rate", "train.lr_scheduler",
              "train.warmup_steps", "train.weight_decay", "train.optim", "train.packing", "train.seed",
              "train.save_steps"),
    "evaluate": ("evaluate",),
    "merge": ("model.merge_base", "export.merge"),
    "gguf": ("export.gguf", "export.tokenizer_pre", "export.verify_prompts", "export.verify_tokens"),
    "push": ("push",),
}
UPSTREAM = {"prepare": (), "train": ("prepare",), "evaluate": ("train", "prepare"), "merge": ("train",),
            "gguf": ("merge",), "push": ("train", "merge", "gguf")}


def dotted(data: dict, key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def fingerprints(spec: JobSpec) -> dict[str, str]:
    data = spec.model_dump(mode="json")
    prints: dict[str, str] = {}
    for stage in STAGES:
        inputs = {key: dotted(data, key) for key in STAGE_INPUTS[stage]}
        inputs["upstream"] = [prints[s] for s in UPSTREAM[stage] if s in prints]
        if stage == "prepare" and spec.data:  # a local file's content, not only its name
            inputs["data_file_sha256"] = [file_sha256(s.source) if os.path.isfile(s.source) else None
                                          for s in spec.data.all_sources()]
            if spec.data.source is not None:
                inputs["data_file_sha256"] = inputs["data_file_sha256"][0]  # unchanged for one source
        if stage in ("merge", "gguf", "evaluate"):
            inputs["targets"] = dotted(data, "evaluate.targets")
        prints[stage] = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return prints
