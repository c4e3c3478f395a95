"""unsloth.lengths_from_host on trl's real SFTTrainer (CPU, packed padding-free rows as the job trains them): the
collator reads each row's segment lengths on the CPU, they ride through the trainer's data loader (accelerate's
device placement included) as plain numbers, and `_prepare_inputs` hands the model `packed_seq_lengths`, a CPU
int32 tensor of the segments its `position_ids` mark. unsloth itself (GPU only) takes them in
tests/gpu/test_gpu.py."""
import datasets
import torch
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from job.backends import attention, unsloth
from job.backends.trainer import install_cpu_loss_head


def test_a_packed_rows_lengths_reach_the_model_as_a_cpu_tensor_of_its_segments(tiny_model, tmp_path):
    install_cpu_loss_head()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"input_ids": [(i * 7 + j) % 90 + 5 for j in range(10 + i % 7)]} for i in range(24)]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, packing=True,
                     padding_free=True, pad_to_multiple_of=16, max_length=48, use_cpu=True, report_to=[],
                     save_strategy="no", disable_tqdm=True, seed=3)
    trainer = SFTTrainer(model=str(tiny_model), args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer)
    unsloth.lengths_from_host(trainer)
    given = []
    forward = trainer.model.forward

    def seen(*a, **kw):
        given.append((kw.get("packed_seq_lengths"), kw["position_ids"]))
        return forward(*a, **kw)

    batch = next(iter(trainer.get_train_dataloader()))
    assert isinstance(batch[unsloth.LENGTHS_KEY], (tuple, list))  # plain numbers: left alone by device placement
    prepared = trainer._prepare_inputs(batch)
    assert unsloth.LENGTHS_KEY not in prepared
    lengths = prepared["packed_seq_lengths"]
    assert lengths.device.type == "cpu" and lengths.dtype == torch.int32
    assert tuple(lengths.tolist()) == attention.segment_lengths(prepared["position_ids"])
    assert int(lengths.sum()) == prepared["input_ids"].shape[1] and len(lengths) > 1

    trainer.model.forward = seen
    trainer.train()  # the model takes the extra argument through trl's loss as it is
    assert len(given) == 2
    for lengths, positions in given:
        assert tuple(lengths.tolist()) == attention.segment_lengths(positions.cpu())
