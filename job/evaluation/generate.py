"""Generation for evaluation: the model's chat template with the generation prompt, no system header
unless the spec asks for one, greedy by default, stop on the template's end-of-turn token, and only the
new tokens decoded with special tokens skipped (decoding the whole sequence is what made the seed
notebook's answers start with 'system ... Cutting Knowledge Date').
"""
from __future__ import annotations

import contextlib
import gc
import time
from pathlib import Path
from typing import Any

from job import llamacpp, templates
from job.spec import EvaluateSpec


def messages_for(prompt: str | list[dict], system_prompt: str | None) -> list[dict]:
    """A prompt (or a suite item's conversation) as the messages the template renders, with the spec's system
    prompt first unless the conversation has its own."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def asked(items: list[dict]) -> list[str | list[dict]]:
    """What each suite item asks: its conversation, or its prompt as one user message."""
    return [item.get("messages") or item["prompt"] for item in items]


def render(tokenizer, prompt: str, evaluate: EvaluateSpec) -> str:
    """The prompt as the model's template writes it for an answer (see render_all)."""
    return render_all(tokenizer, [prompt], evaluate)[0]


def render_all(tokenizer, prompts: list[str | list[dict]], evaluate: EvaluateSpec) -> list[str]:
    """The prompts as the model's template writes them for an answer, by the guarded renderer (job/render.py),
    `enable_thinking` passed when the spec sets it, for the templates that read it.

    Raises:
        DataError: the template fails on a prompt, or outruns its time or memory (naming the prompt).
    """
    from job import render as renderer
    from job.errors import DataError

    extra = {} if evaluate.enable_thinking is None else {"enable_thinking": evaluate.enable_thinking}
    items = [{"messages": messages_for(prompt, evaluate.system_prompt), "add_generation_prompt": True}
             for prompt in prompts]
    texts = []
    for prompt, result in zip(prompts, renderer.chat(tokenizer, items, extra)):
        if "error" in result:
            shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            raise DataError(f"model.chat_template: rendering the prompt {shown[:60]!r} {renderer.why(result)}")
        texts.append(result["text"])
    return texts


def stop_token_ids(tokenizer) -> list[int]:
    ids = []
    for text in templates.stop_strings(tokenizer.chat_template or "", tokenizer.eos_token):
        token_id = tokenizer.convert_tokens_to_ids(text)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


BATCH = 32  # prompts per generate call: all of a suite, bounded so a long suite cannot exhaust memory


def attention_backends(device):
    """SDPA without cuDNN's kernel while decoding: cuDNN builds an execution plan for every new key length,
    i.e. for every decode step, and torch 2.11 tries it first on Hopper. Measured on the H100 (10 prompts x
    256 tokens, 4-bit 1B with a LoRA adapter, unsloth's patched Llama): 37.9 s with cuDNN allowed, 13.4 s
    without; a second pass in the same process, with every plan cached, took 12.8 s."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@contextlib.contextmanager
def quiet_collector():
    """Everything alive before decoding (imported modules and, in the job, what training left: ~900k
    objects) goes to the collector's permanent generation until decoding ends, so that the many
    short-lived objects of a generate loop do not make each full collection walk them again."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def generate_hf(model, tokenizer, suite: list[dict], evaluate: EvaluateSpec, *, max_new_tokens: int | None = None,
                stop=None) -> list[dict]:
    """Answers the prompts with a transformers model, all of them in one left-padded batch (greedy answers
    are the ones it gives one prompt at a time). A stop request ends generation within a token. Regions a
    library marked for torch.compile (unsloth's attention-mask builder) run as they are: compiling them for the
    decode loop's shapes took 4 s of the adapter's 13 s on the H200 and gave the same tokens. `stop` (a
    threading.Event) ends it as a stop request does.

    Raises:
        Interrupted: a signal arrived during evaluation (or `stop` was set).
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from job import interrupt
    from job.errors import Interrupted

    def stopped() -> bool:
        return interrupt.stop_requested() or (stop is not None and stop.is_set())

    class StopOnSignal(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stopped(), device=input_ids.device)

    model.eval()
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer)
    limit = max_new_tokens or evaluate.max_new_tokens
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]
    answers = []
    with quiet_collector():
        for first in range(0, len(suite), BATCH):
            items = suite[first:first + BATCH]
            if stopped():
                raise Interrupted("stopped by a signal during evaluation; rerun to redo this stage")
            prompts = [tokenizer(text, add_special_tokens=False)["input_ids"]
                       for text in render_all(tokenizer, asked(items), evaluate)]
            width = max(len(ids) for ids in prompts)
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompts], device=device)
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=device)
            kwargs: dict[str, Any] = {"do_sample": evaluate.do_sample, "max_new_tokens": limit,
                                      "eos_token_id": stops or None, "pad_token_id": pad_id,
                                      "stopping_criteria": StoppingCriteriaList([StopOnSignal()])}
            if evaluate.do_sample:
                torch.manual_seed(evaluate.seed)
                kwargs.update(temperature=evaluate.temperature, top_p=evaluate.top_p)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            started = time.perf_counter()
            with torch.inference_mode(), attention_backends(device), torch.compiler.set_stance("force_eager"):
                out = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
            seconds = time.perf_counter() - started
            if stopped():
                raise Interrupted("stopped by a signal during evaluation; rerun to redo this stage")
            for row, (item, ids) in enumerate(zip(items, prompts)):
                new_ids = out[row, width:].tolist()
                end = next((i for i, token in enumerate(new_ids) if token in stops), None)
                answers.append({
                    "id": item["id"], "prompt": item["prompt"],
                    "answer": tokenizer.decode(new_ids[:end], skip_special_tokens=True),
                    "token_ids": new_ids[:end], "prompt_tokens": len(ids),
                    "stop_reason": "end_of_turn" if end is not None else "length",
                    "seconds": round(seconds / len(items), 3), "batch_size": len(items),
                })
    return answers


def generate_gguf(tools, path: Path, tokenizer, suite: list[dict], evaluate: EvaluateSpec, *,
                  cores: tuple[list[int], int] | None = None, stop=None, gpu: dict[str, str] | None = None
                  ) -> list[dict]:
    """The suite answered by a GGUF in one llama.cpp process that decodes the prompts together, rendered with
    the same chat template as the transformers targets (on `cores`, CPUs and thread count, when given; on the GPU
    with llama.cpp's CUDA build when `gpu`, its environment, is given; ended when `stop`, a threading.Event, is
    set)."""
    started = time.perf_counter()
    texts = render_all(tokenizer, asked(suite), evaluate)
    cpus, threads = cores if cores else (None, None)
    results = llamacpp.generate_many(tools, path, texts, evaluate.max_new_tokens, threads=threads, cpus=cpus,
                                     stop=stop, gpu=gpu)
    seconds = round((time.perf_counter() - started) / max(len(suite), 1), 3)
    return [{"id": item["id"], "prompt": item["prompt"], "answer": result.text.strip(),
             "token_ids": result.token_ids, "prompt_tokens": len(result.prompt_ids),
             "stop_reason": result.stop_reason, "seconds": seconds, "batch_size": len(suite)}
            for item, result in zip(suite, results)]
