"""Unit: the jobspec rejects bad input with one clear line per problem and accepts every shipped spec."""
import json
from pathlib import Path

import pytest

from job.errors import SpecError
from job.specfile import load_spec, validate_data

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {"name": "x", "model": {"base": "org/model"}, "data": {"source": "d.jsonl"}, "lora": {},
           "train": {"max_steps": 3}}


def problems(data) -> list[str]:
    with pytest.raises(SpecError) as info:
        validate_data(data)
    return info.value.details or [info.value.message]


@pytest.mark.parametrize("path", sorted((ROOT / "jobspecs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_jobspec_validates(path):
    from job.specfile import load_variants

    for spec in load_variants(path):
        assert spec.name
        if spec.evaluate and isinstance(spec.evaluate.prompts, str):
            assert Path(spec.evaluate.prompts).is_file()


def test_seed_jobspecs_reproduce_the_notebook():
    t1, t2, t3 = (load_spec(ROOT / f"jobspecs/{n}.json") for n in ("t1", "t2", "t3"))
    assert (t1.lora.r, t1.lora.alpha, t1.data.split, t1.train.max_steps) == (16, 16, "train[:10000]", 600)
    assert (t2.lora.r, t2.lora.alpha) == (64, 64)
    assert (t3.lora.r, t3.data.split) == (64, "train[:30000]")
    for spec in (t1, t2, t3):
        assert spec.model.base == "unsloth/Llama-3.2-1B-Instruct-bnb-4bit"
        assert (spec.train.per_device_batch_size, spec.train.gradient_accumulation_steps) == (2, 4)
        assert spec.train.packing and spec.train.save_steps == 10 and spec.export.gguf == ["q8_0"]
    t0 = load_spec(ROOT / "jobspecs/t0.json")
    assert t0.train is None and t0.data is None and t0.evaluate.targets == ["base"]
    exp1 = load_spec(ROOT / "jobspecs/exp1.json")
    assert exp1.train.max_steps == 1 and "setup" in exp1.description
    suite = json.loads((ROOT / "jobspecs/prompts/seed10.json").read_text())["prompts"]
    assert len(suite) == 10


def test_every_error_is_reported_at_once_with_its_path():
    found = problems({"name": "ok", "model": {"base": "a", "bogus": 1}, "lora": {"rr": 3, "r": "big"},
                      "data": {"source": "x.jsonl"}, "train": {"max_steps": 0}, "export": {"gguf": ["q4km"]}})
    text = "\n".join(found)
    assert "model.bogus: unknown key" in text
    assert "lora.rr: unknown key (did you mean 'r'?)" in text
    assert any(line.startswith("lora.r:") for line in found)
    assert any(line.startswith("train.max_steps:") and "greater than or equal to 1" in line for line in found)
    assert "did you mean 'q4_k_m'?" in text
    assert len(found) == 5


def test_missing_required_and_cross_section_rules():
    assert any("model: required field is missing" in p for p in problems({"name": "x"}))
    found = problems({"name": "x", "model": {"base": "a"}, "train": {"max_steps": 3}})
    assert any(p.startswith("train: needs the data and lora sections") for p in found)
    found = problems({**MINIMAL, "export": {"merge": False, "gguf": ["q8_0"]}})
    assert any(p.startswith("export.gguf:") for p in found)


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/b", ".hidden", "", "x" * 101, "a b"])
def test_run_name_must_be_a_safe_path_segment(name):
    assert any(p.startswith("name:") for p in problems({**MINIMAL, "name": name}))


def test_tokens_are_refused_in_the_spec():
    found = problems({**MINIMAL, "description": "token hf_abcdefghijklmnopqrstuvwxyz0123"})
    assert any("description" in p and "push.token_env" in p for p in found)


def test_push_repo_ids_and_token_env_are_checked():
    found = problems({**MINIMAL, "push": {"adapter_repo": "no-owner", "token_env": "hf_token=1"}})
    assert any(p.startswith("push.adapter_repo:") for p in found)
    assert any(p.startswith("push.token_env:") for p in found)


def test_file_level_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x",\n "model": }')
    with pytest.raises(SpecError, match=r"bad.json:2:\d+: invalid JSON"):
        load_spec(bad)
    bad.write_text('{"name": "x", "name": "y"}')
    with pytest.raises(SpecError, match="duplicate key 'name'"):
        load_spec(bad)
    bad.write_bytes(b'{"name": "\xff"}')
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(bad)
    with pytest.raises(SpecError, match="no such jobspec file"):
        load_spec(tmp_path / "missing.json")
    bad.write_text("[1, 2]")
    with pytest.raises(SpecError, match="JSON object"):
        load_spec(bad)


def test_overrides_are_validated_like_the_file(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(MINIMAL))
    spec = load_spec(path, ["lora.r=64", "train.learning_rate=1e-4", "model.base=org/other", "push=null"])
    assert (spec.lora.r, spec.train.learning_rate, spec.model.base) == (64, 1e-4, "org/other")
    with pytest.raises(SpecError) as info:
        load_spec(path, ["lora.rank=64"])
    assert "--set lora.rank: unknown key (did you mean 'r'?)" in info.value.details
    with pytest.raises(SpecError, match="expected key.path=value"):
        load_spec(path, ["lora.r"])


def test_relative_paths_resolve_against_the_spec_folder(tmp_path):
    path = tmp_path / "sub" / "s.json"
    path.parent.mkdir()
    path.write_text(json.dumps({**MINIMAL, "evaluate": {"prompts": "prompts/x.json"}}))
    spec = load_spec(path)
    assert spec.data.source == str(path.parent / "d.jsonl")
    assert spec.evaluate.prompts == str(path.parent / "prompts" / "x.json")
    assert spec.model.base == "org/model"  # a Hub id is left alone


def test_spec_is_frozen():
    spec = validate_data(MINIMAL)
    with pytest.raises(Exception):
        spec.lora.r = 3


def test_checkpoint_sync_names_each_bad_field():
    data = json.loads(json.dumps(MINIMAL))
    data["train"]["checkpoint_sync"] = {"repo": "not a repo", "path_in_repo": "../up", "token_env": "hf_x y",
                                        "privat": True}
    found = problems(data)
    assert any(line.startswith("train.checkpoint_sync.repo:") for line in found)
    assert any(line.startswith("train.checkpoint_sync.path_in_repo:") for line in found)
    assert any(line.startswith("train.checkpoint_sync.token_env:") for line in found)
    assert any(line.startswith("train.checkpoint_sync.privat:") for line in found)
    ok = json.loads(json.dumps(MINIMAL))
    ok["train"]["checkpoint_sync"] = {"repo": "me/ckpts", "path_in_repo": "sweeps/t1"}
    validate_data(ok)


def test_data_sources_and_lora_variants_are_checked():
    both = json.loads(json.dumps(MINIMAL))
    both["data"]["sources"] = [{"source": "a.jsonl"}]
    assert any("exactly one of them" in p for p in problems(both))
    weighted = json.loads(json.dumps(MINIMAL))
    weighted["data"] = {"sources": [{"source": "a.jsonl", "weight": 2, "num_samples": 3}, {"source": "b.jsonl", "weight": 1}]}
    assert any("weight or num_samples, not both" in p for p in problems(weighted))
    weighted["data"]["sources"][0].pop("num_samples")
    assert any("set it (the mixture's size)" in p for p in problems(weighted))
    dora = json.loads(json.dumps(MINIMAL))
    dora["lora"] = {"use_dora": True, "init": "pissa", "modules_to_save": ["lm_head", "norm"]}
    dora["train"]["backend"] = "unsloth"
    found = problems(dora)
    assert any(p.startswith("lora.init:") for p in found) and any(p.startswith("lora.modules_to_save") for p in found)
    dora["lora"] = {"use_dora": True}
    assert any(p.startswith("lora.use_dora: the unsloth backend does not train DoRA") for p in problems(dora))
    dora["train"]["backend"] = "auto"
    assert validate_data(dora).lora.use_dora
    embeddings = json.loads(json.dumps(MINIMAL))
    embeddings["train"]["embedding_learning_rate"] = 1e-5
    assert any(p.startswith("train.embedding_learning_rate: applies to lora.modules_to_save") for p in problems(embeddings))
    embeddings["lora"] = {"modules_to_save": ["embed_tokens", "lm_head"]}
    assert validate_data(embeddings).train.embedding_learning_rate == 1e-5


def test_data_config_names_a_hub_data_sets_configuration_and_leaves_other_specs_fingerprints_alone():
    """data.config is left out of the spec's dump while unset: every stage's fingerprint of a spec that names none
    is what it was before the field existed (a run directory of an earlier version is not stale for it)."""
    from job.stages import fingerprints

    plain = validate_data({**MINIMAL, "data": {"source": "org/set"}})
    assert "config" not in plain.model_dump(mode="json")["data"]
    named = validate_data({**MINIMAL, "data": {"source": "org/set", "config": "main"}})
    assert named.data.all_sources()[0].config == "main"
    assert fingerprints(named)["prepare"] != fingerprints(plain)["prepare"]
    assert problems({**MINIMAL, "data": {"source": "d.jsonl", "config": "main"}}) == [
        "data: config names a Hub data set's configuration; 'd.jsonl' is a local file"]
