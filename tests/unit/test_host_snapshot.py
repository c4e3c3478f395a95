"""job.checkpoints.HostSnapshot on the CPU: the structure comes back with copies taken when the snapshot was made,
each tensor with a storage of its own or as a view into its pack (the CUDA path, packed copies and an event, is
tests/gpu/test_gpu.py's)."""
import io
import zipfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from job.checkpoints import HostSnapshot, write_safetensors


def test_a_snapshot_keeps_the_structure_and_the_values_it_was_taken_with():
    weights = torch.randn(3, 4, dtype=torch.bfloat16)
    tree = {"adapter": {"w": weights, "t": weights.t()}, "optimizer": {"state": {0: {"step": torch.tensor(5.0),
                                                                                     "exp_avg": torch.zeros(4)}},
                                                                       "param_groups": [{"lr": 0.1, "params": (0,)}]}}
    before = weights.clone()
    snapshot = HostSnapshot(tree, own_storage=True)
    weights.add_(1)
    tree["optimizer"]["state"][0]["exp_avg"].add_(1)
    taken = snapshot.take()
    assert snapshot.event is None  # nothing on a GPU: nothing to wait for
    assert torch.equal(taken["adapter"]["w"], before) and torch.equal(taken["adapter"]["t"], before.t())
    assert torch.equal(taken["optimizer"]["state"][0]["exp_avg"], torch.zeros(4))
    assert taken["optimizer"]["state"][0]["step"].item() == 5.0
    assert taken["optimizer"]["param_groups"] == [{"lr": 0.1, "params": (0,)}]
    storages = {t.untyped_storage().data_ptr() for t in (taken["adapter"]["w"], taken["adapter"]["t"])}
    assert len(storages) == 2  # each its own


def test_a_tensor_alone_in_its_dtype_is_copied_too():
    """A pack of one tensor: flattening one tensor gives a view of it, which the snapshot must not keep."""
    alone, pair = torch.randn(3, 2, requires_grad=True), [torch.randn(2, dtype=torch.bfloat16) for _ in range(2)]
    before = alone.detach().clone()
    snapshot = HostSnapshot({"alone": alone, "pair": pair}, own_storage=False)
    with torch.no_grad():
        alone.add_(1)
    taken = snapshot.take()
    assert torch.equal(taken["alone"], before) and not taken["alone"].requires_grad
    assert all(torch.equal(a, b) for a, b in zip(taken["pair"], pair))


def test_views_into_the_packs_save_and_load_as_the_tensors_do_in_a_few_records():
    """An 8-bit optimizer state's shape: per parameter two uint8 states, two float32 absmax vectors, a shared map
    and a step; without storages of their own torch.save writes one record per pack, and torch.load gives back
    the same values, shapes and dtypes (what the Trainer's resume reads)."""
    generator = torch.Generator().manual_seed(0)
    qmap = torch.rand(256, generator=generator)
    state = {index: {"step": 7, "state1": torch.randint(0, 255, (16, 64), dtype=torch.uint8, generator=generator),
                     "state2": torch.randint(0, 255, (64, 16), dtype=torch.uint8, generator=generator),
                     "absmax1": torch.rand(4, generator=generator), "absmax2": torch.rand(4, generator=generator),
                     "qmap1": qmap, "qmap2": qmap} for index in range(30)}
    tree = {"state": state, "param_groups": [{"lr": 1e-4, "params": list(range(30))}]}
    taken = HostSnapshot(tree, own_storage=False).take()
    assert len({t.untyped_storage().data_ptr() for s in taken["state"].values() for t in s.values()
                if isinstance(t, torch.Tensor)}) == 2  # a uint8 pack and a float32 pack

    def saved(value) -> bytes:
        buffer = io.BytesIO()
        torch.save(value, buffer)
        return buffer.getvalue()

    packed, own = saved(taken), saved(HostSnapshot(tree, own_storage=True).take())
    def records(data: bytes) -> list[str]:
        return [name for name in zipfile.ZipFile(io.BytesIO(data)).namelist() if "/data/" in name]

    assert len(records(packed)) == 2 and len(records(own)) == 30 * 6
    loaded = torch.load(io.BytesIO(packed), weights_only=True)
    assert loaded["param_groups"] == tree["param_groups"]
    for index, entry in state.items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                back = loaded["state"][index][key]
                assert back.dtype == value.dtype and back.shape == value.shape and torch.equal(back, value)
            else:
                assert loaded["state"][index][key] == value


def test_the_trainer_state_taken_at_a_save_is_written_as_the_trainer_writes_it_and_does_not_move_on():
    import dataclasses
    import json

    from transformers import TrainerState

    from job.checkpoints import _state_now

    state = TrainerState(global_step=20, max_steps=600)
    state.log_history = [{"loss": 1.0 / (i + 1), "step": i + 1} for i in range(20)]
    state.stateful_callbacks = {"TrainerControl": {"args": {"should_save": True}, "attributes": {}}}
    expected = json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True)
    taken = _state_now(state)
    state.log_history.append({"loss": 0.01, "step": 21})
    state.log_history[0]["loss"] = 9.0
    state.stateful_callbacks["TrainerControl"]["args"]["should_save"] = False
    state.global_step = 21
    assert json.dumps(taken, indent=2, sort_keys=True) == expected


def test_an_adapter_of_views_into_its_packs_is_written_as_a_safetensors_file_its_readers_load(tmp_path):
    """The adapter's tensors in HostSnapshot's packs (one per dtype), each pack written whole, without
    safetensors' own writer: safetensors loads the same names, dtypes, shapes, values and metadata."""
    generator = torch.Generator().manual_seed(1)
    adapter = {f"base_model.model.layers.{i}.{name}.lora_{ab}.weight":
               torch.randn(*(shape if ab == "A" else shape[::-1]), generator=generator).to(dtype)
               for i in range(3) for name, shape, dtype in (("q_proj", (16, 64), torch.float32),
                                                            ("down_proj", (16, 96), torch.bfloat16))
               for ab in "AB"}
    adapter["base_model.model.lm_head.modules_to_save.bias"] = torch.arange(5, dtype=torch.float16)
    snapshot = HostSnapshot(adapter, own_storage=False)
    assert len(snapshot.packs()) == 3  # float32, bfloat16, float16
    path = tmp_path / "adapter_model.safetensors"
    write_safetensors(snapshot, path, metadata={"format": "pt"})
    loaded = load_file(str(path))
    assert loaded.keys() == adapter.keys()
    for name, tensor in adapter.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(str(path), framework="pt") as opened:
        assert opened.metadata() == {"format": "pt"}
    assert path.stat().st_size == 8 + int.from_bytes(path.read_bytes()[:8], "little") + sum(
        t.numel() * t.element_size() for t in adapter.values())


def test_an_adapter_of_a_dtype_outside_the_packed_writers_table_is_written_by_safetensors_own_writer(tmp_path):
    adapter = {"a.lora_A.weight": torch.randn(2, 3), "phase": torch.randn(2, dtype=torch.complex64)}
    write_safetensors(HostSnapshot(adapter), tmp_path / "adapter_model.safetensors")
    loaded = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert loaded.keys() == adapter.keys() and all(torch.equal(loaded[k], v) for k, v in adapter.items())
