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


def test_the_converters_bf16_rounding_on_every_core_gives_gguf_pys_bits(monkeypatch):
    """job/convert_shim.py rounds a bf16 output with torch; every value, the odd ones included (NaN payloads and
    signs, infinities, subnormals, ties, values that round up to infinity), gets gguf-py's own bits."""
    import sys

    import numpy as np

    sys.path.insert(0, str(llamacpp.find().prefix / "gguf-py"))
    try:
        from gguf import quants

        from job import convert_shim
        from job.convert_shim import _fast_bf16, bf16_bytes
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(0)
    special = np.array([0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001,
                        0xFFFFFFFF, 0x00000001, 0x807FFFFF, 0x00400000, 0x3F808000, 0x3F818000, 0x3F80FFFF,
                        0x7F7FFFFF, 0xFF7F8000, 0x00008000, 0x00018000], dtype=np.uint32)
    values = np.concatenate([special, rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)]).view(np.float32)
    values = np.concatenate([values, rng.standard_normal(100_000).astype(np.float32) * 0.02])
    want = quants.BF16.quantize_blocks(values.copy())
    got = bf16_bytes(values)
    assert got.dtype == np.uint8 and got.tobytes() == want.tobytes()
    monkeypatch.setattr(convert_shim, "CHUNK", 4099)  # many chunks, odd values in some, a short last one
    assert bf16_bytes(values).tobytes() == want.tobytes()
    # the converter's own call, before and after the shim hooks it in: the same bytes in the same shape
    matrix = values[: 64 * 1000].reshape(1000, 64)
    before = quants.quantize(matrix, quants.GGMLQuantizationType.BF16)
    original = quants._apply_over_grouped_rows
    try:
        _fast_bf16()
        assert quants._apply_over_grouped_rows is not original
        after = quants.quantize(matrix, quants.GGMLQuantizationType.BF16)
    finally:
        quants._apply_over_grouped_rows = original
    assert after.shape == before.shape == (1000, 128) and after.dtype == before.dtype
    assert after.tobytes() == before.tobytes() == want[: 64 * 1000 * 2].tobytes()


def test_the_converters_writer_computing_one_tensor_ahead_writes_gguf_pys_file(tmp_path, monkeypatch):
    """job/convert_shim.py has the next lazy tensor made on a background thread while the writer writes the one
    before it: the same file, byte for byte, as gguf-py's own writer, with tensors that share a lazy parent (a
    fused weight split in three, as the converter splits q/k/v) and an eager one among them."""
    import sys
    import threading

    import numpy as np

    sys.path.insert(0, str(llamacpp.find().prefix / "gguf-py"))
    try:
        import gguf
        from gguf import gguf_writer, lazy

        from job.convert_shim import _prefetching_writer
    finally:
        sys.path.pop(0)
    made_on = []

    def recorded(array):
        made_on.append(threading.current_thread().name)
        return array * 3

    def write(path):
        rng = np.random.default_rng(0)
        fused = lazy.LazyNumpyTensor.from_eager(rng.standard_normal((192, 64), dtype=np.float32))
        w = gguf.GGUFWriter(path, "llama")
        for name, part in zip("qkv", (fused[:64], fused[64:128], fused[128:])):
            w.add_tensor(f"blk.0.attn_{name}.weight", part)
        w.add_tensor("eager.weight", rng.standard_normal((8, 64), dtype=np.float32).astype(np.float16))
        base = lazy.LazyNumpyTensor.from_eager(rng.standard_normal((32, 64), dtype=np.float32))
        w.add_tensor("scaled.weight", lazy.LazyNumpyTensor(meta=base._meta, args=(base,), func=recorded).astype(np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()

    plain = write(tmp_path / "plain.gguf")
    monkeypatch.setattr(gguf_writer.GGUFWriter, "write_tensors_to_file", gguf_writer.GGUFWriter.write_tensors_to_file)
    _prefetching_writer()
    ahead = write(tmp_path / "ahead.gguf")
    assert ahead == plain and len(plain) > 192 * 64 * 4
    assert made_on[0] == "MainThread" and made_on[1].startswith("gguf-prefetch")


def test_llama_quantize_gets_every_allowed_cpu_within_the_quota(monkeypatch):
    allowed = len(os.sched_getaffinity(0))
    monkeypatch.setattr(llamacpp, "cgroup_cpu_quota", lambda: None)
    assert llamacpp.usable_cpus() == allowed
    monkeypatch.setattr(llamacpp, "cgroup_cpu_quota", lambda: 1)
    assert llamacpp.usable_cpus() == 1
    monkeypatch.setattr(llamacpp, "cgroup_cpu_quota", lambda: allowed + 8)
    assert llamacpp.usable_cpus() == allowed


@pytest.mark.integration
def test_a_converter_started_ahead_converts_when_given_its_arguments_and_an_unused_one_is_ended(tmp_path, tiny_model):
    """The gguf stage's warm_up starts the converter when the job starts (its imports then cost nothing at the
    stage's turn); given its arguments later it writes the same bytes as one started on the spot; one left unused
    is ended with the job."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = tmp_path / "merged"
    AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.bfloat16).save_pretrained(str(merged))
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(str(merged))
    tools = llamacpp.find()
    with llamacpp.converter_process(tools) as ahead:
        time.sleep(1.0)  # it imports while the job works
        assert ahead.poll() is None
        llamacpp.convert(tools, merged, tmp_path / "ahead.gguf", "bf16", "llama-bpe", process=ahead)
        assert ahead.returncode == 0
    llamacpp.convert(tools, merged, tmp_path / "on-the-spot.gguf", "bf16", "llama-bpe")
    assert (tmp_path / "ahead.gguf").read_bytes() == (tmp_path / "on-the-spot.gguf").read_bytes()
    with llamacpp.converter_process(tools) as unused:
        pass
    assert unused.poll() is not None  # ended, not left waiting


@pytest.mark.integration
def test_tools_started_while_cpus_are_held_keep_off_them_and_convert_the_same(tmp_path, tiny_model):
    """A decode loop answering ahead holds its CPU (llamacpp.cpus_held): a tool started meanwhile runs on the others,
    and the converter, started before, is moved onto them with as many torch threads when it gets its arguments;
    its file is the same."""
    import threading
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    held, rest = allowed[:1], allowed[1:]
    merged = tmp_path / "merged"
    AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.bfloat16).save_pretrained(str(merged))
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(str(merged))
    tools = llamacpp.find()
    with llamacpp.converter_process(tools) as ahead:
        with llamacpp.cpus_held(held):
            assert llamacpp.free_cpus() == rest
            sleeper = llamacpp._start(["sleep", "30"], "sleep")
            try:
                assert os.sched_getaffinity(sleeper.pid) == set(rest)
            finally:
                sleeper.kill()
                sleeper.communicate()
            seen: list[set[int]] = []
            watching = threading.Event()

            def watch():  # the converter's CPUs, as long as it lives
                while not watching.is_set():
                    try:
                        seen.append(os.sched_getaffinity(ahead.pid))
                    except OSError:
                        return
                    time.sleep(0.01)

            watcher = threading.Thread(target=watch)
            watcher.start()
            llamacpp.convert(tools, merged, tmp_path / "held.gguf", "bf16", "llama-bpe", process=ahead)
            watching.set()
            watcher.join()
        assert llamacpp.free_cpus() is None
    assert seen[0] == set(allowed) and seen[-1] == set(rest), seen  # moved once it had its arguments
    llamacpp.convert(tools, merged, tmp_path / "free.gguf", "bf16", "llama-bpe")
    assert (tmp_path / "held.gguf").read_bytes() == (tmp_path / "free.gguf").read_bytes()


def test_cores_beside_leave_this_process_its_own(monkeypatch):
    monkeypatch.setattr(llamacpp.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(llamacpp, "physical_cores", lambda: 16)
    assert llamacpp.cores_beside(1) == ([15], list(range(15)), 15)
    monkeypatch.setattr(llamacpp.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(llamacpp, "physical_cores", lambda: 4)
    assert llamacpp.cores_beside(1) is None  # too few to share: the targets take turns


def test_this_thread_on_pins_the_calling_thread_and_restores_it():
    import threading

    before = os.sched_getaffinity(0)
    first = min(before)
    other = []
    with llamacpp.this_thread_on([first]):
        assert os.sched_getaffinity(0) == {first}
        thread = threading.Thread(target=lambda: other.append(os.sched_getaffinity(0)))
        thread.start()
        thread.join()
    assert os.sched_getaffinity(0) == before


@pytest.mark.integration
def test_a_bpe_pre_tokenizer_the_converter_does_not_know_is_refused_before_training(tmp_path, make_spec):
    """The tiny model's tokenizer is a BPE one no real model has: the pinned converter would refuse it after
    training (NotImplementedError in get_vocab_base_pre). The job refuses it in prepare instead, exit 2 naming
    export.tokenizer_pre, before a training step; the converter's vocabulary pass decides, and the fast path
    (the converter's own hashes, read from its sources) is there to skip it for the tokenizers it knows."""
    from conftest import run_cli

    text, known = llamacpp._hashed_text_and_known_hashes(llamacpp.find())
    assert "🦙🦙" in text and len(known) > 50  # the pinned converter's check text and hashes, as this reads them
    spec = make_spec("new-bpe", train={"max_steps": 2}, export={"merge": True, "gguf": ["q8_0"]},
                     evaluate={"prompts": ["Say hi."], "targets": ["adapter"], "max_new_tokens": 2})
    refused = run_cli("run", spec)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.splitlines()[-1].startswith(
        "error: export.tokenizer_pre: llama.cpp's pinned converter does not know this model's BPE pre-tokenizer")
    assert "among them llama-bpe" in refused.stderr and "train_progress" not in refused.stdout
    assert not (tmp_path / "runs" / "new-bpe" / "checkpoints").exists()
