"""A checkpoint's optimizer state (`optimizer.pt`) as peftopt writes it: torch.save's container, loaded with
weights_only, holding the state's tensors packed into one flat tensor per dtype and device, and the structure
around them (the parameters' entries, their scalars, the param groups) as one JSON string.

Why: t1's 8-bit optimizer state is 1,344 tensors, and torch.save pickles each in Python (its reduction and a
persistent id for every object it holds) on the checkpoint writer thread, holding the interpreter lock the
training loop needs for about half the write. Here the pickle holds a string and a few tensors.

`load` reads this file and the plain state dict `torch.save(optimizer.state_dict())` writes (checkpoints of
earlier peftopt versions, and a tree the JSON cannot carry), and gives the state dict back. A file from elsewhere
is not trusted: nothing in it runs as code, and a layout that reaches outside its pack, a shape that does not fit,
or anything else that is not this format is a ValueError.

The JSON of a value: a str, int, float, bool or None as itself; a dict as ["d", [[key, value], ...]] (keys
encoded the same way: an optimizer's state is keyed by int), a list as ["l", [...]], a tuple as ["u", [...]],
a tensor as ["t", pack, offset, shape] (its elements are pack[offset:offset + numel], row-major).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

FORMAT = "peftopt.packed-state/1"


class Unencodable(TypeError):
    """A value the JSON cannot carry exactly (the caller saves the plain state dict instead)."""


def encode(tree: Any, leaf: Callable[[Any], tuple[int, int, tuple[int, ...]] | None]) -> Any:
    """The JSON-able form of `tree`; `leaf(value)` gives a packed tensor's (pack, offset, shape), None for others."""
    where = leaf(tree)
    if where is not None:
        pack, offset, shape = where
        return ["t", pack, offset, list(shape)]
    if tree is None or type(tree) in (str, bool, int, float):  # exactly these: a subclass would come back as its base
        return tree
    if type(tree) is dict:
        return ["d", [[encode(key, leaf), encode(value, leaf)] for key, value in tree.items()]]
    if type(tree) is list:
        return ["l", [encode(value, leaf) for value in tree]]
    if type(tree) is tuple:
        return ["u", [encode(value, leaf) for value in tree]]
    raise Unencodable(f"{type(tree).__name__} in the optimizer state")


def save(path: Path, tree: Any, packs: list) -> None:
    """Writes the encoded `tree` and its CPU `packs` (flat tensors) to `path`."""
    import torch

    torch.save({"format": FORMAT, "tree": json.dumps(tree, separators=(",", ":")), "packs": list(packs)}, path)


def decode(tree: Any, packs: list) -> Any:
    """The value `tree` (the JSON's) stands for, its tensors views into `packs`. ValueError when it is not one."""
    import torch

    def value(node: Any) -> Any:
        if node is None or isinstance(node, (str, bool, int, float)):
            return node
        if not isinstance(node, list) or not node or node[0] not in ("d", "l", "u", "t"):
            raise ValueError(f"not a value of this format: {str(node)[:60]}")
        if node[0] == "t":
            if len(node) != 4:
                raise ValueError("a tensor's entry is [\"t\", pack, offset, shape]")
            _, pack, offset, shape = node
            if not isinstance(pack, int) or isinstance(pack, bool) or not 0 <= pack < len(packs):
                raise ValueError(f"a tensor in pack {str(pack)[:20]}, of {len(packs)}")
            if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                      for s in shape):
                raise ValueError(f"a tensor's shape {str(shape)[:60]} is not a list of sizes")
            count = math.prod(shape)
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0 or \
                    offset + count > packs[pack].numel():
                raise ValueError(f"a tensor at {str(offset)[:20]} of {count} elements reaches outside pack {pack} "
                                 f"({packs[pack].numel()} elements)")
            return packs[pack][offset:offset + count].view(shape)
        if len(node) != 2 or not isinstance(node[1], list):
            raise ValueError(f"a {node[0]!r} entry is [tag, items]")
        if node[0] == "d":
            if not all(isinstance(item, list) and len(item) == 2 for item in node[1]):
                raise ValueError("a dict's items are [key, value] pairs")
            out = {}
            for key, item in node[1]:
                key = value(key)
                if isinstance(key, (dict, list, torch.Tensor)):
                    raise ValueError("a dict's key is a dict, list or tensor")
                out[key] = value(item)
            return out
        items = [value(item) for item in node[1]]
        return items if node[0] == "l" else tuple(items)

    return value(tree)


def load(path: Path) -> Any:
    """The optimizer state dict in `path` (this format or a plain one), its tensors on the CPU.

    Raises ValueError (and torch.load's errors) for a file that is neither."""
    import torch

    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(saved, dict) and saved.get("format") == FORMAT):
        return saved
    if set(saved) != {"format", "tree", "packs"} or not isinstance(saved["tree"], str) or \
            not isinstance(saved["packs"], list) or \
            not all(isinstance(p, torch.Tensor) and p.dim() == 1 for p in saved["packs"]):
        raise ValueError(f"{path.name} is not a {FORMAT} file: its entries are not a tree and flat packs")
    try:
        tree = json.loads(saved["tree"])
    except RecursionError:
        raise ValueError(f"{path.name}'s tree is nested too deep") from None
    try:
        return decode(tree, saved["packs"])
    except RecursionError:
        raise ValueError(f"{path.name}'s tree is nested too deep") from None
