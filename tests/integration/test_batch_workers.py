"""trainer.BatchWorkers on a real Trainer with a batch worker process (CPU): when training ends, `end()` tells the
worker to leave and it does (exit code 0). Left to the cycle collector, torch's shutdown found the worker deaf (its
queue closed first), waited out its 5 s join timeout and killed it (SIGTERM), on whatever thread collected."""
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from job.backends.trainer import BatchWorkers


def collate(rows):
    ids = torch.tensor([row["input_ids"] for row in rows])
    return {"input_ids": ids, "labels": ids.clone()}


def test_the_batch_worker_leaves_when_told_once_training_ends(tiny_model, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    rows = [{"input_ids": [(i * 7 + j) % 100 + 3 for j in range(16)]} for i in range(64)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, use_cpu=True,
                             dataloader_num_workers=1, dataloader_persistent_workers=True,
                             dataloader_prefetch_factor=4, save_strategy="no", report_to=[], disable_tqdm=True,
                             remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    workers = BatchWorkers(trainer)
    trainer.train()
    assert len(workers.loaders) == 1
    processes = list(workers.loaders[0]._iterator._workers)
    assert processes and all(process.is_alive() for process in processes)  # persistent: still there after train()
    workers.end()
    assert [process.exitcode for process in processes] == [0] * len(processes)  # left on its own, not killed
    assert workers.loaders == []
    workers.end()  # a second end (a stop, then the finally) does nothing
