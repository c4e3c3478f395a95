"""Runs llama.cpp's convert_hf_to_gguf.py from a pinned prefix, with two changes:

- no code a model names ever runs: every `from_pretrained` the converter calls gets trust_remote_code=False
  (it asks for True when it loads the tokenizer of several architectures), so a config or tokenizer that
  names custom code (`auto_map`) fails the conversion instead of running it;
- when the converter does not know a BPE tokenizer's pre-tokenizer hash (a tokenizer made locally, as in the
  tests), it uses the name given (the jobspec's export.tokenizer_pre) instead of refusing.

    python -I job/convert_shim.py PREFIX PRE_TOKENIZER_OR_EMPTY MODEL_DIR --outfile out.gguf --outtype f16
"""
import functools
import os
import runpy
import sys

prefix = sys.argv.pop(1)
override = sys.argv.pop(1)
sys.path[:0] = [prefix, os.path.join(prefix, "gguf-py")]

import transformers  # noqa: E402


def _without_remote_code(original):
    @functools.wraps(original)
    def from_pretrained(*args, **kwargs):
        kwargs["trust_remote_code"] = False
        return original(*args, **kwargs)
    return from_pretrained


for name in ("AutoConfig", "AutoTokenizer", "AutoModel", "AutoModelForCausalLM"):
    auto = getattr(transformers, name)
    auto.from_pretrained = _without_remote_code(auto.from_pretrained)

if override:
    import conversion.base as base

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return override

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv[0] = os.path.join(prefix, "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")
