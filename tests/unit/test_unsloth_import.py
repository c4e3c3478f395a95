"""Unit: unsloth is imported with its rewriting of trl's trainers narrowed to the one its backend trains with
(job/backends/unsloth.py). The hook that narrows it runs right after the module it targets executes, before
anything imports from it; here on a real package written on the spot (unsloth itself needs a GPU to import)."""
import sys

from job.backends import unsloth


def test_the_post_import_hook_replaces_the_walk_before_the_importer_calls_it(tmp_path, monkeypatch):
    package = tmp_path / "fakeunsloth"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("from .models import llama\n")
    (package / "models" / "__init__.py").write_text("")
    (package / "models" / "rl.py").write_text(
        "rewritten = []\n"
        "def _patch_trl_rl_trainers(name):\n    rewritten.append(name)\n"
        "def patch_trl_rl_trainers():\n"
        "    for name in ('sft_trainer', 'grpo_trainer', 'dpo_trainer', 'kto_trainer'):\n"
        "        _patch_trl_rl_trainers(name)\n"
        "def PatchFastRL():\n    patch_trl_rl_trainers()\n")
    (package / "models" / "llama.py").write_text("from .rl import PatchFastRL\nPatchFastRL()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    finder = unsloth._AfterImport("fakeunsloth.models.rl", unsloth._only_our_trainers)
    sys.meta_path.insert(0, finder)
    try:
        import fakeunsloth  # noqa: F401
    finally:
        sys.meta_path.remove(finder)
        rl = sys.modules["fakeunsloth.models.rl"]
        for name in [n for n in sys.modules if n.startswith("fakeunsloth")]:
            del sys.modules[name]
    assert rl.rewritten == list(unsloth.TRL_TRAINERS) == ["sft_trainer"]
