"""job.checkpoints.HostSnapshot on the CPU: the structure comes back with copies taken when the snapshot was made
(the CUDA path, packed copies and an event, is tests/gpu/test_gpu.py's)."""
import torch

from job.checkpoints import HostSnapshot


def test_a_snapshot_keeps_the_structure_and_the_values_it_was_taken_with():
    weights = torch.randn(3, 4, dtype=torch.bfloat16)
    tree = {"adapter": {"w": weights, "t": weights.t()}, "optimizer": {"state": {0: {"step": torch.tensor(5.0),
                                                                                     "exp_avg": torch.zeros(4)}},
                                                                       "param_groups": [{"lr": 0.1, "params": (0,)}]}}
    before = weights.clone()
    snapshot = HostSnapshot(tree)
    weights.add_(1)
    tree["optimizer"]["state"][0]["exp_avg"].add_(1)
    taken = snapshot.take()
    assert snapshot.event is None  # nothing on a GPU: nothing to wait for
    assert torch.equal(taken["adapter"]["w"], before) and torch.equal(taken["adapter"]["t"], before.t())
    assert torch.equal(taken["optimizer"]["state"][0]["exp_avg"], torch.zeros(4))
    assert taken["optimizer"]["state"][0]["step"].item() == 5.0
    assert taken["optimizer"]["param_groups"] == [{"lr": 0.1, "params": (0,)}]


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
