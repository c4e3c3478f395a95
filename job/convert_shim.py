"""Runs llama.cpp's convert_hf_to_gguf.py from a pinned prefix, with one change: when the converter does
not know a BPE tokenizer's pre-tokenizer hash (a tokenizer made locally, as in the tests), it uses the
name in $PEFTOPT_TOKENIZER_PRE (the jobspec's export.tokenizer_pre) instead of refusing.

    python job/convert_shim.py PREFIX MODEL_DIR --outfile out.gguf --outtype f16
"""
import os
import runpy
import sys

prefix = sys.argv.pop(1)
sys.path[:0] = [prefix, os.path.join(prefix, "gguf-py")]
override = os.environ.get("PEFTOPT_TOKENIZER_PRE")
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
