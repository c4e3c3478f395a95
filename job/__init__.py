"""peftopt: one JSON jobspec in, a fine-tuned LoRA adapter, merged model and verified GGUF out."""

__version__ = "0.1.0"
