"""On the GPU machine, after a whole t1 run: the run's GGUF suite answered by llama.cpp with one CPU variant of
the pinned build at a time (a copy of the prefix holding only that variant's library), then with the prefix as
built (ggml loads the best variant the host runs). Prints the seconds each took and whether the tokens agree.

    python3 bench/gpu_llama_variants.py RUN_DIR LLAMA_CPP_PREFIX SCRATCH
"""
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, ".")
from transformers import AutoTokenizer  # noqa: E402

from job import llamacpp  # noqa: E402
from job.evaluation import generate  # noqa: E402
from job.evaluation import suite as suites  # noqa: E402
from job.specfile import load_spec  # noqa: E402

run, prefix, scratch = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(str(run / "merged"))
evaluate = load_spec("jobspecs/t1.json").evaluate
texts = [generate.render(tokenizer, p["prompt"], evaluate) for p in suites.load(evaluate)]
found = sorted(run.rglob("*q8_0*.gguf")) or sorted(run.rglob("*.gguf"))  # a finished run's, or a failed stage's
gguf = found[0]
variants = sorted(p.name[len("libggml-cpu-"):].split(".so")[0] for p in (prefix / "bin").glob("libggml-cpu-*.so"))
out = {"gguf": gguf.name, "variants_built": variants, "physical_cores": llamacpp.physical_cores()}
answers = {}
for variant in ("haswell", "skylakex", "cascadelake", "icelake", "zen4", "sapphirerapids", None):
    if variant is not None and variant not in variants:
        continue
    tools = llamacpp.LlamaCpp(prefix)
    if variant is not None:
        copy = scratch / variant
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(prefix, copy, symlinks=True)
        for lib in (copy / "bin").glob("libggml-cpu-*.so"):
            if not lib.name.startswith(f"libggml-cpu-{variant}.so"):
                lib.unlink()
        tools = llamacpp.LlamaCpp(copy)
    name = variant or "dispatch"
    started = time.perf_counter()
    try:
        result = llamacpp.generate_many(tools, gguf, texts, evaluate.max_new_tokens)
    except Exception as exc:  # a variant this CPU cannot run fails to load: say so and go on
        out[f"{name}_error"] = str(exc)[:200]
        continue
    out[f"{name}_s"] = round(time.perf_counter() - started, 2)
    out[f"{name}_tokens"] = sum(len(a.token_ids) for a in result)
    answers[name] = [a.token_ids for a in result]
if "haswell" in answers:
    out["same_tokens_as_haswell"] = {k: v == answers["haswell"] for k, v in answers.items() if k != "haswell"}
print(json.dumps(out))
