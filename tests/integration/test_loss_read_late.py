"""trainer.LossReadAStepLate on trl's real SFTTrainer (CPU): each step's loss is logged at the end of the next step,
not read back at its own, and the log history, trl's per-step metrics, the train loss and the checkpoints' own log
history are the same as the Trainer's own logging gives."""
import json
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from job.backends.trainer import LossReadAStepLate, install_cpu_loss_head


class WhenLogged(TrainerCallback):
    """(the logged step, how many steps had ended when it was logged) for every log entry with a loss."""

    def __init__(self):
        self.ended, self.entries = 0, []

    def on_step_end(self, args, state, control, **kwargs):
        self.ended += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.entries.append((state.global_step, self.ended))


def trained(tiny_model, out, late: bool):
    install_cpu_loss_head()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"input_ids": [(i * 7 + j) % 90 + 5 for j in range(10 + i % 7)]} for i in range(40)]
    args = SFTConfig(output_dir=str(out), max_steps=7, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     logging_steps=1, save_steps=3, save_strategy="steps", use_cpu=True, report_to=[], seed=5,
                     data_seed=5, disable_tqdm=True, max_length=64, learning_rate=1e-3, logging_nan_inf_filter=False)
    callback = WhenLogged()
    trainer = SFTTrainer(model=str(tiny_model), args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[callback])
    if late:
        LossReadAStepLate(trainer)
    result = trainer.train()
    return trainer, result, callback.entries


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("late")
    return {late: trained(tiny_model, out / str(late), late) for late in (False, True)}


def test_each_step_is_logged_a_step_late_except_where_it_saves_or_ends(runs):
    _, _, entries = runs[True]
    assert [step for step, _ in entries] == [1, 2, 3, 4, 5, 6, 7]
    # saves at 3 and 6, the end at 7: logged as they end; the others when the next step has ended
    assert entries == [(1, 2), (2, 3), (3, 3), (4, 5), (5, 6), (6, 6), (7, 7)]
    _, _, own = runs[False]
    assert own == [(step, step) for step in range(1, 8)]


def test_the_log_history_and_train_loss_are_the_trainers_own(runs):
    own_trainer, own_result, _ = runs[False]
    trainer, result, _ = runs[True]
    own = [h for h in own_trainer.state.log_history if "loss" in h]
    late = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in late] == list(range(1, 8))
    assert set(late[0]) == set(own[0]) >= {"loss", "grad_norm", "learning_rate", "epoch", "step", "num_tokens",
                                           "entropy", "mean_token_accuracy"}
    for mine, theirs in zip(late, own):
        assert mine == pytest.approx(theirs, rel=1e-5), mine["step"]
    assert result.training_loss == pytest.approx(own_result.training_loss, rel=1e-6)
    assert trainer.state.total_flos == own_trainer.state.total_flos


def test_a_checkpoint_holds_the_log_of_its_own_step(runs):
    trainer, _, _ = runs[True]
    for step in (3, 6):
        state = json.loads(Path(trainer.args.output_dir, f"checkpoint-{step}", "trainer_state.json").read_text())
        assert [h["step"] for h in state["log_history"] if "loss" in h] == list(range(1, step + 1))
