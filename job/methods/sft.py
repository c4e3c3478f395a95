"""Supervised fine-tuning: trl's SFTTrainer on conversations (and alpaca, prompt/completion and text rows, all read
as conversations by prepare), packed, the loss on the assistant's tokens."""
from job.methods import Method

METHOD = Method(
    name="sft",
    doc="supervised: the assistant's turns of conversations",
    family="chat",
    trainer="trl:SFTTrainer:SFTConfig",
    config=lambda train: {"packing": train.packing, "dataset_num_proc": None},
    backends=("unsloth", "hf"),
)
