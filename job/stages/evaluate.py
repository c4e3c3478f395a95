"""Evaluate: every target the spec names (the base model, the trained adapter, the merged model, each GGUF)
answers the prompt suite with the same generation rules, once the artifacts it needs exist, and the answers
are checked (`eval/<target>.jsonl`, `eval/summary.json`); the held-out loss of base and adapter when the
spec holds rows out. GGUF *verification* (token agreement with the merged model) stays in the gguf stage,
where a GGUF that does not work is refused before it is called done.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from job import backends, llamacpp, modelsrc
from job.evaluation import checks, generate, suite
from job.log import counted, get_logger
from job.rundir import read_jsonl
from job.spec import JobSpec
from job.stages.base import CheckScope, RunContext, Stage, StageResult

log = get_logger("peftopt.evaluate")
# What each target needs made first.
TARGET_NEEDS = {"base": ("prepare",), "adapter": ("prepare", "train"), "merged": ("merge",), "gguf": ("gguf",)}
ORDER = ("base", "adapter", "merged", "gguf")


def enabled(spec: JobSpec) -> bool:
    """With an evaluate section; and without one whenever training holds rows out (their loss, or a preference
    method's rewards, are the run's own figures of how well it learned)."""
    return spec.evaluate is not None or holds_rows_out(spec)


def holds_rows_out(spec: JobSpec) -> bool:
    return bool(spec.train and spec.data and spec.data.eval_split is not None)


def _adapter_scored(spec: JobSpec) -> bool:
    return spec.evaluate is None or "adapter" in spec.evaluate.targets


def needs(spec: JobSpec) -> tuple[str, ...]:
    targets = spec.evaluate.targets if spec.evaluate else []
    wanted = {stage for target in targets for stage in TARGET_NEEDS[target]}
    if spec.evaluate and spec.evaluate.from_data is not None:
        wanted.add("prepare")  # its data/suite.jsonl
    if spec.evaluate and spec.evaluate.harness is not None:
        wanted |= {"prepare", "train"}  # the base as the job reads it, and the adapter
    if heldout_wanted(spec) or preferences_wanted(spec):
        wanted |= {"prepare", "train"}
    if heldout_wanted(spec) and "merged" in targets:
        wanted.add("merge")
    return tuple(s for s in ("prepare", "train", "merge", "gguf") if s in wanted)


def heldout_wanted(spec: JobSpec) -> bool:
    from job import methods

    return holds_rows_out(spec) and _adapter_scored(spec) and methods.get(spec.train.method).scores == "heldout"


def preferences_wanted(spec: JobSpec) -> bool:
    from job import methods

    if not (spec.train and methods.get(spec.train.method).scores == "preferences"):
        return False
    return holds_rows_out(spec) if spec.evaluate is None else "adapter" in spec.evaluate.targets


def reads(spec: JobSpec) -> dict[str, Any]:
    """The suite file and its check files, by content."""
    from job.fingerprint import file_digest

    files = suite.check_files(spec.evaluate) if spec.evaluate else []
    return {str(path.name): file_digest(path) for path in files} | {"base": modelsrc.source_digest(spec)}


def check(spec: JobSpec, scope: CheckScope) -> list[str]:
    problems = modelsrc.problems(spec) if scope.machine else []
    if spec.evaluate is None:
        return problems
    if spec.evaluate.harness is not None and scope.machine:
        from job import harness, settings

        problems += harness.problems(spec.evaluate.harness, settings.get())
    if not isinstance(spec.evaluate.prompts, str) or scope.covers(spec.evaluate.prompts):
        problems += suite.problems(spec.evaluate)
    return problems


def code_check_mode(ctx: RunContext, prompts: list[dict]) -> str:
    """How the suite's code checks run here: sandboxed, unisolated (the spec asked; logged), or skipped."""
    from job.evaluation import sandbox

    mode = ctx.spec.evaluate.code_checks
    if mode == "off" or not any(set(item["checks"]) & set(checks.CODE_CHECKS) for item in prompts):
        return mode
    if mode == "unisolated":
        log.warning("code_checks_unisolated", why="evaluate.code_checks is 'unisolated': the answers' code runs "
                    "without the seccomp filter (limits, empty environment and scratch directory stay)")
        return mode
    isolated, why = sandbox.available(ctx.settings.tool_env())
    if not isolated:
        log.warning("code_checks_skipped", why=why, fix="run where seccomp filters can be installed, or set "
                    "evaluate.code_checks to 'unisolated' to run them anyway")
    return mode


def run(ctx: RunContext) -> StageResult:
    spec, run_dir = ctx.spec, ctx.run_dir
    for made in (run_dir.adapter_dir, run_dir.merged_dir, run_dir.gguf_dir, run_dir.data_dir):
        run_dir.own(made)  # what the targets read back: all of it the earlier stages' own
    results, artifacts = answer_suite(ctx) if spec.evaluate else ({}, [])
    if preferences_wanted(spec):
        results["preferences"] = preference_scores(spec, run_dir, backends.device(spec))
        log.info("preferences_evaluated", **{part: {k: v for k, v in scores.items() if k != "beta"}
                                              for part, scores in results["preferences"].items()})
    elif heldout_wanted(spec):
        results["heldout"] = heldout_loss(spec, run_dir, backends.device(spec))
        log.info("heldout_evaluated", **results["heldout"])
    if spec.evaluate and spec.evaluate.harness is not None:
        from job import harness

        _release_gpu_memory()
        results["harness"] = harness.score(spec, run_dir, backends.device(spec), ctx.settings)
    return StageResult(artifacts=tuple(artifacts), metrics=results)


def _release_gpu_memory() -> None:
    """What this process's allocator keeps cached goes back to the GPU before a child process needs it."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def answer_suite(ctx: RunContext) -> tuple[dict[str, Any], list[str]]:
    """Every target's answers to the suite, checked: (figures by target, artifacts written)."""
    spec, run_dir = ctx.spec, ctx.run_dir
    prompts = suite.load(spec.evaluate, run_dir)
    mode = code_check_mode(ctx, prompts)
    results: dict[str, Any] = {}
    artifacts = []
    answered: dict[str, list[dict]] = {}
    targets = [t for t in ORDER if t in spec.evaluate.targets]
    on_cuda = backends.device(spec) == "cuda"
    on_gpu = [t for t in targets if t != "gguf"] if on_cuda else []
    # On a GPU, llama.cpp's CUDA build answers there beside the transformers targets (the GPU has room for both).
    # Without it the GGUFs answer on the CPU cores while the transformers targets answer on the GPU, their decode
    # loop on one core and llama.cpp on the others; on a CPU-only machine they take turns for the cores.
    gpu = llamacpp.gpu_generation(llamacpp.find()) if "gguf" in targets and on_cuda else None
    beside = llamacpp.cores_beside(1) if "gguf" in targets and on_gpu and not gpu else None
    stop = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="gguf-answers") as pool:
        gguf_job = pool.submit(contextvars.copy_context().run, gguf_answers, spec, run_dir, prompts,
                               beside[1:] if beside else None, stop, gpu) if beside or gpu else None
        try:
            ahead = ctx.warm.get("evaluate")
            for target in counted(targets, "evaluate", "targets"):
                if target == "gguf":
                    continue
                done = ahead.result(target) if ahead else None
                if done is None:
                    done = answer_target(target, spec, run_dir, prompts, beside[0] if beside else None)
                answers, load_s, generate_s = done
                results[target] = _record(run_dir, target, prompts, answers, mode, load_s, generate_s)
                answered[target] = answers
                artifacts.append(f"eval/{target}.jsonl")
            ggufs = gguf_job.result() if gguf_job else gguf_answers(spec, run_dir, prompts) if "gguf" in targets else {}
        finally:
            stop.set()  # a failure above ends llama.cpp's generation rather than waiting for it
    for name, (answers, seconds, device) in ggufs.items():
        results[name] = _record(run_dir, name, prompts, answers, mode, 0.0, seconds, device)
        answered[name] = answers
        artifacts.append(f"eval/{name}.jsonl")
    if "base" in answered:  # each target against the base, prompt by prompt
        for name, answers in answered.items():
            if name != "base":
                results[name]["vs_base"] = checks.paired(answered["base"], answers)
                suite.annotate(run_dir, name, {"vs_base": results[name]["vs_base"]})
    if "adapter" in answered:  # how far the merged model and each GGUF answer as the adapter does
        for name, answers in answered.items():
            if name not in ("adapter", "base") and not spec.evaluate.do_sample:
                results[name]["vs_adapter"] = suite.agreement(answered["adapter"], answers)
                suite.annotate(run_dir, name, {"vs_adapter": results[name]["vs_adapter"]})
    return results, artifacts + ["eval/summary.json"]


def answer_target(target: str, spec: JobSpec, run_dir, prompts: list[dict], decode_cpus: list[int] | None = None,
                  stop: threading.Event | None = None) -> tuple[list[dict], float, float]:
    """A transformers target's answers to the suite, with the seconds loading and generating took; the decode
    loop on `decode_cpus` when given (llama.cpp has the other cores)."""
    started = time.perf_counter()
    model, tokenizer = load_target(target, spec, run_dir)
    loaded = time.perf_counter()
    with llamacpp.this_thread_on(decode_cpus) if decode_cpus else contextlib.nullcontext():
        answers = generate.generate_hf(model, tokenizer, prompts, spec.evaluate, stop=stop)
    del model
    return answers, loaded - started, time.perf_counter() - loaded


class AnswersAhead:
    """The targets that need only training (base, adapter) answered on the GPU while the merge and gguf stages run,
    which use the GPU little (merge folds on the CPU; the converter, llama-quantize and llama.cpp are processes of
    their own): on the H200 that is t1's 16 s of adapter answers taken off the job's critical path. A thread of
    this process, started once prepare and train are done in this job; the stage takes its answers when its turn
    comes, and answers a target itself when the thread did not (it was never started, was stopped, or failed)."""

    def __init__(self, ctx: RunContext, targets: list[str], room=None):
        self.ctx, self.targets = ctx, targets
        self.needed = {stage for target in targets for stage in TARGET_NEEDS[target]}  # done before answering
        self.room = room or _gpu_room  # whether the GPU holds the target beside the later stages' models
        self.stop = threading.Event()
        self.answers: dict[str, tuple[list[dict], float, float]] = {}
        self.failed: BaseException | None = None
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._work,),
                                       name="answers-ahead", daemon=True)

    def _work(self) -> None:
        from job.errors import Interrupted

        spec, run_dir = self.ctx.spec, self.ctx.run_dir
        while not self._ready():
            if self.stop.wait(0.2):
                return
        if not self.room(spec, run_dir):
            return
        try:
            prompts = suite.load(spec.evaluate, run_dir)
            beside = llamacpp.cores_beside(1)
            # The decode loop's CPU is kept from the gguf stage's tools from here on (loading, on every CPU, first)
            with structlog.contextvars.bound_contextvars(stage="evaluate"), \
                    llamacpp.cpus_held(beside[0] if beside else []):
                for target in self.targets:
                    self.answers[target] = answer_target(target, spec, run_dir, prompts,
                                                         beside[0] if beside else None, stop=self.stop)
                    log.info("target_answered_ahead", target=target, load_s=round(self.answers[target][1], 2),
                             generate_s=round(self.answers[target][2], 2))
        except Interrupted:
            pass  # a stop request: the stage is redone by the rerun
        except BaseException as exc:  # noqa: BLE001 - the stage answers the target itself, and fails there if it must
            self.failed = exc

    def _ready(self) -> bool:
        return all(self.ctx.done[name].is_set() for name in self.needed)

    def result(self, target: str) -> tuple[list[dict], float, float] | None:
        """The target's answers made ahead (waiting for the thread if it is still at work), or None."""
        if target not in self.targets:
            return None
        if not self._ready():
            self.stop.set()  # still waiting on a stage this job does not run (--stages): answered in turn instead
        self.thread.join()
        if self.failed is not None and target not in self.answers:
            log.warning("answers_ahead_failed", target=target,
                        error=f"{type(self.failed).__name__}: {str(self.failed).splitlines()[0] if str(self.failed) else ''}")
            self.failed = None
        return self.answers.pop(target, None)


def _gpu_room(spec: JobSpec, run_dir) -> bool:
    """Whether the GPU has room for the base beside the merge and gguf stages' models: free memory (with what this
    process's allocator holds unused) of at least twice the base's weights in 16-bit, plus 2 GiB. A config of
    another shape than the usual decoder's: no answers ahead."""
    import types

    import torch

    try:
        config_file = modelsrc.source_file(modelsrc.model_location(spec, run_dir), "config.json")
        config = types.SimpleNamespace(**json.loads(config_file.read_text()))
        weights = 2 * modelsrc.param_count(config)
        free, _ = torch.cuda.mem_get_info()
    except Exception:  # noqa: BLE001 - any doubt means no answers ahead; the stage answers in turn
        return False
    held = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    return free + held >= 2 * weights + (2 << 30)


@contextlib.contextmanager
def warm_up(ctx: RunContext):
    """Answers ahead (AnswersAhead) for a GPU run with base or adapter among its targets; nothing otherwise."""
    from job import distributed

    spec = ctx.spec
    targets = [t for t in ("base", "adapter") if spec.evaluate and t in spec.evaluate.targets]
    if not targets or ctx.dry_run or distributed.active(ctx.settings) or backends.device(spec) != "cuda":
        yield None
        return
    ahead = AnswersAhead(ctx, targets)
    ahead.thread.start()
    try:
        yield ahead
    finally:
        ahead.stop.set()
        ahead.thread.join()


def gguf_answers(spec: JobSpec, run_dir, prompts: list[dict], cores: tuple[list[int], int] | None = None,
                 stop: threading.Event | None = None, gpu: dict[str, str] | None = None
                 ) -> dict[str, tuple[list[dict], float, str]]:
    """Each GGUF's answers to the suite, by target name (gguf-<type>), with the seconds they took and where they were
    made (cuda or cpu); on the GPU with
    llama.cpp's CUDA build when `gpu` (its environment) is given, falling back to the CPU if that build fails there
    (a GPU its kernels were not built for); on `cores` (the CPUs llama.cpp may use, and its thread count) when given."""
    from job.errors import ExternalError

    tools = llamacpp.find()
    tokenizer = _tokenizer(str(run_dir.merged_dir), spec)
    files = run_dir.gguf_files()
    out = {}
    for quant, info in files.items():
        started = time.perf_counter()
        path = run_dir.gguf_dir / info["file"]
        try:
            answers = generate.generate_gguf(tools, path, tokenizer, prompts, spec.evaluate, cores=cores, stop=stop,
                                             gpu=gpu)
        except ExternalError as exc:
            if not gpu:
                raise
            log.warning("gguf_gpu_failed", file=info["file"], error=exc.message,
                        fix="rebuild llama.cpp with this GPU's architecture in LLAMA_CUDA_ARCHITECTURES, or set "
                            "PEFTOPT_GGUF_GPU=0")
            gpu = None
            started = time.perf_counter()
            answers = generate.generate_gguf(tools, path, tokenizer, prompts, spec.evaluate, cores=cores, stop=stop)
        out[f"gguf-{quant}"] = (answers, time.perf_counter() - started, "cuda" if gpu else "cpu")
    return out


def preference_scores(spec: JobSpec, run_dir, device: str) -> dict:
    """The adapter's implicit rewards against the base (adapter off) on the held-out examples and on (at most 256
    of) the training examples: reward_accuracy, reward_margin, chosen/rejected log-probabilities."""

    from peft import PeftModel

    from job import preference

    location = modelsrc.model_location(spec, run_dir)
    model = PeftModel.from_pretrained(modelsrc.load_model(location, spec, device), str(run_dir.adapter_dir))
    tokenizer = _tokenizer(str(run_dir.adapter_dir), spec)
    out = {}
    for part in ("eval", "train"):
        path = run_dir.data_dir / f"{part}.jsonl"
        if path.exists():
            examples = read_jsonl(run_dir.own(path))
            out["heldout" if part == "eval" else "train"] = preference.implicit_rewards(
                model, tokenizer, examples, spec.train.beta_value(), spec.model.max_seq_length, device)
    return out


def _record(run_dir, target, prompts, answers, mode, load_s, generate_s, device: str | None = None) -> dict:
    summary = dict(suite.record(run_dir, target, prompts, answers, mode))
    summary["timing"] = suite.timing(answers, load_s, generate_s)
    if device:  # where llama.cpp answered: cuda (its CUDA build) or cpu
        summary["timing"]["device"] = device
    log.info("target_evaluated", target=target, **summary)
    return summary


def _tokenizer(location: str, spec: JobSpec):
    """A trained artifact's own tokenizer and template (what it was trained with)."""
    tokenizer, _ = modelsrc.load_tokenizer(location, spec.model_copy(
        update={"model": spec.model.model_copy(update={"chat_template": "tokenizer"})}))
    return tokenizer


def load_target(target: str, spec: JobSpec, run_dir):
    """(model, tokenizer) of a transformers target. The merged model is evaluated in float32, as the GGUF's
    reference answers are computed: its bf16 weights are exact in float32, so it answers as a 16-bit
    runtime would without a second rounding of the activations."""
    with modelsrc.loading_turn(target):
        return _load_target(target, spec, run_dir)


def _load_target(target: str, spec: JobSpec, run_dir):
    import torch

    device = backends.device(spec)
    if target == "merged":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(run_dir.merged_dir), dtype=torch.float32).to(device)
        return model, _tokenizer(str(run_dir.merged_dir), spec)
    location = modelsrc.model_location(spec, run_dir)
    model = modelsrc.load_model(location, spec, device)
    if target == "base":
        tokenizer, _ = modelsrc.load_tokenizer(location, spec)
        return model, tokenizer
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(run_dir.adapter_dir)), _tokenizer(str(run_dir.adapter_dir), spec)


def heldout_loss(spec: JobSpec, run_dir, device: str) -> dict:
    """Mean loss, perplexity and tokens scored on the held-out rows, for the adapter, the base (the adapter
    off) and, when the spec evaluates it, the merged model."""
    from peft import PeftModel

    rows = read_jsonl(run_dir.own(run_dir.data_dir / "eval.jsonl"))
    location = modelsrc.model_location(spec, run_dir)
    model = PeftModel.from_pretrained(modelsrc.load_model(location, spec, device), str(run_dir.adapter_dir))
    out = {"adapter": _mean_loss(model, rows, device)}
    with model.disable_adapter():
        out["base"] = _mean_loss(model, rows, device)
    del model
    if spec.evaluate and "merged" in spec.evaluate.targets:
        merged, _ = load_target("merged", spec, run_dir)
        out["merged"] = _mean_loss(merged, rows, device)
    return out


def _mean_loss(model, rows: list[dict], device: str) -> dict:
    """The model's mean loss over the rows' trained tokens (the assistant's, where the rows mark them)."""
    import math

    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
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
    return {"loss": round(loss, 5) if loss is not None else None,
            "perplexity": round(math.exp(loss), 3) if loss is not None else None, "tokens": count}


STAGE = Stage(
    name="evaluate",
    doc="answers the prompt suite with every target (base, adapter, merged, each GGUF) and checks the answers; "
        "held-out loss when the spec holds rows out",
    enabled=enabled,
    run=run, check=check, reads=reads, needs=needs, warm_up=warm_up,
    fields=("evaluate", "model.base", "model.chat_template", "model.load_in_4bit", "model.dtype"),
    artifacts=("eval",),
)
