"""Bases built once per machine (job/basecache.py): a GGUF base is built into the cache by the first run, copied
from it by the second run and by a sweep variant, refused and rebuilt when another writer changed it, and read by
`inspect` as well."""
import json
import os
from pathlib import Path

import pytest

from conftest import events, run_cli
from job import llamacpp

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory, tiny_model) -> Path:
    """The tiny model as a GGUF file (f16), as a user's GGUF base would be."""
    out = tmp_path_factory.mktemp("gguf-base") / "tiny-f16.gguf"
    llamacpp.convert(llamacpp.find(), tiny_model, out, "f16", "llama-bpe")
    return out


def spec_with_gguf_base(tmp_path, tiny_data, gguf_base, name="fromgguf", **extra) -> Path:
    spec = {"name": name, "output_dir": str(tmp_path / "runs"),
            "model": {"base": str(gguf_base), "max_seq_length": 128, "chat_template": "llama-3"},
            "data": {"source": str(tiny_data)}, "lora": {"r": 4, "alpha": 8},
            "train": {"backend": "hf", "max_steps": 1, "per_device_batch_size": 2, "save_steps": 1,
                      "optim": "adamw_torch"}, **extra}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def base_events(stdout: str) -> list[str]:
    return [e["event"] for e in events(stdout) if e["event"].startswith("base_")]


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_the_second_run_and_a_sweep_variant_copy_the_base_built_by_the_first(tmp_path, tiny_data, gguf_base):
    cache = tmp_path / "cache"
    env = {"PEFTOPT_BASE_CACHE": str(cache)}
    first = run_cli("run", spec_with_gguf_base(tmp_path, tiny_data, gguf_base, "first"), "--stages", "prepare",
                    env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert base_events(first.stdout) == ["base_cache_stored", "base_materialized"]
    [entry] = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert json.loads((entry / "manifest.json").read_text())["files"]

    second = run_cli("run", spec_with_gguf_base(tmp_path, tiny_data, gguf_base, "second"), "--stages", "prepare",
                     env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert base_events(second.stdout) == ["base_cache_used", "base_materialized"]
    built = files_of(tmp_path / "runs" / "first" / "base")
    assert files_of(tmp_path / "runs" / "second" / "base") == built

    sweep = spec_with_gguf_base(tmp_path, tiny_data, gguf_base, "sweep", matrix={"lora.r": [4, 8]})
    variant = run_cli("run", sweep, "--index", "1", "--stages", "prepare", env=env)
    assert variant.returncode == 0, variant.stderr[-2000:]
    assert base_events(variant.stdout) == ["base_cache_used", "base_materialized"]
    [variant_dir] = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("sweep")]
    assert files_of(variant_dir / "base") == built


def test_a_cache_entry_changed_by_another_writer_is_refused_and_built_again(tmp_path, tiny_data, gguf_base):
    cache = tmp_path / "cache"
    env = {"PEFTOPT_BASE_CACHE": str(cache)}
    assert run_cli("run", spec_with_gguf_base(tmp_path, tiny_data, gguf_base, "honest"), "--stages", "prepare",
                   env=env).returncode == 0
    honest = files_of(tmp_path / "runs" / "honest" / "base")
    [entry] = [p for p in cache.iterdir() if not p.name.startswith(".")]
    secret = tmp_path / "outside.txt"
    secret.write_text("not the cache's")

    for n, tamper in enumerate([
        lambda: (entry / "tokenizer_config.json").write_text('{"chat_template": "{{ evil }}"}'),  # content swapped
        lambda: ((entry / "config.json").unlink(), os.symlink(secret, entry / "config.json")),  # a link out
        lambda: (entry / "manifest.json").write_text('{"files": {"../../outside.txt": {"sha256": "x", "size": 1}}}'),
        lambda: ((entry / "tokenizer.json").unlink(), os.mkfifo(entry / "tokenizer.json")),  # a FIFO: no hang
    ]):
        tamper()
        result = run_cli("run", spec_with_gguf_base(tmp_path, tiny_data, gguf_base, f"victim{n}"), "--stages",
                         "prepare", env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        seen = base_events(result.stdout)
        assert seen[0] == "base_cache_refused" and "base_cache_stored" in seen, seen
        assert files_of(tmp_path / "runs" / f"victim{n}" / "base") == honest
        assert secret.read_text() == "not the cache's"


def test_inspect_shows_the_rows_of_a_gguf_base_and_builds_it_once(tmp_path, tiny_data, gguf_base):
    cache = tmp_path / "cache"
    spec = spec_with_gguf_base(tmp_path, tiny_data, gguf_base, "looked")
    shown = run_cli("inspect", spec, "--rows", "1", env={"PEFTOPT_BASE_CACHE": str(cache)})
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "--- row 0:" in shown.stdout and "trained" in shown.stdout
    assert [p for p in cache.iterdir() if not p.name.startswith(".")]  # the run that follows copies it
    run = run_cli("run", spec, "--stages", "prepare", env={"PEFTOPT_BASE_CACHE": str(cache)})
    assert base_events(run.stdout)[0] == "base_cache_used"


def test_inspect_and_a_run_on_a_package_base(tmp_path, tiny_data, gguf_base):
    """A `package:NAME` base (a module whose assemble() writes its GGUF, as the demo's package does) is built once,
    shown by inspect, and copied by the run that follows."""
    package = tmp_path / "site" / "tiny_gguf_pkg"
    package.mkdir(parents=True)
    package.joinpath("__init__.py").write_text(
        "import shutil\n\n\ndef assemble(path, overwrite=False):\n"
        f"    shutil.copyfile({str(gguf_base)!r}, path)\n")
    metadata = tmp_path / "site" / "tiny_gguf_pkg-1.0.dist-info"  # installed, as pip would leave it
    metadata.mkdir()
    metadata.joinpath("METADATA").write_text("Metadata-Version: 2.1\nName: tiny-gguf-pkg\nVersion: 1.0\n")
    env = {"PEFTOPT_BASE_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    spec = tmp_path / "pkg.json"
    spec.write_text(json.dumps({
        "name": "pkg", "output_dir": str(tmp_path / "runs"),
        "model": {"base": "package:tiny-gguf-pkg", "max_seq_length": 128, "chat_template": "llama-3"},
        "data": {"source": str(tiny_data)}, "lora": {"r": 4, "alpha": 8},
        "train": {"backend": "hf", "max_steps": 1, "optim": "adamw_torch"}}))
    shown = run_cli("inspect", spec, "--rows", "1", env=env)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "--- row 0:" in shown.stdout and "base_cache_stored" in shown.stdout
    prepared = run_cli("run", spec, "--stages", "prepare", env=env)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    assert base_events(prepared.stdout)[0] == "base_cache_used"
