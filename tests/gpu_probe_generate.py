"""One-off GPU diagnostic: where the evaluate stage's batched generate spends its time (not a test)."""
import json, os, sys, time
variant = sys.argv[1]
model_dir = sys.argv[2]
if variant != "plain":
    import unsloth  # noqa
import torch
sys.path.insert(0, os.getcwd())
from job import modelsrc
from job.specfile import load_spec
from job.evaluation import generate
spec = load_spec("jobspecs/t1.json", [f"model.base={model_dir}", "push=null"])
if variant != "plain":
    from unsloth import FastLanguageModel
    m, _ = FastLanguageModel.from_pretrained(model_dir, max_seq_length=2048, load_in_4bit=True)
    del m
    torch.cuda.empty_cache()
from peft import LoraConfig, get_peft_model
model = modelsrc.load_model(model_dir, spec, "cuda")
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
tok, _ = modelsrc.load_tokenizer(model_dir, spec)
prompts = generate.load_suite(spec.evaluate)
ev = spec.evaluate.model_copy(update={"max_new_tokens": 64})
if variant == "graphs":
    from unsloth.models import _decode_graphs
    _decode_graphs.ENABLED = True
ctx = torch.compiler.set_stance("force_eager") if variant == "eager" else None
def go():
    t = time.perf_counter(); a = generate.generate_hf(model, tok, prompts, ev); torch.cuda.synchronize()
    return time.perf_counter() - t, sum(len(x["token_ids"]) for x in a)
if ctx:
    with ctx:
        go(); s, n = go()
else:
    go(); s, n = go()
print(json.dumps({"variant": variant, "seconds": round(s, 2), "tokens": n, "ms_per_step": round(1000 * s / 64, 1)}))
if variant == "unsloth":
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate.generate_hf(model, tok, prompts, ev.model_copy(update={"max_new_tokens": 8}))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
