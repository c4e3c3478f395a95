"""llama.cpp: how many threads it gets (physical cores, capped by a container's CPU quota), and q8_0 made from a
bf16 master the same as the converter's own."""
import os

import pytest

from job import llamacpp


def test_cgroup_quota_is_read_and_rounded_up(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    for text, want in (("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000\n", 1),
                       ("max 100000\n", None), ("garbage\n", None)):
        cpu_max.write_text(text)
        assert llamacpp.cgroup_cpu_quota(cpu_max) == want, text
    assert llamacpp.cgroup_cpu_quota(tmp_path / "missing") is None


def test_threads_are_physical_cores_within_the_affinity_and_the_quota(monkeypatch):
    allowed = os.sched_getaffinity(0)
    siblings = {open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read().strip() for c in allowed}
    monkeypatch.setattr(llamacpp, "cgroup_cpu_quota", lambda: None)
    assert llamacpp.physical_cores() == len(siblings) <= len(allowed)
    monkeypatch.setattr(llamacpp, "cgroup_cpu_quota", lambda: 1)
    assert llamacpp.physical_cores() == 1


@pytest.mark.integration
def test_q8_0_from_a_bf16_master_is_the_converters_own_q8_0_tensor_for_tensor(tmp_path, tiny_model):
    """The gguf stage converts to bf16 and makes q8_0 with llama-quantize on every core (gguf.plan); the
    converter's own q8_0 rounds from the same 16-bit values on one core: every tensor and metadata value must
    be the same."""
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from job.stages import gguf

    merged = tmp_path / "merged"  # what the merge stage writes: the model in bfloat16
    AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.bfloat16).save_pretrained(str(merged))
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(str(merged))
    assert gguf.plan(["q8_0"]) == ("bf16", {"q8_0": "quantize"})
    assert gguf.plan(["q8_0"], "float16") == ("f16", {"q8_0": "quantize"})
    assert gguf.plan(["f16", "q8_0", "q4_k_m"]) == ("f16", {"f16": "convert", "q8_0": "quantize", "q4_k_m": "quantize"})
    tools = llamacpp.find()
    llamacpp.convert(tools, merged, tmp_path / "direct.gguf", "q8_0", "llama-bpe")
    llamacpp.convert(tools, merged, tmp_path / "master.gguf", "bf16", "llama-bpe")
    llamacpp.quantize(tools, tmp_path / "master.gguf", tmp_path / "quantized.gguf", "q8_0")
    sys.path.insert(0, str(tools.prefix / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    direct, quantized = GGUFReader(tmp_path / "direct.gguf"), GGUFReader(tmp_path / "quantized.gguf")
    tensors = {t.name: t for t in direct.tensors}
    assert len(tensors) > 10 and {t.name for t in quantized.tensors} == set(tensors)
    for tensor in quantized.tensors:
        want = tensors[tensor.name]
        assert tensor.tensor_type == want.tensor_type, tensor.name
        assert tensor.data.tobytes() == want.data.tobytes(), tensor.name
    assert {t.tensor_type.name for t in quantized.tensors} == {"Q8_0", "F32"}

    def metadata(reader):
        return {name: [bytes(field.parts[i]) for i in field.data] for name, field in reader.fields.items()
                if not name.startswith("GGUF.")}

    assert metadata(quantized) == metadata(direct) and "general.file_type" in metadata(direct)
    assert (tmp_path / "quantized.gguf").stat().st_size == (tmp_path / "direct.gguf").stat().st_size
