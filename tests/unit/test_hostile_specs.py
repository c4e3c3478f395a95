"""Property-based: mutated jobspecs of every kind end in exit 2 with one clear message, no traceback, and
nothing written anywhere. `PEFTOPT_HYPOTHESIS_EXAMPLES` sets how many cases each property tries."""
import json
import os
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from job.cli import invoke

EXAMPLES = int(os.environ.get("PEFTOPT_HYPOTHESIS_EXAMPLES", "60"))
BASE = {
    "name": "victim", "model": {"base": "org/model", "max_seq_length": 128},
    "data": {"source": "d.jsonl", "split": "train[:10]"}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    "train": {"max_steps": 3, "per_device_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-4},
    "evaluate": {"prompts": ["hi"], "max_new_tokens": 4}, "export": {"merge": True, "gguf": ["q8_0"]},
}
SECTIONS = ["model", "data", "lora", "train", "evaluate", "export"]
SCALARS = [(s, k) for s in SECTIONS for k, v in BASE[s].items() if not isinstance(v, (list, dict))] + [
    (None, "name")]
OUT_OF_RANGE = [("lora", "r", 0), ("lora", "r", 10**9), ("lora", "dropout", 1.5), ("train", "max_steps", 0),
                ("train", "max_steps", -5), ("train", "learning_rate", 0), ("model", "max_seq_length", 3),
                ("evaluate", "max_new_tokens", 0), ("train", "per_device_batch_size", -1), ("lora", "alpha", -2)]
ESCAPING_NAMES = ["..", "../escape", "/etc/passwd", "a/b", "./x", "x\\y", "", " ", "x" * 200, "..\u2215x", "a\x00b",
                  "~root", "-rf"]

settings.register_profile("peftopt", max_examples=EXAMPLES, deadline=None, derandomize=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: cases are small
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile("peftopt")


def mutate_unknown_key(data, section, key):
    target = data if section is None else data[section]
    target[key] = 1
    return data


def check_rejected(tmp_path: Path, text: bytes, capsys) -> str:
    spec = tmp_path / "spec.json"
    spec.write_bytes(text)
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    code = invoke(["run", str(spec), "--output-dir", str(out)])
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err[-500:])
    first = captured.err.strip().splitlines()[0]
    assert first.startswith("error: ") and len(first) < 400
    assert "Traceback" not in captured.err + captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not out.exists()
    return captured.err


@given(section=st.sampled_from([None, *SECTIONS]),
       key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_unknown_keys_at_every_level(tmp_path_factory, capsys, section, key):
    fields = set(BASE if section is None else BASE[section]) | {"description", "output_dir", "push", "matrix",
                                                                "load_in_4bit", "dtype", "chat_template", "merge_base",
                                                                "format", "num_samples", "eval_split", "system_prompt",
                                                                "train_on_responses_only", "bad_rows", "target_modules",
                                                                "backend", "micro_batch_size", "lr_scheduler",
                                                                "warmup_steps", "weight_decay", "optim", "packing",
                                                                "seed", "save_steps", "save_total_limit", "logging_steps",
                                                                "gradient_checkpointing", "max_memory_gb",
                                                                "grace_period_s", "targets", "num_prompts", "do_sample",
                                                                "temperature", "top_p", "tokenizer_pre",
                                                                "verify_prompts", "verify_tokens", "split", "source",
                                                                "base", "max_seq_length"}
    if key in fields:
        return
    data = mutate_unknown_key(json.loads(json.dumps(BASE)), section, key)
    err = check_rejected(tmp_path_factory.mktemp("k"), json.dumps(data).encode(), capsys)
    assert f"{key}: unknown key" in err


@given(target=st.sampled_from(SCALARS), junk=st.sampled_from([{"x": 1}, [1, 2], None, {"deep": [[[[{}]]]]}]))
def test_wrong_types(tmp_path_factory, capsys, target, junk):
    section, key = target
    data = json.loads(json.dumps(BASE))
    (data if section is None else data[section])[key] = junk
    if junk is None and key not in ("name", "base", "source", "max_steps"):
        (data if section is None else data[section])[key] = [junk]
    err = check_rejected(tmp_path_factory.mktemp("t"), json.dumps(data).encode(), capsys)
    assert key in err


@given(case=st.sampled_from(OUT_OF_RANGE))
def test_out_of_range_numbers(tmp_path_factory, capsys, case):
    section, key, value = case
    data = json.loads(json.dumps(BASE))
    data[section][key] = value
    assert f"{section}.{key}:" in check_rejected(tmp_path_factory.mktemp("r"), json.dumps(data).encode(), capsys)


@given(name=st.sampled_from(ESCAPING_NAMES) | st.text(min_size=1, max_size=30).filter(
    lambda s: "/" in s or "\\" in s or s.strip(".") == "" or s.startswith((".", "-"))))
def test_names_that_try_to_escape(tmp_path_factory, capsys, name):
    data = {**json.loads(json.dumps(BASE)), "name": name}
    assert "name:" in check_rejected(tmp_path_factory.mktemp("n"), json.dumps(data).encode(), capsys)


@given(garbage=st.binary(min_size=1, max_size=40), position=st.integers(min_value=0, max_value=200))
def test_non_utf8_and_broken_bytes(tmp_path_factory, capsys, garbage, position):
    text = json.dumps(BASE).encode()
    mutated = text[:position] + garbage + text[position:]
    try:
        json.loads(mutated.decode("utf-8"))
        return  # the garbage happened to keep it valid JSON; other properties cover content
    except (UnicodeDecodeError, ValueError):
        pass
    check_rejected(tmp_path_factory.mktemp("b"), mutated, capsys)


@given(size=st.integers(min_value=5000, max_value=200000), field=st.sampled_from(["description", "name"]))
def test_huge_strings(tmp_path_factory, capsys, size, field):
    data = {**json.loads(json.dumps(BASE)), field: "x" * size}
    check_rejected(tmp_path_factory.mktemp("h"), json.dumps(data).encode(), capsys)


@given(depth=st.integers(min_value=50, max_value=100000))
def test_deeply_nested_junk(tmp_path_factory, capsys, depth):
    junk = "[" * depth + "]" * depth
    text = json.dumps(BASE)[:-1] + f', "junk": {junk}}}'
    check_rejected(tmp_path_factory.mktemp("d"), text.encode(), capsys)


@given(key=st.sampled_from(["name", "model", "train", "lora"]))
def test_duplicate_keys(tmp_path_factory, capsys, key):
    text = json.dumps(BASE)[:-1] + f', "{key}": {json.dumps(BASE[key])}}}'
    assert f"duplicate key '{key}'" in check_rejected(tmp_path_factory.mktemp("u"), text.encode(), capsys)


@given(where=st.sampled_from(["description", "model.base", "data.source", "evaluate.prompts"]))
def test_tokens_in_the_spec_are_refused(tmp_path_factory, capsys, where):
    data = json.loads(json.dumps(BASE))
    token = "hf_" + "aB3" * 10
    section, _, key = where.rpartition(".")
    target = data[section] if section else data
    target[key] = [token] if key == "prompts" else token
    err = check_rejected(tmp_path_factory.mktemp("s"), json.dumps(data).encode(), capsys)
    assert "push.token_env" in err and token not in err


def test_a_symlinked_run_directory_is_refused(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "victim").symlink_to(outside)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"name": "victim", "model": {"base": "org/model"},
                                "evaluate": {"prompts": ["hi"], "targets": ["base"]}}))
    assert invoke(["run", str(spec), "--output-dir", str(out)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert list(outside.iterdir()) == []
