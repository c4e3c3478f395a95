"""Everything a jobspec names, checked before any work starts: the prompt suite and its checks, a chat-template
file, the data file and its first rows, a local base model, the GGUF types and pre-tokenizer the pinned
llama.cpp knows, the backend, and the tokens for push and checkpoint sync. Every problem is reported at once.

`peftopt validate` runs the part that does not depend on the machine: files named relative to the jobspec
(shipped beside it). `peftopt run` runs all of it for the stages it will run.
"""
from __future__ import annotations

import os
from pathlib import Path

from job import modelsrc
from job.errors import DataError, SpecError
from job.spec import DataSourceSpec, JobSpec

FIRST_ROWS = 200  # rows of a data file parsed before any work; the rest are checked by prepare


def _local(path: str | None, spec_dir: Path | None) -> bool:
    """Whether `path` is a file this check should look at: any local path for a run, only the files shipped
    beside the jobspec (under its folder) for `validate`."""
    if not path or not path.startswith("/"):
        return False
    return spec_dir is None or Path(path).resolve().is_relative_to(spec_dir.resolve())


def prompt_suite_problems(spec: JobSpec) -> list[str]:
    from job.evaluation import checks, generate

    try:
        suite = generate.load_suite(spec.evaluate)
    except SpecError as exc:
        return [exc.message]
    problems = []
    for item in suite:
        for name, settings in item["checks"].items():
            if name not in checks.CHECKS:
                problems.append(f"evaluate.prompts: prompt {item['id']}: unknown check {name!r} "
                                f"(known: {', '.join(sorted(checks.CHECKS))})")
                continue
            try:
                checks.CHECKS[name]("", prompt=item["prompt"], **(settings if isinstance(settings, dict) else {}))
            except (TypeError, KeyError, ValueError) as exc:
                problems.append(f"evaluate.prompts: prompt {item['id']}: check {name!r} settings {settings!r}: {exc}")
    return problems


def chat_template_problems(spec: JobSpec) -> list[str]:
    from transformers.utils.chat_template_utils import render_jinja_template

    setting = spec.model.chat_template
    try:
        text = Path(setting).read_text(encoding="utf-8")
    except OSError as exc:
        return [f"model.chat_template: cannot read {setting}: {exc.strerror}"]
    except UnicodeDecodeError:
        return [f"model.chat_template: {setting} is not UTF-8"]
    sample = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    try:
        rendered = render_jinja_template([sample], chat_template=text, add_generation_prompt=False,
                                         bos_token="<s>", eos_token="</s>")
    except Exception as exc:  # jinja2's syntax and runtime errors, and the template's raise_exception
        return [f"model.chat_template: {setting} does not render a conversation: {type(exc).__name__}: {exc}"]
    rendered = rendered[0][0] if isinstance(rendered, tuple) else rendered
    if "u" not in str(rendered) or "a" not in str(rendered):
        return [f"model.chat_template: {setting} leaves the messages out of what it renders"]
    return []


def data_problems(spec: JobSpec, source: DataSourceSpec, where: str) -> None:
    """Raises DataError (exit 3) naming the first bad row among the first rows, unless rows may be skipped."""
    from job import data

    rows = data.read_local(Path(source.source))  # DataError: missing, not UTF-8, not JSON (naming the line)
    if not rows:
        raise DataError(f"{where}: {source.source} holds no rows")
    if spec.data.bad_rows == "skip":
        return
    for index, row in enumerate(rows[:FIRST_ROWS]):
        try:
            data.standardize(row, source.format, source.system_prompt or spec.data.system_prompt)
        except data.BadRow as exc:
            raise DataError(f"{'data' if where == 'data.source' else where} row {index}: {exc} (in {source.source}; "
                            "set data.bad_rows='skip' to drop such rows)") from None


def base_model_problems(spec: JobSpec) -> list[str]:
    base = spec.model.base
    if modelsrc.source_kind(base) != "dir":
        return []
    missing = [] if (Path(base) / "config.json").is_file() else ["config.json"]
    if not any((Path(base) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        missing.append("a tokenizer (tokenizer.json or tokenizer.model)")
    return [f"model.base: {base} has no {' and no '.join(missing)}"] if missing else []


def llama_cpp_problems(spec: JobSpec) -> list[str]:
    """GGUF types and the pre-tokenizer name, against what the pinned llama.cpp build knows.

    Raises:
        SpecError: the pinned tools are not there (with the fix).
    """
    from job import llamacpp

    tools = llamacpp.find()
    problems = []
    known_types = llamacpp.quant_types(tools)
    for quant in spec.export.gguf:
        if quant not in ("f32", "f16", "bf16", "q8_0") and quant.upper() not in known_types:
            problems.append(f"export.gguf: {quant!r} is not a type the pinned llama-quantize knows")
    if spec.export.tokenizer_pre and spec.export.tokenizer_pre not in llamacpp.pre_tokenizers(tools):
        problems.append(f"export.tokenizer_pre: {spec.export.tokenizer_pre!r} is not a pre-tokenizer the pinned "
                        "converter knows (e.g. 'llama-bpe')")
    return problems


def check(spec: JobSpec, stages: list[str], *, spec_dir: Path | None = None) -> None:
    """Checks what `stages` will need. With `spec_dir` (validate), only files shipped beside the jobspec.

    Raises:
        SpecError: every problem with the spec's inputs, listed (exit 2).
        DataError: a data row among the first ones is malformed (exit 3).
    """
    machine = spec_dir is None
    problems: list[str] = []
    if machine and {"prepare", "train", "evaluate"} & set(stages):
        try:
            modelsrc.check_source(spec)
        except SpecError as exc:
            problems.append(exc.message)
        problems += base_model_problems(spec)
    uses_prompts = spec.evaluate is not None and ({"evaluate", "merge", "gguf"} & set(stages)) and \
        isinstance(spec.evaluate.prompts, str)
    if uses_prompts and (machine or _local(spec.evaluate.prompts, spec_dir)):
        problems += prompt_suite_problems(spec)
    if spec.model.chat_template.endswith(".jinja") and "prepare" in stages and \
            (machine or _local(spec.model.chat_template, spec_dir)):
        problems += chat_template_problems(spec)
    if machine and "gguf" in stages and spec.export:
        problems += llama_cpp_problems(spec)  # SpecError at once when the tools are missing
    if machine and "train" in stages and spec.train.backend != "hf":
        from job import backends

        # unsloth must be imported before transformers to patch it; choosing here does that, and a
        # backend that cannot run here fails now rather than after data preparation.
        try:
            backends.choose(spec.train.backend, backends.device(), spec.lora)
        except SpecError as exc:
            problems.append(exc.message)
    if machine and "train" in stages:
        from job import tracking

        problems += tracking.check(spec)
    if machine and "train" in stages and spec.train.checkpoint_sync:
        from job import checkpoint_sync

        try:
            checkpoint_sync.token(spec)
        except SpecError as exc:
            problems.append(exc.message)
    if machine and "push" in stages:
        from job.stages import push

        try:
            push.check_token(spec)
        except SpecError as exc:
            problems.append(exc.message)
    local_files = []  # (source, the field naming it) to read before any work
    if spec.data is not None and "prepare" in stages:
        for index, source in enumerate(spec.data.all_sources()):
            where = "data.source" if spec.data.source is not None else f"data.sources[{index}]"
            if not source.source.startswith("/") or not (machine or _local(source.source, spec_dir)):
                continue
            if os.path.isfile(source.source):
                local_files.append((source, where))
            else:
                problems.append(f"{where}: {source.source} does not exist")
    if problems:
        raise SpecError(problems[0] if len(problems) == 1 else f"{len(problems)} problems with the jobspec's inputs",
                        details=problems if len(problems) > 1 else None)
    for source, where in local_files:
        data_problems(spec, source, where)
