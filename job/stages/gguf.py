"""GGUF: convert the merged model once with llama.cpp's converter, quantize each requested type with
llama-quantize, then prove every file works: load it with llama.cpp, answer the first prompts of the
suite with the model's own chat template, and compare the tokens with the merged transformers model's.
"""
from __future__ import annotations

import contextvars
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from job import llamacpp, modelsrc, templates
from job.errors import ExternalError, SpecError
from job.evaluation import generate, suite
from job.log import counted, get_logger
from job.rundir import atomic_dir, file_sha256
from job.spec import EvaluateSpec, JobSpec
from job.stages.base import CheckScope, RunContext, Stage, StageResult

log = get_logger("peftopt.gguf")
FLOAT_TYPES = ("f32", "f16", "bf16")
EXACT_PREFIX = 8  # a float GGUF must reproduce at least this many greedy tokens (or all, if fewer)


def plan(types: list[str], merged_dtype: str = "bfloat16") -> tuple[str, dict[str, str]]:
    """(the one conversion's outtype, how each type is made: 'convert' or 'quantize').

    The conversion writes a float file and llama-quantize makes every other type from it, q8_0 included:
    the converter can write q8_0 itself, but rounds it block by block in numpy on one core (29.6 s of the
    1.2B model's 31.8-s stage on an H200), where llama-quantize rounds the same 16-bit values on every core.
    The tensors are the same bytes either way (tests/integration/test_llamacpp.py); only their order in the file differs.
    A float master not asked for is the merged model's own type, so nothing is rounded twice, and is deleted.
    """
    floats = [t for t in types if t in FLOAT_TYPES]
    master = floats[0] if floats else {"float16": "f16"}.get(merged_dtype, "bf16")
    return master, {t: ("convert" if t == master else "quantize") for t in types}


# What a GGUF answers to prove it works when the spec names no prompts of its own.
VERIFY_PROMPTS = ("Say hello.", "Tell me one thing about coffee.", "What is two plus two?", "Name a colour.")


def verification_prompts(spec: JobSpec) -> list[dict]:
    """The prompts every GGUF answers to prove it works: the suite's first `export.verify_prompts`."""
    if spec.evaluate and spec.evaluate.prompts is not None:
        return suite.load(spec.evaluate)[: spec.export.verify_prompts]
    return [suite.item_from(prompt, "verification prompt") | {"id": f"p{i}"}
            for i, prompt in enumerate(VERIFY_PROMPTS[: spec.export.verify_prompts])]


def check(spec: JobSpec, scope: CheckScope) -> list[str]:
    """GGUF types and the pre-tokenizer name, against what the pinned llama.cpp build knows.

    Raises:
        MachineError: the pinned tools are not on this machine (with the fix).
    """
    if not scope.machine:
        return []
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


def reads(spec: JobSpec) -> dict[str, Any]:
    """The verification prompts' text (not the whole suite: editing a later prompt reconverts nothing)."""
    try:
        return {"verify": [item["prompt"] for item in verification_prompts(spec)]}
    except SpecError:
        return {"verify": None}  # an unreadable suite: preflight says so


def run(ctx: RunContext) -> StageResult:
    spec, run_dir = ctx.spec, ctx.run_dir
    tools = llamacpp.find()
    run_dir.own(run_dir.merged_dir)  # read by transformers and the converter: all of it the merge stage's own
    tokenizer, _ = modelsrc.load_tokenizer(str(run_dir.merged_dir), spec.model_copy(
        update={"model": spec.model.model_copy(update={"chat_template": "tokenizer"})}))
    evaluate = spec.evaluate or EvaluateSpec()
    prompts = verification_prompts(spec)
    master, how = plan(spec.export.gguf, spec.model.merged_dtype)
    files: dict[str, dict] = {}
    with atomic_dir(run_dir.gguf_dir) as out, ThreadPoolExecutor(1, thread_name_prefix="reference") as pool:
        # The merged model answers on the GPU (or a core) while the converter, a subprocess, works on another;
        # the thread logs with this stage's run and stage fields
        reference_job = pool.submit(contextvars.copy_context().run, merged_reference, spec, run_dir, tokenizer,
                                    prompts, evaluate)
        started = time.perf_counter()
        master_path = out / f"{spec.name}-{master}.gguf"
        llamacpp.convert(tools, run_dir.merged_dir, master_path, master, spec.export.tokenizer_pre,
                         process=ctx.warm.get("gguf"))
        log.info("gguf_converted", outtype=master, seconds=round(time.perf_counter() - started, 2))
        reference = reference_job.result()
        for quant, method in how.items():
            path = out / f"{spec.name}-{quant}.gguf"
            started = time.perf_counter()
            if method == "quantize":
                llamacpp.quantize(tools, master_path, path, quant)
            files[quant] = {"file": path.name, "method": method, "seconds": round(time.perf_counter() - started, 2)}
        if master not in how:
            master_path.unlink()
        for quant, info in counted(list(files.items()), "gguf: verified", "files"):
            path = out / info["file"]
            info.update(size_bytes=path.stat().st_size, sha256=file_sha256(path))
            info["verify"] = verify(tools, path, quant, tokenizer, prompts, reference, evaluate)
            log.info("gguf_verified", type=quant, **{k: v for k, v in info.items() if k != "verify"},
                     agreement=info["verify"]["agreement"], tokenizer_match=info["verify"]["tokenizer_match"])
        (out / "Modelfile").write_text(modelfile(spec, tokenizer, files))
    artifacts = ["gguf/Modelfile"] + [f"gguf/{f['file']}" for f in files.values()]
    return StageResult(artifacts=tuple(artifacts), metrics={"llama_cpp": tools.version, "files": files})


def merged_reference(spec, run_dir, tokenizer, prompts, evaluate) -> list[dict]:
    """Greedy answers of the merged transformers model: what a float GGUF must reproduce."""
    import torch
    from transformers import AutoModelForCausalLM

    from job.backends import device

    # On the GPU when there is one: unsloth, once imported, patches Llama's forward for CUDA only.
    with modelsrc.loading_turn("merged reference"):
        model = AutoModelForCausalLM.from_pretrained(str(run_dir.merged_dir), dtype=torch.float32).to(device(spec))
    greedy = evaluate.model_copy(update={"do_sample": False})
    answers = generate.generate_hf(model, tokenizer, prompts, greedy, max_new_tokens=spec.export.verify_tokens)
    del model
    return answers


def verify(tools, path: Path, quant: str, tokenizer, prompts: list[dict], reference: list[dict],
           evaluate: EvaluateSpec) -> dict:
    """Raises ExternalError when the GGUF does not load, answers nothing, or (float types) disagrees."""
    texts = generate.render_all(tokenizer, generate.asked(prompts), evaluate)
    longest = max(len(ref["token_ids"]) + (1 if ref["stop_reason"] == "end_of_turn" else 0) for ref in reference)
    results = llamacpp.generate_many(tools, path, texts, max(longest, 1))
    per_prompt, tokenizer_match, agreements = [], True, []
    for item, text, ref, result in zip(prompts, texts, reference, results):
        tokenizer_match &= result.prompt_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        want, got = ref["token_ids"], result.token_ids
        common = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        agreements.append(common / len(want) if want else float(not got))
        per_prompt.append({"id": item["id"], "gguf_tokens": got, "merged_tokens": want, "common_prefix": common,
                           "text": result.text})
    if not any(p["gguf_tokens"] for p in per_prompt) and any(p["merged_tokens"] for p in per_prompt):
        raise ExternalError(f"{path.name}: llama.cpp loaded it but produced no output")
    report = {"tokenizer_match": tokenizer_match, "agreement": round(sum(agreements) / len(agreements), 4),
              "prompts": per_prompt}
    if quant in FLOAT_TYPES:
        if not tokenizer_match:
            raise ExternalError(f"{path.name}: llama.cpp tokenizes the prompt differently from the merged "
                                "model's tokenizer (the tokenizer was lost in conversion)")
        short = [p["id"] for p in per_prompt if p["common_prefix"] < min(EXACT_PREFIX, len(p["merged_tokens"]))]
        if short:
            raise ExternalError(f"{path.name}: greedy tokens differ from the merged model's within the first "
                                f"{EXACT_PREFIX} on prompt(s) {', '.join(short)}")
    return report


def ollama_value(text: str, what: str) -> str:
    """`text` quoted as Ollama's Modelfile parser reads a value back (parser/parser.go): a value ends at
    whitespace unless quoted, quotes are not escaped, and unprintable characters are dropped. A value that
    cannot come back whole (a newline, a control character, a quote next to whitespace) is refused.

    Raises:
        ExternalError: the tokenizer's string cannot be written safely (it comes from the model, not the spec).
    """
    import unicodedata

    if not text or any(unicodedata.category(ch).startswith("C") for ch in text):
        raise ExternalError(f"{what} {text!r} holds a newline or another control character; the Modelfile "
                            "cannot carry it (it would add instructions of its own)")
    if '"' in text and (any(ch.isspace() for ch in text) or '"""' in text):
        raise ExternalError(f"{what} {text!r} mixes quotes with whitespace; Ollama's Modelfile cannot quote it")
    return f'"""{text}"""' if '"' in text else f'"{text}"'


def modelfile(spec: JobSpec, tokenizer, files: dict[str, dict]) -> str:
    """An Ollama Modelfile for the smallest-but-safest file (q8_0 first), with template and stop tokens; every
    string that came from the tokenizer is quoted for Ollama's parser."""
    order = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "bf16", "f16"]
    chosen = next((q for q in order if q in files), next(iter(files)))
    name = next((k for k, v in templates.BUILTIN.items() if v == tokenizer.chat_template), None)
    lines = [f"# Ollama Modelfile for {spec.name}: ollama create {spec.name} -f Modelfile",
             f"FROM ./{files[chosen]['file']}"]
    if name:
        thinking = spec.evaluate.enable_thinking if spec.evaluate else None
        lines.append(f'TEMPLATE """{templates.ollama_template(name, thinking)}"""')
    for stop in templates.stop_strings(tokenizer.chat_template or "", tokenizer.eos_token):
        lines.append(f"PARAMETER stop {ollama_value(stop, 'the stop string')}")
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def warm_up(ctx: RunContext):
    """The converter, started when the job starts: its imports (8 of its 15 s on the H200) are done by the time
    the merged model exists."""
    return llamacpp.converter_process(llamacpp.find())


STAGE = Stage(
    name="gguf",
    doc="converts once, quantizes each type, loads every file with llama.cpp and compares its greedy tokens with "
        "the merged model's; writes an Ollama Modelfile",
    enabled=lambda spec: bool(spec.export and spec.export.gguf),
    run=run, check=check, reads=reads, warm_up=warm_up,
    fields=("export.gguf", "export.tokenizer_pre", "export.verify_prompts", "export.verify_tokens",
            "evaluate.system_prompt", "evaluate.enable_thinking"),
    needs=lambda spec: ("merge",),
    artifacts=("gguf",),
)
