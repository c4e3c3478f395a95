"""job.statefile: the optimizer state a checkpoint holds, its tensors packed and its structure as JSON. A real
optimizer's state goes out and comes back exactly (keys by int, tuples, scalars and tensors with their dtypes); the
plain state dict of earlier checkpoints still loads; a hostile file is a ValueError, never a read outside its pack."""
import io
import json
import math
import zipfile

import numpy as np
import pytest
import torch

from job import statefile
from job.checkpoints import HostSnapshot, load_problem, save_state


def trained_adamw(steps: int = 3) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4, bias=False))
    optimizer = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-2},
                                   {"params": model[1].parameters(), "lr": 5e-3, "betas": (0.8, 0.95)}],
                                  weight_decay=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
    return model, optimizer


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(
            type(k) is type(kb) for k, kb in zip(a, b)) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def test_a_real_optimizers_state_comes_back_exactly_and_training_goes_on_as_before(tmp_path):
    model, optimizer = trained_adamw()
    state = optimizer.state_dict()
    save_state(HostSnapshot(state), tmp_path / "optimizer.pt")
    loaded = statefile.load(tmp_path / "optimizer.pt")
    assert same(state, loaded)
    names = [n for n in zipfile.ZipFile(tmp_path / "optimizer.pt").namelist() if "/data/" in n]
    assert len(names) == 1  # one float32 pack for the 16 state tensors (the steps are float32 scalars too)

    twin_model, twin = trained_adamw(steps=0)
    twin_model.load_state_dict(model.state_dict())
    twin.load_state_dict(loaded)
    batch = torch.randn(4, 8)
    for net, opt in ((model, optimizer), (twin_model, twin)):
        opt.zero_grad()
        net(batch).square().mean().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters()))


def test_every_scalar_and_container_the_json_carries_keeps_its_type(tmp_path):
    tree = {"state": {0: {"step": 7, "state1": torch.randint(0, 255, (3, 5), dtype=torch.uint8),
                          "absmax1": torch.rand(2), "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
                          "empty": torch.zeros(0, 4)}},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False, "foreach": None,
                              "name": "default", "params": [0], "huge": 2 ** 70, "nan": float("nan"),
                              "inf": float("-inf")}],
            (1, "tuple key"): [], "nested": [(1, [2.0, (None,)])]}
    save_state(HostSnapshot(tree), tmp_path / "optimizer.pt")
    assert same(tree, statefile.load(tmp_path / "optimizer.pt"))


def test_a_value_the_json_cannot_carry_falls_back_to_the_plain_state_dict(tmp_path):
    tree = {"state": {0: {"step": np.int64(3), "exp_avg": torch.ones(2)}}, "param_groups": [{"params": [0]}]}
    save_state(HostSnapshot(tree), tmp_path / "optimizer.pt")
    plain = torch.load(tmp_path / "optimizer.pt", weights_only=False)  # our own file: the plain dict
    assert "format" not in plain and same(tree["state"][0]["exp_avg"], plain["state"][0]["exp_avg"])


def test_an_earlier_checkpoints_plain_state_dict_loads_as_it_is(tmp_path):
    _, optimizer = trained_adamw()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    assert same(optimizer.state_dict(), statefile.load(tmp_path / "optimizer.pt"))


def packed_file(path, tree, packs) -> None:
    torch.save({"format": statefile.FORMAT, "tree": tree if isinstance(tree, str) else json.dumps(tree),
                "packs": packs}, path)


@pytest.mark.parametrize("tree, packs, says", [
    (["t", 0, 6, [3]], [torch.zeros(8)], "reaches outside pack 0"),
    (["t", 0, 0, [2 ** 40, 2 ** 40]], [torch.zeros(8)], "reaches outside pack 0"),
    (["t", 0, -1, [1]], [torch.zeros(8)], "reaches outside"),
    (["t", 1, 0, [1]], [torch.zeros(8)], "pack 1, of 1"),
    (["t", 0, 0, [-1, -2]], [torch.zeros(8)], "not a list of sizes"),
    (["t", True, 0, [1]], [torch.zeros(8)], "pack True"),
    (["x", []], [], "not a value of this format"),
    (["d", [[["l", []], 1]]], [], "key is a dict, list or tensor"),
    (["d", [[1]]], [], "[key, value] pairs"),
    ("[" * 100_000 + "]" * 100_000, [], "nested too deep"),
    (["l", []], [torch.zeros(2, 2)], "flat packs"),
])
def test_a_hostile_packed_file_is_a_value_error_naming_what_is_wrong(tree, packs, says, tmp_path):
    packed_file(tmp_path / "optimizer.pt", tree, packs)
    with pytest.raises(ValueError, match=says.replace("[", r"\[")):
        statefile.load(tmp_path / "optimizer.pt")


def test_a_tensor_views_only_its_own_elements(tmp_path):
    pack = torch.arange(10, dtype=torch.float32)
    packed_file(tmp_path / "optimizer.pt", ["l", [["t", 0, 2, [2, 2]], ["t", 0, 9, [1]]]], [pack])
    first, last = statefile.load(tmp_path / "optimizer.pt")
    assert torch.equal(first, torch.tensor([[2.0, 3.0], [4.0, 5.0]])) and torch.equal(last, torch.tensor([9.0]))


def test_a_checkpoint_whose_optimizer_file_is_hostile_is_refused_with_the_reason(tmp_path):
    """load_problem (what decides to resume from a checkpoint) loads the optimizer state as the resume does."""
    from safetensors.torch import save_file

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    save_file({"a.lora_A.weight": torch.zeros(2, 2)}, str(checkpoint / "adapter_model.safetensors"))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": []}))
    save_state(HostSnapshot(trained_adamw()[1].state_dict()), checkpoint / "optimizer.pt")
    assert load_problem(checkpoint) is None
    packed_file(checkpoint / "optimizer.pt", ["t", 0, 4, [8]], [torch.zeros(8)])
    assert "reaches outside pack 0" in load_problem(checkpoint)


def test_the_pickle_holds_a_string_and_the_packs_not_a_record_per_tensor():
    """What the writer thread pickles under the interpreter lock: t1's 8-bit state shape, 30 parameters."""
    qmap = torch.rand(256)
    state = {"state": {i: {"step": 7, "state1": torch.zeros(16, 64, dtype=torch.uint8),
                           "state2": torch.zeros(64, 16, dtype=torch.uint8), "absmax1": torch.rand(4),
                           "absmax2": torch.rand(4), "qmap1": qmap, "qmap2": qmap} for i in range(30)},
             "param_groups": [{"lr": 1e-4, "params": list(range(30))}]}
    buffer = io.BytesIO()
    snapshot = HostSnapshot(state)
    statefile.save(buffer, statefile.encode(snapshot.skeleton, snapshot.where), snapshot.packs())
    pickled = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    assert len([n for n in pickled.namelist() if "/data/" in n]) == 2  # a uint8 and a float32 pack
    data = next(n for n in pickled.namelist() if n.endswith("data.pkl"))
    assert pickled.read(data).count(b"_rebuild_tensor") == 1  # torch names its rebuild function once per pickle
