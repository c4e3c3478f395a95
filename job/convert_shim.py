"""Runs llama.cpp's convert_hf_to_gguf.py from a pinned prefix, with three changes:

- no code a model names ever runs: every `from_pretrained` the converter calls gets trust_remote_code=False
  (it asks for True when it loads the tokenizer of several architectures), so a config or tokenizer that
  names custom code (`auto_map`) fails the conversion instead of running it;
- when the converter does not know a BPE tokenizer's pre-tokenizer hash (a tokenizer made locally, as in the
  tests), it uses the name given (the jobspec's export.tokenizer_pre) instead of refusing;
- a bf16 output is rounded by torch on every core instead of by gguf-py's numpy on one, to the same bits:
  both round to nearest even, and the values where a CPU's conversion could differ (NaN payloads, subnormals)
  take gguf-py's own formula (tests/integration/test_llamacpp.py);
- the next tensor is computed on a background thread while the writer writes the one before it (gguf-py
  computes and writes one tensor at a time), the same bytes in the same order.

With both, a 1.2B model's bf16 conversion took 14.0 s against about 18 s for the converter's own on 2 cores
(README, llama.cpp).

The shim imports everything the converter needs (torch, transformers, gguf-py, the converter's module) before it
reads its arguments, one JSON line on stdin, so that a job can start it early and have it ready when the gguf stage
comes (8 of its 15 s on the H200 were imports); at end of input it exits. After converting it leaves at once:
tearing down the interpreter took another 2.4 s.

    echo '["PRE_TOKENIZER_OR_EMPTY", "MODEL_DIR", "--outfile", "out.gguf", "--outtype", "f16"]' |
        python -I job/convert_shim.py PREFIX
"""
import functools
import json
import os
import runpy
import sys


def _without_remote_code(original):
    @functools.wraps(original)
    def from_pretrained(*args, **kwargs):
        kwargs["trust_remote_code"] = False
        return original(*args, **kwargs)
    return from_pretrained


def _named_pre_tokenizer(override: str) -> None:
    import conversion.base as base

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return override

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


CHUNK = 1 << 20  # values per pass: a chunk's float32 and bf16 stay in cache between its passes (2x on 2 cores)


def bf16_bytes(array):
    """gguf-py's BF16 quantization of a float32 array (ggml_compute_fp32_to_bf16), as flat uint8 bytes."""
    import numpy as np
    import torch
    from gguf import quants

    values = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).reshape(-1)
    out = torch.empty(values.numel(), dtype=torch.int16)
    for start in range(0, values.numel(), CHUNK):
        chunk, bits = values[start:start + CHUNK], out[start:start + CHUNK]
        bits.copy_(chunk.to(torch.bfloat16).view(torch.int16))
        # Round to nearest even has one answer for every finite normal value. ggml keeps a NaN's sign and upper
        # payload bits where torch writes one NaN, and some CPUs' conversions treat subnormals as zero: those
        # values (and zeros and infinities, which come out with the same all-zero or all-one exponent) take
        # ggml's formula.
        exponent = bits & 0x7F80
        odd = (exponent == 0) | (exponent == 0x7F80)
        if bool(odd.any()):
            exact = quants.BF16.quantize_blocks(chunk[odd].numpy().copy())
            bits[odd] = torch.from_numpy(exact.view(np.int16).copy())
    return out.numpy().view(np.uint8)


def _fast_bf16() -> None:
    import numpy as np
    from gguf import quants

    original = quants._apply_over_grouped_rows

    def apply_over_grouped_rows(func, arr, otype, oshape):
        if getattr(func, "__self__", None) is quants.BF16 and arr.dtype == np.float32 and otype == np.uint8:
            return bf16_bytes(arr).reshape(oshape)
        return original(func, arr, otype, oshape)

    quants._apply_over_grouped_rows = apply_over_grouped_rows


class _Prefetched:
    """A lazy tensor of the writer's, made by the one background thread while the tensor before it is written.

    The thread makes the tensors one at a time in the writer's order, at most one ahead, so no two threads ever
    walk the same lazy graph (tensors split from one fused weight share nodes) and one more tensor is held.
    """

    def __init__(self, ahead: "_Ahead", index: int, nbytes: int):
        self._ahead, self._index, self.nbytes = ahead, index, nbytes

    def tofile(self, fout):
        return self._ahead.take(self._index).tofile(fout)


class _Ahead:
    def __init__(self, pool, lazies: list):
        self._pool, self._lazies, self._futures = pool, lazies, {}

    def _start(self, index: int) -> None:
        if index < len(self._lazies) and index not in self._futures:
            lazy, self._lazies[index] = self._lazies[index], None
            self._futures[index] = self._pool.submit(type(lazy).to_eager, lazy)

    def take(self, index: int):
        self._start(index)
        future = self._futures.pop(index)
        self._start(index + 1)
        return future.result()


def _prefetching_writer() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from gguf import gguf_writer, lazy

    original = gguf_writer.GGUFWriter.write_tensors_to_file

    def write_tensors_to_file(self, *, progress: bool = False) -> None:
        infos = [ti for tensors in self.tensors for ti in tensors.values()
                 if isinstance(ti.tensor, lazy.LazyNumpyTensor)]
        if self.temp_file is not None or not infos:
            return original(self, progress=progress)
        with ThreadPoolExecutor(1, thread_name_prefix="gguf-prefetch") as pool:
            ahead = _Ahead(pool, [ti.tensor for ti in infos])
            for index, ti in enumerate(infos):
                ti.tensor = _Prefetched(ahead, index, ti.tensor.nbytes)
            return original(self, progress=progress)

    gguf_writer.GGUFWriter.write_tensors_to_file = write_tensors_to_file


def main() -> None:
    prefix = sys.argv[1]
    sys.path[:0] = [prefix, os.path.join(prefix, "gguf-py")]
    import transformers

    for name in ("AutoConfig", "AutoTokenizer", "AutoModel", "AutoModelForCausalLM"):
        auto = getattr(transformers, name)
        auto.from_pretrained = _without_remote_code(auto.from_pretrained)
    _fast_bf16()
    _prefetching_writer()
    converter = os.path.join(prefix, "convert_hf_to_gguf.py")
    namespace = runpy.run_path(converter, run_name="convert_hf_to_gguf")  # its imports, not its main()
    line = sys.stdin.readline()
    if not line:  # the job ended before it needed a conversion
        os._exit(0)
    request = json.loads(line)  # llamacpp.convert's: pre-tokenizer, argv, and the CPUs and threads it may use
    override, arguments = request.get("pre"), request["argv"]
    if request.get("cpus"):  # the CPUs the job left free (before any worker thread starts: they inherit them)
        os.sched_setaffinity(0, request["cpus"])
    if request.get("threads"):
        import torch

        torch.set_num_threads(request["threads"])
    if override:
        _named_pre_tokenizer(override)
    sys.argv = [converter, *arguments]
    namespace["main"]()  # writes and closes the GGUF file
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
