"""GPU tier (`make test-gpu` on the GPU machine; skipped without CUDA): the tiny pipeline on CUDA with each
backend, 4-bit, resume after SIGTERM, merge from a pre-quantized 4-bit base, the notebook's metrics, and packed
rows on torch's varlen flash kernel (same loss and gradients as sdpa with a block mask; unsloth takes it)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    return run_cli("run", *args, timeout=1200)


@pytest.mark.parametrize("backend,four_bit", [("hf", False), ("hf", True), ("unsloth", False), ("unsloth", True)])
def test_pipeline_on_cuda(make_spec, tmp_path, backend, four_bit):
    spec = make_spec(f"{backend}-{'4bit' if four_bit else '16bit'}",
                     model={"load_in_4bit": four_bit, "dtype": "bfloat16"},
                     train={"backend": backend, "max_steps": 8, "optim": "adamw_8bit"},
                     evaluate={"prompts": ["Say hello."], "max_new_tokens": 8, "targets": ["base", "adapter"]},
                     export={"merge": True, "gguf": ["q8_0"], "tokenizer_pre": "llama-bpe", "verify_tokens": 8})
    result = run(str(spec))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = next((tmp_path / "runs").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    train = metrics["train"]
    assert train["backend"] == backend and train["device"] == "cuda"
    assert 0 < train["peak_gpu_gb"] < train["gpu_memory_gb"] and train["lora_gpu_gb"] >= 0
    assert train["gpu_name"] and 0 < train["peak_gpu_share"] < 1 and train["tokens_per_s"] > 0
    assert train["final_loss"] > 0 and train["runtime_s"] > 0
    assert metrics["gguf"]["files"]["q8_0"]["verify"]["prompts"]
    assert train["attention"].startswith("varlen")  # packed rows on the flash kernel, both backends


@pytest.mark.parametrize("backend", ["hf", "unsloth"])
def test_embedding_learning_rate_on_cuda(backend, tmp_path, tiny_model):
    """The text example (embeddings and LM head trained in full at their own rate) on each backend: the optimizer
    the Trainer saved holds them in a group of their own, at train.embedding_learning_rate."""
    from job import statefile

    result = run(str(ROOT / "jobspecs" / "examples" / "text.json"), "--output-dir", str(tmp_path / "runs"),
                 "--set", f"model.base={tiny_model}", "--set", f"train.backend={backend}", "--set", "train.max_steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    optimizer = statefile.load(tmp_path / "runs" / "example_text" / "checkpoints" / "checkpoint-4" / "optimizer.pt")
    rates = sorted((g["initial_lr"], len(g["params"])) for g in optimizer["param_groups"])
    assert rates[0] == (5e-5, 2) and {rate for rate, _ in rates[1:]} == {5e-4}


@pytest.mark.parametrize("backend", ["hf", "unsloth"])
def test_a_4bit_base_dequantized_once_trains_the_same_loss_curve(backend, make_spec, tmp_path):
    """QLoRA with the base dequantized once (the planner's choice on a roomy card) against the base kept in 4-bit
    (PEFTOPT_DEQUANTIZE_BASE=0): the same losses step by step, within bf16 noise."""
    curves = {}
    for dequantize in ("1", "0"):
        spec = make_spec(f"deq{dequantize}-{backend}", model={"load_in_4bit": True, "dtype": "bfloat16"},
                         train={"backend": backend, "max_steps": 12, "logging_steps": 1, "learning_rate": 1e-3})
        result = run_cli("run", str(spec), timeout=1200, env={"PEFTOPT_DEQUANTIZE_BASE": dequantize})
        assert result.returncode == 0, result.stderr[-3000:]
        train = json.loads((tmp_path / "runs" / f"deq{dequantize}-{backend}" / "metrics.json").read_text())["train"]
        assert train["base_weights"] == ("nf4, dequantized once to 16-bit" if dequantize == "1"
                                         else "nf4, dequantized at every step")
        curves[dequantize] = [point["loss"] for point in train["loss_curve"]]
    assert len(curves["1"]) == len(curves["0"]) == 12
    assert all(abs(a - b) <= 0.02 * abs(b) for a, b in zip(curves["1"], curves["0"])), curves


def test_auto_picks_unsloth_on_cuda(make_spec, tmp_path):
    spec = make_spec("auto", train={"backend": "auto", "max_steps": 2})
    result = run(str(spec))
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = [json.loads(line) for line in result.stdout.splitlines() if '"backend_chosen"' in line][0]
    assert chosen["backend"] == "unsloth" and "CUDA" in chosen["why"]


def test_sigterm_resume_on_cuda(make_spec, tmp_path):
    import torch
    from safetensors.torch import load_file

    settings = {"backend": "unsloth", "max_steps": 30, "save_steps": 10}
    straight = make_spec("straight", train=settings)
    assert run(str(straight)).returncode == 0
    stopped = make_spec("stopped", train=settings)
    proc = subprocess.Popen([sys.executable, "-m", "job", "run", str(stopped)], stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, "PEFTOPT_LOG_FORMAT": "json"})
    sent = False
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "train_progress" and event["step"] >= 5 and not sent:
            proc.send_signal(signal.SIGTERM)
            sent = True
    assert proc.wait(timeout=300) == 75, proc.stderr.read()[-2000:]
    assert run(str(stopped)).returncode == 0
    want = load_file(str(tmp_path / "runs" / "straight" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "runs" / "stopped" / "adapter" / "adapter_model.safetensors"))
    for key in want:
        # CUDA kernels are not bit-deterministic; the resumed run must still land on the same weights.
        assert torch.allclose(want[key].float(), got[key].float(), atol=2e-3, rtol=1e-2), key


def test_merge_from_a_prequantized_4bit_base(make_spec, tmp_path, tiny_model):
    sys.path.insert(0, str(ROOT / "bench"))  # the GPU measurement scripts' model builders
    import gpu_models

    prequantized = gpu_models.make_prequantized(tiny_model, tmp_path / "tiny-bnb-4bit")
    assert "quantization_config" in json.loads((prequantized / "config.json").read_text())
    spec = make_spec("from4bit", model={"base": str(prequantized), "load_in_4bit": True},
                     train={"backend": "hf", "max_steps": 4}, export={"merge": True})
    result = run(str(spec))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "from4bit"
    merged_config = json.loads((run_dir / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["merge"]["merged_into"] == "dequantized-4bit"


def test_varlen_attention_gives_sdpa_block_mask_loss_and_gradients():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from job.backends import attention

    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096)
    assert attention.hf_path("cuda", torch.bfloat16, config)[0] == "varlen"
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    lengths = [700, 37, 1200, 95, 2]
    ids = torch.randint(0, 1000, (1, sum(lengths)), device="cuda")
    positions = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    results = {}
    for implementation in ("sdpa", attention.register()):
        model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
        model.load_state_dict(reference.state_dict())
        model.set_attn_implementation(implementation)
        loss = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss
        loss.backward()
        results[implementation] = (loss.item(), {n: p.grad.float() for n, p in model.named_parameters()})
    (loss_sdpa, grads_sdpa), (loss_varlen, grads_varlen) = results["sdpa"], results[attention.NAME]
    assert abs(loss_sdpa - loss_varlen) < 1e-2 * abs(loss_sdpa)
    for name, grad in grads_sdpa.items():
        error = (grads_varlen[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert error < 3e-2, (name, float(error))  # bf16 noise; a wrong mask gives errors near 1


def test_varlen_attention_on_a_padded_batch_gives_sdpas_loss_and_gradients():
    """The preference trainers' right-padded chosen/rejected batches, unpadded onto the varlen kernel."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from job.backends import attention

    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    lengths = [700, 37, 1200, 95]
    ids = torch.randint(0, 1000, (len(lengths), max(lengths)), device="cuda")
    mask = torch.stack([torch.arange(max(lengths), device="cuda") < n for n in lengths]).long()
    labels = ids.masked_fill(mask == 0, -100)
    results = {}
    for implementation in ("sdpa", attention.register()):
        model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
        model.load_state_dict(reference.state_dict())
        model.set_attn_implementation(implementation)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        results[implementation] = (loss.item(), {n: p.grad.float() for n, p in model.named_parameters()})
    (loss_sdpa, grads_sdpa), (loss_varlen, grads_varlen) = results["sdpa"], results[attention.NAME]
    assert abs(loss_sdpa - loss_varlen) < 1e-2 * abs(loss_sdpa)
    for name, grad in grads_sdpa.items():
        error = (grads_varlen[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert error < 3e-2, (name, float(error))


def test_unsloth_takes_the_varlen_kernel_for_packed_rows():
    import torch
    import unsloth  # noqa: F401
    from unsloth.utils import attention_dispatch

    from job.backends import attention

    said = attention.adapt_unsloth()
    assert said.startswith("varlen flash"), said
    assert attention.adapt_unsloth() == said  # a second call changes nothing
    q = torch.randn(1, 32, 256, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
    assert attention_dispatch._torch_varlen_takes(q, kv, kv, {}, True, None)


def test_unsloth_takes_a_packed_rows_lengths_from_the_host_same_loss_and_gradients_without_a_sync(make_spec,
                                                                                                 tiny_model):
    """unsloth.lengths_from_host: the segment lengths read from the CPU positions, given to unsloth on the CPU, give the
    loss and gradients unsloth's own inference from the GPU positions gives, and the decoder's forward reads nothing
    back (torch's sync debug mode as an error)."""
    import torch

    from job import settings as settings_module
    from job.backends import attention, kernels_ahead, unsloth
    from job.specfile import load_spec

    settings = settings_module.init()
    unsloth.import_library()
    spec = load_spec(make_spec(train={"backend": "unsloth"}))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    chosen = unsloth.plan(spec, config, "cuda", settings)
    model, _, _ = unsloth.setup(spec, str(tiny_model), "cuda", chosen, settings)
    model.train()
    torch.manual_seed(0)
    ids, positions, labels = kernels_ahead._packed(96, 40, config.vocab_size, kept_mod_16=3)
    lengths = attention.segment_lengths(positions.cpu())
    assert lengths is not None and sum(lengths) == 96 and len(lengths) > 2

    def loss_and_grads(**extra):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, position_ids=positions, labels=labels, **extra).loss
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach().float(), grads

    inferred, inferred_grads = loss_and_grads()
    staged, staged_grads = loss_and_grads(packed_seq_lengths=unsloth.host_lengths(lengths))
    assert torch.allclose(inferred, staged, rtol=1e-3), (inferred, staged)
    assert inferred_grads.keys() == staged_grads.keys() and inferred_grads
    for name in inferred_grads:
        assert torch.allclose(inferred_grads[name], staged_grads[name], rtol=2e-2, atol=1e-3), name
    torch.cuda.synchronize()
    from unsloth.utils import packing

    with torch.no_grad():
        packing._PACKED_INFO_CACHE.clear()
        given = unsloth.host_lengths(lengths)
        torch.cuda.set_sync_debug_mode("error")
        try:
            model.model.model(input_ids=ids, position_ids=positions, packed_seq_lengths=given)  # the decoder
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_unsloth_reads_nothing_back_in_a_step_given_the_hosts_lengths_and_kept_count(make_spec, tiny_model):
    """unsloth.kept_labels_from_host: the fused loss's index of kept labels made from the host's count gives the loss
    and gradients of unsloth's own `nonzero`; with it and the host's lengths (their device copy for the boundary
    mask), a forward and backward make no synchronizing call (torch's sync debug mode as an error)."""
    import torch
    from transformers import AutoConfig

    from job import settings as settings_module
    from job.backends import attention, kernels_ahead, unsloth
    from job.specfile import load_spec

    settings = settings_module.init()
    unsloth.import_library()
    spec = load_spec(make_spec(train={"backend": "unsloth"}))
    config = AutoConfig.from_pretrained(tiny_model)
    model, _, _ = unsloth.setup(spec, str(tiny_model), "cuda", unsloth.plan(spec, config, "cuda", settings), settings)
    model.train()
    assert unsloth.index_from_host_count()
    unsloth._boundary_mask_takes_staged_lengths()
    torch.manual_seed(0)
    ids, positions, labels = kernels_ahead._packed(96, 40, config.vocab_size, kept_mod_16=3)
    lengths = attention.segment_lengths(positions.cpu())
    kept = unsloth.kept_count({"labels": labels.cpu(), "position_ids": positions.cpu()})
    assert kept == (int((labels[0, 1:] != -100).sum()), 96)

    def step(count):
        unsloth._KeptCount.count, unsloth._KeptCount.length = count if count else (None, None)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, position_ids=positions, labels=labels,
                     packed_seq_lengths=unsloth.host_lengths(lengths, ids.device)).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    counted_on_gpu, gpu_grads = step(None)
    counted_on_host, host_grads = step(kept)
    assert torch.allclose(counted_on_gpu.float(), counted_on_host.float(), rtol=1e-4), (counted_on_gpu, counted_on_host)
    assert gpu_grads.keys() == host_grads.keys() and gpu_grads
    for name in gpu_grads:  # the same rows gathered in the same order: only the backward's accumulation order differs
        assert torch.allclose(gpu_grads[name].float(), host_grads[name].float(), rtol=1e-2, atol=1e-4), name
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(kept)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_liger_kernels_give_transformers_loss_and_gradients_and_undo_restores():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    from job import settings
    from job.backends import attention, liger

    available, why = liger.availability("llama", "cuda", settings.get())
    assert available, why
    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    lengths = [700, 37, 1200, 95, 2]
    ids = torch.randint(0, 1000, (1, sum(lengths)), device="cuda")
    positions = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    original_rope = modeling_llama.apply_rotary_pos_emb
    results = {}
    for fused in (False, True):
        model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
        model.load_state_dict(reference.state_dict())
        model.set_attn_implementation(attention.register())
        if fused:
            assert set(liger.apply(model)) >= {"rope", "rms_norm", "swiglu"}
            assert modeling_llama.apply_rotary_pos_emb is not original_rope
        loss = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss
        loss.backward()
        results[fused] = (loss.item(), {n: p.grad.float() for n, p in model.named_parameters()})
    liger.undo()
    assert modeling_llama.apply_rotary_pos_emb is original_rope
    (loss_plain, grads_plain), (loss_fused, grads_fused) = results[False], results[True]
    assert abs(loss_plain - loss_fused) < 1e-2 * abs(loss_plain)
    for name, grad in grads_plain.items():
        error = (grads_fused[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert error < 3e-2, (name, float(error))


def test_a_checkpoint_snapshot_holds_the_values_of_its_step_while_training_goes_on(tmp_path):
    """HostSnapshot packs the CUDA tensors per dtype, copies each pack once and does not wait: the kernels queued
    after it (here: in-place updates behind a long matmul) must not reach the copy. The writer's two files come from
    its page-locked packs."""
    import torch
    from safetensors.torch import load_file

    from job import statefile
    from job.checkpoints import HostSnapshot, save_state, write_safetensors

    torch.manual_seed(0)
    tree = {"adapter": {"a.lora_A": torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16),
                        "a.lora_B": torch.randn(2048, 16, device="cuda", dtype=torch.bfloat16).t()},  # not contiguous
            "optimizer": {"state": {0: {"step": 7, "state1": torch.randint(0, 255, (4096,), dtype=torch.uint8,
                                                                           device="cuda"),
                                        "absmax1": torch.rand(16, device="cuda"), "scalar": torch.tensor(3.0).cuda()}},
                          "param_groups": [{"lr": 1e-4, "params": [0]}], "cpu": torch.arange(4)}}
    expected = {"a.lora_A": tree["adapter"]["a.lora_A"].cpu(), "a.lora_B": tree["adapter"]["a.lora_B"].cpu(),
                "state1": tree["optimizer"]["state"][0]["state1"].cpu(),
                "absmax1": tree["optimizer"]["state"][0]["absmax1"].cpu()}
    big = torch.randn(8192, 8192, device="cuda")
    snapshot = HostSnapshot(tree)
    for _ in range(3):
        big = big @ big  # keeps the queue busy, so the updates below run after take() starts waiting
    for tensor in (*tree["adapter"].values(), tree["optimizer"]["state"][0]["absmax1"]):
        tensor.add_(1)
    tree["optimizer"]["state"][0]["state1"].add_(1)
    tree["optimizer"]["cpu"].add_(1)
    taken = snapshot.take()
    torch.cuda.synchronize()
    assert torch.equal(taken["adapter"]["a.lora_A"], expected["a.lora_A"])
    assert torch.equal(taken["adapter"]["a.lora_B"], expected["a.lora_B"])
    assert taken["adapter"]["a.lora_B"].shape == (16, 2048) and taken["adapter"]["a.lora_B"].device.type == "cpu"
    state = taken["optimizer"]["state"][0]
    assert torch.equal(state["state1"], expected["state1"]) and torch.equal(state["absmax1"], expected["absmax1"])
    assert state["scalar"].shape == () and state["scalar"].item() == 3.0 and state["step"] == 7
    assert torch.equal(taken["optimizer"]["cpu"], torch.arange(4))
    assert taken["optimizer"]["param_groups"] == [{"lr": 1e-4, "params": [0]}]
    # the job's way: views into one pack per dtype (checkpoints.write_safetensors writes them; safetensors' own
    # writer refuses tensors that share a storage); with own_storage each has its own, as `.to("cpu")` made them
    assert taken["adapter"]["a.lora_A"].untyped_storage().data_ptr() == \
        taken["adapter"]["a.lora_B"].untyped_storage().data_ptr()
    own = HostSnapshot(tree, own_storage=True).take()
    assert torch.equal(own["adapter"]["a.lora_A"], tree["adapter"]["a.lora_A"].cpu())
    assert own["adapter"]["a.lora_A"].untyped_storage().data_ptr() != \
        own["adapter"]["a.lora_B"].untyped_storage().data_ptr()
    # the writer's files from the page-locked packs: the adapter's safetensors and the optimizer's packed state
    adapter, optimizer = HostSnapshot(tree["adapter"]), HostSnapshot(tree["optimizer"])
    write_safetensors(adapter, tmp_path / "adapter_model.safetensors")
    save_state(optimizer, tmp_path / "optimizer.pt")
    written = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(torch.equal(written[k], v.cpu()) for k, v in tree["adapter"].items())
    state = statefile.load(tmp_path / "optimizer.pt")
    assert torch.equal(state["state"][0]["state1"], tree["optimizer"]["state"][0]["state1"].cpu())
    assert state["state"][0]["scalar"].item() == 3.0 and state["state"][0]["step"] == 7
    assert torch.equal(state["cpu"], tree["optimizer"]["cpu"])


@pytest.mark.parametrize("dequantized", [False, True], ids=["linear", "dequantized-4bit-base"])
def test_fused_lora_layers_give_pefts_loss_and_gradients_under_bf16_autocast(tiny_model, dequantized):
    """The hf backend's fused LoRA layers on CUDA as the Trainer runs them: a bf16 base (plain, or dequantize.py's
    layers), float32 adapters, autocast."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from job.backends import fused_lora

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.bfloat16).cuda()
    if dequantized:
        from job.backends.dequantize import _dequantized_linear_class

        linear_class = _dequantized_linear_class()
        for parent in list(base.model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    layer = linear_class(child.in_features, child.out_features, bias=False, device="cuda",
                                         dtype=torch.bfloat16)
                    layer.weight = torch.nn.Parameter(child.weight.detach(), requires_grad=False)
                    setattr(parent, name, layer)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    fused = copy.deepcopy(model)
    count, total = fused_lora.apply(fused)
    assert count == total > 0
    ids = torch.randint(3, 200, (4, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    results = []
    for m in (model, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad.dtype == p.dtype for p in m.parameters() if p.requires_grad)
        results.append((loss.item(), {n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad}))
    (loss, grads), (fused_loss, fused_grads) = results
    assert abs(fused_loss - loss) / loss < 1e-2
    for name, grad in grads.items():
        cos = torch.nn.functional.cosine_similarity(grad.flatten(), fused_grads[name].flatten(), dim=0)
        assert cos > 0.99, (name, cos.item())
