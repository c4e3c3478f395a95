"""trainer.flops_counted_once on a real Trainer (CPU): the FLOP count the Trainer keeps (`total_flos`) is the
same as its own counting gives, with the model's parameters counted once instead of after every micro-batch."""
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from job.backends.trainer import flops_counted_once


def collate(rows):
    ids = torch.tensor([row["input_ids"] for row in rows])
    return {"input_ids": ids, "labels": ids.clone()}


def trained(tiny_model, tmp_path, once: bool):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    counts = []
    count = model.num_parameters

    def counting(*args, **kwargs):
        counts.append(kwargs)
        return count(*args, **kwargs)

    model.num_parameters = counting
    rows = [{"input_ids": [(i * 7 + j) % 100 + 3 for j in range(8 + i % 5)]} for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, use_cpu=True, save_strategy="no", report_to=[],
                             disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    if once:
        flops_counted_once(trainer)
    trainer.train()
    return trainer.state.total_flos, [kw for kw in counts if kw.get("exclude_embeddings")]


def test_the_flop_count_is_the_trainers_own_with_the_parameters_counted_once(tiny_model, tmp_path):
    own_flos, own_counts = trained(tiny_model, tmp_path / "own", once=False)
    flos, counts = trained(tiny_model, tmp_path / "once", once=True)
    assert len(own_counts) == 8  # the Trainer's own: after each of 4 x 2 micro-batches
    assert len(counts) == 1
    assert flos == own_flos > 0


def test_a_trainer_that_counts_its_own_way_is_left_alone(tiny_model, tmp_path):
    class Counting(Trainer):
        def floating_point_ops(self, inputs):
            return 1

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, use_cpu=True, report_to=[])
    trainer = Counting(model=model, args=args, train_dataset=[], data_collator=collate)
    flops_counted_once(trainer)
    assert "floating_point_ops" not in vars(trainer)
