"""Unit: sweeps expand into deterministically named variants; array tasks pick theirs by index."""
import json
from pathlib import Path

import pytest

from job.errors import SpecError
from job.specfile import load_spec, load_variants
from job import settings
from job.settings import INDEX_VARIABLES
from job.sweep import expand

ROOT = Path(__file__).resolve().parents[2]
BASE = {"name": "sw", "model": {"base": "org/m"}, "data": {"source": "d.jsonl"}, "lora": {}, "train": {"max_steps": 2}}


def test_grid_names_are_deterministic():
    data = {**BASE, "matrix": {"lora.r": [16, 64], "data.split": ["train[:10]", "train[:20]"]}}
    first, second = expand(data), expand(json.loads(json.dumps(data)))
    assert [n for n, _ in first] == [n for n, _ in second] == [
        "sw-00-splittrain_10-r16", "sw-01-splittrain_10-r64", "sw-02-splittrain_20-r16", "sw-03-splittrain_20-r64"]
    assert first[3][1]["lora"]["r"] == 64 and first[3][1]["data"]["split"] == "train[:20]"
    assert "matrix" not in first[0][1]


def test_the_seed_sweep_is_t1_t2_t3():
    variants = load_variants(ROOT / "jobspecs" / "sweep-t1-t3.json")
    assert [(v.name, v.lora.r, v.data.split) for v in variants] == [
        ("baseline_1B_r16_10k_600steps", 16, "train[:10000]"),
        ("model_centric_1B_r64_10k_600steps", 64, "train[:10000]"),
        ("data_centric_1B_r64_30k_600steps", 64, "train[:30000]")]


@pytest.mark.parametrize("variable", INDEX_VARIABLES)
def test_array_index_variables(variable, monkeypatch):
    for name in INDEX_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "2")
    settings.init()
    assert load_spec(ROOT / "jobspecs" / "sweep-t1-t3.json").name == "data_centric_1B_r64_30k_600steps"
    assert load_spec(ROOT / "jobspecs" / "sweep-t1-t3.json", index=0).lora.r == 16  # --index wins


def test_index_errors(monkeypatch):
    for name in INDEX_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    settings.init()
    with pytest.raises(SpecError, match="a sweep of 3 variants"):
        load_spec(ROOT / "jobspecs" / "sweep-t1-t3.json")
    with pytest.raises(SpecError, match="0..2"):
        load_spec(ROOT / "jobspecs" / "sweep-t1-t3.json", index=5)
    monkeypatch.setenv("AWS_BATCH_JOB_ARRAY_INDEX", "x")
    with pytest.raises(SpecError, match="AWS_BATCH_JOB_ARRAY_INDEX='x': expected an integer"):
        settings.init()


def test_a_bad_variant_is_named(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({**BASE, "matrix": {"lora.r": [8, -1]}}))
    with pytest.raises(SpecError) as info:
        load_variants(path)
    assert "sw-01-r1" in info.value.message and any(d.startswith("lora.r:") for d in info.value.details)


def test_expand_cli_lists_variants():
    from click.testing import CliRunner

    from job.cli import cli

    result = CliRunner().invoke(cli, ["expand", str(ROOT / "jobspecs" / "sweep-t1-t3.json")])
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 3 and lines[1].startswith("1\tmodel_centric_1B_r64_10k_600steps\t")
