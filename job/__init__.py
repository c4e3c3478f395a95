"""peftopt: one JSON jobspec in, a fine-tuned LoRA adapter, merged model and verified GGUF out."""

__version__ = "0.1.0"


def declarations(package: str, names: tuple[str, ...], attribute: str) -> tuple:
    """The `attribute` each module `package.NAME` declares, in the order of `names` (the stage and method registries:
    one module per declaration, named as the declaration is)."""
    import importlib

    found = []
    for name in names:
        declared = getattr(importlib.import_module(f"{package}.{name}"), attribute)
        if declared.name != name:
            raise RuntimeError(f"{package.replace('.', '/')}/{name}.py declares {attribute} named {declared.name!r}")
        found.append(declared)
    return tuple(found)
