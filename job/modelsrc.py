"""Where the base model comes from, and loading it (tokenizer with the spec's chat template, model).

A Hub id or a local model directory is loaded as it is. A GGUF file (or `package:<dist>`, a GGUF that an
installed package assembles) is turned once into a plain 16-bit model directory in the run's `base/`,
with a SentencePiece tokenizer rebuilt from the GGUF's own vocabulary: transformers' GGUF tokenizer
splits words wrongly, and its GGUF-loaded model refuses `save_pretrained`.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from job import templates
from job.errors import ExternalError, PeftoptError, SpecError
from job.log import counted, get_logger
from job.rundir import RunDir, atomic_dir
from job.spec import JobSpec

log = get_logger("peftopt.model")
# Held while a model is built: transformers' loading switches process-wide state (weight initialisation turned off
# and back on), so two threads loading at once (evaluate's targets answered ahead beside merge and gguf) take turns.
LOADING = threading.RLock()


@contextlib.contextmanager
def loading_turn(what: str) -> Iterator[None]:
    """LOADING held while `what` is built; a wait of over 0.1 s for another thread's loading is logged
    (`model_load_waited`), so a stage's time says how much of it was its turn."""
    started = time.perf_counter()
    with LOADING:
        waited = time.perf_counter() - started
        if waited > 0.1:
            log.info("model_load_waited", what=what, seconds=round(waited, 2))
        yield
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json")


def source_kind(base: str) -> str:
    if base.startswith("package:"):
        return "package"
    if base.startswith("run:"):
        return "run"
    if base.endswith(".gguf"):
        return "gguf"
    if os.path.isdir(base):
        return "dir"
    if base.startswith(("/", ".")):
        return "missing"
    return "hub"


def needs_local_copy(spec: JobSpec) -> bool:
    return source_kind(spec.model.base) in ("package", "gguf")


def earlier_run(spec: JobSpec) -> Path:
    """The run directory a `run:NAME` base names: NAME in the same output directory."""
    return Path(spec.output_dir) / spec.model.base.removeprefix("run:")


def model_location(spec: JobSpec, run_dir: RunDir) -> str:
    """The local directory transformers loads the base from: the run's own copy of a GGUF base, a Hub model's
    snapshot (downloaded the first time through the Hub retry helper), or the directory the spec names; its every
    file checked before any library opens it (`checked_model_dir`).

    Raises:
        ExternalError: a Hub model could not be downloaded (exit 4).
        DataError: a file of it is a link out of it, a FIFO or a device (exit 3).
    """
    if needs_local_copy(spec):
        return checked_model_dir(run_dir.base_dir, links=False)
    if source_kind(spec.model.base) == "run":
        return checked_model_dir(earlier_run(spec) / "merged", links=False)
    if source_kind(spec.model.base) == "hub":
        from job import hub

        return checked_model_dir(hub.model_snapshot(spec.model.base))
    return checked_model_dir(spec.model.base)


def checked_model_dir(directory: str | Path, *, links: bool = True) -> str:
    """`directory`, once every file in it is a regular file of its own: transformers and peft read whatever a model
    directory holds (every additional_chat_templates/*.jinja, processor and generation configs, through links), and
    a link to /proc/self/environ read as a template would be saved into the adapter and pushed. Links are allowed
    only to regular files inside it (`links`: a Hub snapshot's into its cached repo; none in what peftopt wrote).

    Raises:
        DataError: naming the first entry that is a link out, a link to something else, a FIFO, a device (exit 3).
    """
    from job.errors import DataError
    from job.inputs import foreign_entry

    root = Path(directory).resolve()  # the directory the spec names may itself be a link: the author's choice
    within = (root.parent.parent if root.parent.name == "snapshots" else root) if links else None
    problem = foreign_entry(root, links_within=within) if root.is_dir() else None
    if problem:
        raise DataError(f"model: {directory}: {problem}; a model's files must be its own regular files")
    problem = weights_problem(root) if root.is_dir() else None
    if problem:
        raise DataError(f"model: {directory}: {problem}")
    return str(directory)


def weights_problem(directory: Path) -> str | None:
    """Why the weights do not make the model config.json describes (read from the safetensors headers, before
    anything is loaded), or None. transformers fills what the weights leave out with fresh random tensors: a config
    whose vocab_size is huge and whose embeddings are missing made it allocate 6.4 GB for a 5 MB model, and under a
    memory limit that was exit 4 (retry) for a model that can never load."""
    import struct

    config_path = source_file(directory, "config.json")
    files = sorted(p for p in directory.glob("*.safetensors") if source_file(directory, p.name))
    if config_path is None or not files or config_path.stat().st_size > 1 << 20:
        return None
    try:
        config = json.loads(config_path.read_text())
    except ValueError:
        return "config.json is not JSON"
    if not isinstance(config, dict) or "quantization_config" in config:
        return None  # packed 4-bit tensors: their shapes are not the parameters'
    stored = 0
    for path in files:
        try:
            with open(path, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                if length > 100 << 20:
                    return f"{path.name} has a header of {length:,} bytes"
                header = json.loads(fh.read(length))
            stored += sum(_elements(info.get("shape")) for key, info in header.items()
                          if key != "__metadata__" and isinstance(info, dict))
        except (OSError, ValueError, struct.error, TypeError):
            return f"{path.name} is not a safetensors file"
    described = _described_parameters(config)
    if described and stored < described / 2:
        return (f"config.json describes about {described / 1e6:,.0f}M parameters but its weights hold "
                f"{stored / 1e6:,.1f}M; transformers would make up the rest at random (a vocab_size or layer "
                "count the weights do not have)")
    return None


def _elements(shape) -> int:
    count = 1
    for size in shape if isinstance(shape, list) else []:
        count *= int(size)
    return count


def param_count(config) -> int:
    """Parameters of a decoder of the usual shape (attention, gated MLP, embeddings) from its config's fields: the
    batch planner's arithmetic and the check of a config against its weights."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * hidden)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = hidden * head_dim * (heads * 2 + kv * 2)
    per_layer = attention + 3 * hidden * inter
    embeddings = config.vocab_size * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return layers * per_layer + embeddings


def _described_parameters(config: dict) -> int | None:
    """Parameters of a decoder config of the usual fields (None for any other shape of config)."""
    from types import SimpleNamespace

    needed = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    if not all(isinstance(config.get(k), int) and config[k] > 0 for k in needed):
        return None
    try:
        return param_count(SimpleNamespace(**config))
    except (TypeError, ZeroDivisionError, AttributeError):
        return None


def problems(spec: JobSpec) -> list[str]:
    """Preflight: a local base that is not there, or not a model, fails before any work (nothing is imported)."""
    base = spec.model.base
    kind = source_kind(base)
    if kind == "missing" or (kind == "gguf" and not os.path.isfile(base)):
        return [f"model.base: {base} does not exist"]
    if kind == "run":
        return run_problems(spec)
    if kind == "package":
        dist = base.removeprefix("package:")
        if "gguf" not in dist.lower():
            return [f"model.base: {base!r} is not a GGUF model package (its name holds 'gguf', as the demo's does)"]
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return [f"model.base: package {dist!r} is not installed (pip install {dist})"]
        if importlib.util.find_spec(dist.replace("-", "_")) is None:
            return [f"model.base: package {dist!r} has no module {dist.replace('-', '_')!r} to assemble a GGUF with"]
    if kind == "dir":
        checked_model_dir(base)  # DataError (exit 3): preflight reports it once the spec's problems are none
        missing = [] if source_file(base, "config.json") else ["config.json"]
        if not any(source_file(base, name) for name in ("tokenizer.json", "tokenizer.model")):
            missing.append("a tokenizer (tokenizer.json or tokenizer.model)")
        if missing:
            return [f"model.base: {base} has no {' and no '.join(missing)} (regular files inside it)"]
        problem = custom_code_problem(base)
        if problem:
            return [problem]
    return []


def run_problems(spec: JobSpec) -> list[str]:
    """Preflight of a `run:NAME` base: that run merged its adapter (its merged model is what this run trains)."""
    from job.errors import RunConflict
    from job.rundir import read_json

    earlier = earlier_run(spec)
    try:
        state = read_json(earlier / "state.json")
    except RunConflict as exc:
        return [f"model.base: {spec.model.base!r}: {exc.message}"]
    if state is None:
        return [f"model.base: {spec.model.base!r}: there is no run {earlier.name!r} in {earlier.parent}"]
    stages = state.get("stages") if isinstance(state, dict) else None
    merge = stages.get("merge") if isinstance(stages, dict) else None
    if not isinstance(merge, dict):
        return [f"model.base: {spec.model.base!r}: {earlier / 'state.json'} is not the state of a peftopt run; "
                "run that spec again, or name another run"]
    if merge.get("status") != "done" or not (earlier / "merged" / "config.json").is_file():
        return [f"model.base: {spec.model.base!r}: that run has not merged its adapter yet (its merge stage is "
                f"{merge.get('status', 'not in its spec')}); run it to the end first"]
    return []


def source_digest(spec: JobSpec) -> Any:
    """What the base model is, by content: a local directory's config, tokenizer and weight headers, a GGUF
    file's bytes, a model package's version. A Hub id is its own name (in the spec's fields)."""
    from job.fingerprint import file_digest, model_dir_digest

    base = spec.model.base
    kind = source_kind(base)
    if kind == "dir":
        return model_dir_digest(base)
    if kind == "run":
        from job.errors import RunConflict
        from job.rundir import read_json

        earlier = earlier_run(spec)
        try:
            merge_print = read_json(earlier / "state.json")["stages"]["merge"]["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError, RunConflict):
            merge_print = None
        return {"merged": model_dir_digest(earlier / "merged"), "merge_fingerprint": merge_print}
    if kind == "gguf":
        return file_digest(base)
    if kind == "package":
        try:
            return importlib.metadata.version(base.removeprefix("package:"))
        except importlib.metadata.PackageNotFoundError:
            return None
    return None


def dtype_for(spec: JobSpec, device: str):
    import torch

    if spec.model.dtype != "auto":
        return getattr(torch, spec.model.dtype)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(location: str, spec: JobSpec):
    """Loads the tokenizer and installs the chat template the spec asks for. Returns (tokenizer, name)."""
    from transformers import AutoConfig, AutoTokenizer

    from job.errors import DataError

    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise ExternalError(f"cannot load the tokenizer of {location}: {str(exc).splitlines()[0]}") from None
    except BaseException as exc:  # the tokenizers library's own errors (its regex engine's), and its Rust panics
        if not tokenizer_failure(exc):
            raise
        raise DataError(f"model: the tokenizer of {location} does not load: {str(exc).splitlines()[0][:300]} "
                        "(tokenizer.json)") from None
    try:
        model_type = AutoConfig.from_pretrained(location).model_type
    except (OSError, ValueError):  # an adapter directory has no config.json
        model_type = None
    name, text = templates.choose(spec.model.chat_template, tokenizer.chat_template, model_type)
    tokenizer.chat_template = text
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, name


def tokenizer_failure(exc: BaseException) -> bool:
    """An error of the tokenizers library (Rust) about the model's own tokenizer: its plain `Exception` (a regex
    of tokenizer.json its engine refuses) or a PanicException (a regex that fails while matching text), which is
    not an Exception at all."""
    return type(exc).__name__ == "PanicException" or (type(exc) is Exception and "Onig" in str(exc))


def load_model(location: str, spec: JobSpec, device: str, *, four_bit: bool | None = None,
               attn_implementation: str | None = None, shardable: bool = False, weightless: bool = False,
               config=None):
    """Loads the base as a causal LM on `device`, in 4-bit when asked (bitsandbytes NF4). `shardable`: 4-bit
    weights packed into the compute dtype instead of bytes, so that FSDP shards them with everything else (it
    would leave uint8 weights whole on every rank). `weightless`: the model's structure on the meta device, no
    weights read (a sharded rank other than 0, which receives its shard from rank 0). `config`: the model's own,
    changed (kernels_ahead's model of fewer layers: the checkpoint's other layers are not loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    dtype = dtype_for(spec, device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if weightless:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config or AutoConfig.from_pretrained(location), **kwargs)
    if config is not None:
        kwargs["config"] = config
    if spec.model.load_in_4bit if four_bit is None else four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float16 or device == "cuda" else torch.float32,
            **({"bnb_4bit_quant_storage": dtype} if shardable else {}))
        kwargs["device_map"] = {"": torch.cuda.current_device()} if device == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except PeftoptError:  # a stop request raised here by the signal handler is the stop, not a bad model
        raise
    except Exception as exc:  # the model's files: OSError, ValueError, safetensors' and torch's own errors
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ExternalError(f"cannot load model {location}: {type(exc).__name__}: {first}") from None
    if "device_map" not in kwargs:
        model.to(device)
    return model


# ------------------------------------------------------------------------------------ GGUF as a base


def gguf_file(base: str, settings) -> Path:
    if base.startswith("package:"):
        dist = base.removeprefix("package:")
        module = importlib.import_module(dist.replace("-", "_"))
        if not callable(getattr(module, "assemble", None)):
            raise SpecError(f"model.base: package {dist!r} has no assemble() that writes its GGUF")
        cache = settings.home_cache() / "peftopt-models"
        target = cache / f"{dist}.gguf"
        if not target.exists():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            module.assemble(tmp, overwrite=True)  # checks the package's sha256
            os.replace(tmp, target)
        return target
    return Path(base)


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _spm_tokenizer_from_gguf(reader, out_dir: Path) -> None:
    """Rebuilds a SentencePiece `tokenizer.model` (and the config llama.cpp's converter reads) from GGUF fields."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    from transformers import AutoTokenizer

    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    proto = sp_pb2.ModelProto()
    proto.trainer_spec.model_type = sp_pb2.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(tokens)
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.split_digits = True
    proto.trainer_spec.allow_whitespace_only_pieces = True
    unk = ids["unknown"] if ids["unknown"] is not None else 3
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id = unk, ids["bos"] if ids["bos"] is not None else -1
    proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = ids["eos"], ids["padding"] if ids["padding"] is not None else -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.escape_whitespaces = True
    proto.normalizer_spec.remove_extra_whitespaces = False
    user_defined = []
    for i, (text, score, kind) in enumerate(zip(tokens, scores, types)):
        piece = proto.pieces.add()
        if kind == 4:
            text = text.replace(" ", "▁")
            user_defined.append((i, text))
        piece.piece, piece.score = text, float(score)
        piece.type = sp_pb2.ModelProto.SentencePiece.UNKNOWN if i == unk else int(kind)
    (out_dir / "tokenizer.model").write_bytes(proto.SerializeToString())
    special = {t: tokens[i] for t, i in (("bos_token", ids["bos"]), ("eos_token", ids["eos"]),
                                         ("unk_token", unk), ("pad_token", ids["padding"])) if i is not None}
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir), tokenizer_type="gemma", add_bos_token=True,
                                              use_fast=True, **special)
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(text, normalized=True, special=False) for _, text in user_defined])
    tokenizer.save_pretrained(str(out_dir))
    # llama.cpp's SentencePiece converter takes user-defined/control types only from this key, which
    # transformers 5 no longer writes.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["added_tokens_decoder"] = {
        str(i): {"content": tokens[i] if types[i] != 4 else tokens[i].replace(" ", "▁"), "lstrip": False,
                 "rstrip": False, "normalized": types[i] == 4, "single_word": False, "special": types[i] == 3}
        for i in range(len(tokens)) if types[i] in (3, 4)
    }
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def materialize_gguf_base(spec: JobSpec, run_dir: RunDir, settings) -> dict:
    """Turns the GGUF base into `run_dir/base`: bf16 safetensors plus a rebuilt tokenizer, copied from the machine's
    base cache when it holds a sound copy (job/basecache.py), else built and stored there. Returns facts."""
    from gguf import GGUFReader

    from job import basecache
    from job.fingerprint import file_digest

    path = gguf_file(spec.model.base, settings)
    entry = basecache.key(file_digest(path))
    with atomic_dir(run_dir.base_dir) as out:
        cached = basecache.fetch(settings, entry, out)
        if not cached:
            build_from_gguf(path, out)
            basecache.store(settings, entry, out)
    reader = GGUFReader(str(path))
    facts = {"gguf": str(path), "architecture": _field(reader, "general.architecture"),
             "license": _field(reader, "general.license"), "tokenizer": _field(reader, "tokenizer.ggml.model"),
             "from_cache": cached}
    log.info("base_materialized", path=str(run_dir.base_dir), **facts)
    return facts


def cached_base_files(spec: JobSpec, settings, target: Path, names: tuple[str, ...]) -> None:
    """The named files of a GGUF or package base's built directory, copied into `target` (for `inspect`): from the
    base cache, built into it first when it has no sound copy."""
    import tempfile

    from job import basecache
    from job.fingerprint import file_digest

    path = gguf_file(spec.model.base, settings)
    entry = basecache.key(file_digest(path))
    if basecache.fetch(settings, entry, target, only=names):
        return
    with tempfile.TemporaryDirectory(prefix="peftopt-base-") as scratch:
        log.info("base_building", gguf=str(path), action="once: kept in the base cache for runs")
        build_from_gguf(path, Path(scratch))
        basecache.store(settings, entry, Path(scratch))
        for name in names:
            if (Path(scratch) / name).is_file():
                shutil.copyfile(Path(scratch) / name, target / name)


def build_from_gguf(path: Path, out: Path) -> None:
    """bf16 safetensors and a tokenizer in `out`, from the GGUF file at `path`."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM

    import transformers.modeling_gguf_pytorch_utils as gguf_loading

    # its tensor bar is tqdm's own, not transformers' (which log.py turns off): the one bar of a library that
    # would print into a JSON stream; peftopt's stage line counts the tensors instead (on a terminal)
    gguf_loading.tqdm = lambda items, **_: counted(items, "base: tensors read", "tensors")
    reader = GGUFReader(str(path))
    tokenizer_model = _field(reader, "tokenizer.ggml.model")
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a plain model with the same weights does not.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise ExternalError(f"{path}: weights do not fit the architecture (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    if missing:
        plain.tie_weights()
    plain.save_pretrained(str(out))
    del loaded, plain
    if tokenizer_model == "llama":
        _spm_tokenizer_from_gguf(reader, out)
    else:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(out))


def source_file(directory: str | Path, name: str) -> Path | None:
    """A regular file of a model directory that resolves inside it (or, for a Hub snapshot, inside its cached
    repo, where the snapshot's links point); None for anything else, a link out of the directory above all."""
    root = Path(directory)
    path = root / name
    if not path.is_file():
        return None
    resolved, allowed = path.resolve(), root.resolve()
    if root.parent.name == "snapshots":  # huggingface_hub's cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
        allowed = root.parent.parent.resolve()
    return path if resolved.is_relative_to(allowed) else None


def copy_tokenizer_files(source: str, target: Path) -> None:
    """Copies tokenizer files a save_pretrained may drop (tokenizer.model, added_tokens_decoder): regular files
    inside the base directory only, their content (never a link)."""
    if not os.path.isdir(source):
        return
    for name in ("tokenizer.model",):
        src = source_file(source, name)
        if name in os.listdir(source) and src is None:
            log.warning("model_file_refused", file=name, why="not a regular file inside the base model directory")
        if src is not None and not (target / name).exists():
            shutil.copyfile(src, target / name)
    src_cfg, dst_cfg = source_file(source, "tokenizer_config.json"), target / "tokenizer_config.json"
    if src_cfg is not None and dst_cfg.exists():
        src_data, dst_data = json.loads(src_cfg.read_text()), json.loads(dst_cfg.read_text())
        changed = False
        if "added_tokens_decoder" in src_data and "added_tokens_decoder" not in dst_data:
            dst_data["added_tokens_decoder"] = src_data["added_tokens_decoder"]
            changed = True
        # transformers 5 saves its backend's class name; llama.cpp's converter reads the base's (Phi-4's
        # 'GPT2Tokenizer' is how it knows a BPE vocabulary); a name only, never code (auto_map is dropped).
        base_class = src_data.get("tokenizer_class")
        if isinstance(base_class, str) and re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", base_class) \
                and dst_data.get("tokenizer_class") != base_class:
            dst_data["tokenizer_class"] = base_class
            changed = True
        if "added_tokens_decoder" not in dst_data:  # transformers 5 keeps them in tokenizer.json only
            decoder = added_tokens_decoder(target / "tokenizer.json")
            if decoder:
                dst_data["added_tokens_decoder"] = decoder
                changed = True
        if changed:
            dst_cfg.write_text(json.dumps(dst_data, indent=2, ensure_ascii=False))


def added_tokens_decoder(tokenizer_json: Path) -> dict:
    """tokenizer_config.json's `added_tokens_decoder` from tokenizer.json's added tokens: llama.cpp's SentencePiece
    converter reads which tokens are special (control tokens it matches in a prompt) from there alone."""
    try:
        added = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens") or []
    except (OSError, ValueError):
        return {}
    keys = ("content", "lstrip", "rstrip", "normalized", "single_word", "special")
    return {str(t["id"]): {k: t[k] for k in keys if k in t} for t in added
            if isinstance(t, dict) and isinstance(t.get("id"), int) and isinstance(t.get("content"), str)}


def drop_custom_code(model_dir: Path) -> list[str]:
    """Removes what would make a loader run code the model names (`auto_map`, custom-code files) from a
    model directory peftopt wrote. Returns what was removed."""
    removed = []
    for name in ("config.json", "tokenizer_config.json", "processor_config.json", "generation_config.json"):
        path = model_dir / name
        if path.is_file():
            data = json.loads(path.read_text())
            if isinstance(data, dict) and "auto_map" in data:
                del data["auto_map"]
                path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
                removed.append(f"{name}: auto_map")
    for path in model_dir.glob("*.py"):
        path.unlink()
        removed.append(path.name)
    return removed


def custom_code_problem(base: str) -> str | None:
    """Preflight: a local base whose architecture exists only as the model's own code (auto_map naming a
    model type transformers does not ship) cannot be trained without running that code, which peftopt never
    does."""
    config = source_file(base, "config.json") if os.path.isdir(base) else None
    if config is None:
        return None
    try:
        data = json.loads(config.read_text())
    except ValueError:
        return f"model.base: {base}/config.json is not JSON"
    if not isinstance(data, dict) or "auto_map" not in data:
        return None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if data.get("model_type") not in CONFIG_MAPPING_NAMES:
        return (f"model.base: {base}/config.json names custom code (auto_map) for model type "
                f"{data.get('model_type')!r}, which transformers does not ship; peftopt never runs a model's own code")
    return None
