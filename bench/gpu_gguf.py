"""The gguf stage's critical path on a 1B-shaped model, timed piece by piece (for the GPU machine's cores):
the converter's bf16 master, llama-quantize's q8_0, and what verification costs (the file's hash, and llama.cpp
answering the stage's 2 verification prompts with 16 tokens); then, when given, another converter shim on the
same model for a side-by-side figure and a byte comparison of the two files.

    python bench/gpu_gguf.py MODEL_DIR WORK_DIR RESULTS.json [OTHER_SHIM.py]
"""
from __future__ import annotations

import filecmp
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from job import llamacpp  # noqa: E402
from job.rundir import file_sha256  # noqa: E402


def main() -> None:
    model, work, results_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    other_shim = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    work.mkdir(parents=True, exist_ok=True)
    tools = llamacpp.find()
    results: dict = {"threads": llamacpp.usable_cpus()}

    def timed(name, fn):
        started = time.perf_counter()
        value = fn()
        results[name] = round(time.perf_counter() - started, 2)
        results_path.write_text(json.dumps(results, indent=1))  # what finished survives a timeout
        print(name, results[name], flush=True)
        return value

    master, q8 = work / "m-bf16.gguf", work / "m-q8_0.gguf"
    timed("convert_bf16_s", lambda: llamacpp.convert(tools, model, master, "bf16", "llama-bpe"))
    timed("quantize_q8_0_s", lambda: llamacpp.quantize(tools, master, q8, "q8_0"))
    answers = timed("verify_q8_0_s", lambda: (file_sha256(q8), llamacpp.generate_many(
        tools, q8, ["Say hello.", "Tell me one thing about rain."], 16))[1])
    results["answered_tokens"] = [len(a.token_ids) for a in answers]
    results["gguf_stage_s"] = round(results["convert_bf16_s"] + results["quantize_q8_0_s"] + results["verify_q8_0_s"], 2)
    if other_shim:
        other = work / "other-bf16.gguf"
        llamacpp.CONVERTER_SHIM = other_shim
        timed("other_convert_bf16_s", lambda: llamacpp.convert(tools, model, other, "bf16", "llama-bpe"))
        results["same_bytes"] = filecmp.cmp(master, other, shallow=False)
        other.unlink()
    results_path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
