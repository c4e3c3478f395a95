"""Secrets (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, every token_env the spec names): taken only from the environment,
masked everywhere peftopt writes, never given to a tool (docs/security.md: secrets)."""
import shutil
import stat

import pytest

from conftest import run_cli, write_tiny_spec
from hub_standin import HubStandIn
from security.canary import CANARY, ENV, OTHER_SECRET, assert_no_canary

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("where", ["spec", "override", "other-field"])
def test_a_secret_typed_into_the_wrong_field_is_never_echoed(where, tmp_path, make_spec):
    if where == "spec":
        result = run_cli("run", make_spec("leak", description=f"my token is {CANARY}"), env=ENV)
    elif where == "override":
        result = run_cli("run", make_spec("leak"), "--set", f"push.adapter_repo={CANARY}", env=ENV)
    else:  # a registered secret that does not look like a token, in a field that echoes its value
        result = run_cli("run", make_spec("leak"), "--set", f"push.adapter_repo={OTHER_SECRET}", env=ENV)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    if where != "spec":  # the rejected value is echoed, masked
        assert "'***' is not a Hub repo id" in result.stderr
    assert_no_canary(result.stdout, result.stderr)
    assert not (tmp_path / "runs").exists()


def test_a_registered_secret_anywhere_in_the_spec_is_refused_unechoed(tmp_path, tiny_model, tiny_data):
    base = tmp_path / OTHER_SECRET / "model"
    shutil.copytree(tiny_model, base)
    result = run_cli("run", write_tiny_spec(tmp_path, base, tiny_data, "masked"), env=ENV)
    assert result.returncode == 2 and "model.base: holds a token" in result.stderr
    assert_no_canary(result.stdout, result.stderr)
    assert not (tmp_path / "runs").exists()


def test_tracebacks_and_state_are_masked(tmp_path):
    import io
    import logging

    from job import log
    from job.rundir import RunDir, RunState, StageState

    log.add_secret(OTHER_SECRET)
    run_dir = RunDir(tmp_path / "run")
    state = RunState(stages={"train": StageState(status="failed", error=f"cannot load {OTHER_SECRET}/model")},
                     error=f"Traceback ... {CANARY}")
    run_dir.save_state(state)
    written = (tmp_path / "run" / "state.json").read_text()
    assert "cannot load ***/model" in written and "Traceback ... ***" in written
    assert_no_canary(dirs=[tmp_path])

    log.configure(json_output=True)  # as the CLI does first (whatever this process's earlier tests did)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(log._formatter(True))
    logging.getLogger("mask-test").addHandler(handler)
    try:
        raise RuntimeError(f"boom with {OTHER_SECRET} and {CANARY}")
    except RuntimeError:
        log.get_logger("mask-test").exception("job_crashed")
    finally:
        logging.getLogger("mask-test").removeHandler(handler)
    line = stream.getvalue()
    assert "RuntimeError" in line and "***" in line
    assert_no_canary(line)


def test_a_token_with_a_trailing_newline_works(tmp_path, make_spec):
    spec = make_spec("newline", train={"max_steps": 2}, push={"adapter_repo": "me/nl", "token_env": "PEFTOPT_TEST_TOKEN"})
    with HubStandIn(CANARY) as hub:
        result = run_cli("run", spec, env={**ENV, "PEFTOPT_TEST_TOKEN": CANARY + "\n", "HF_ENDPOINT": hub.url,
                                           "HF_HUB_OFFLINE": "0", "PEFTOPT_HUB_BACKOFF_S": "0.01"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "adapter_model.safetensors" in hub.files["me/nl"]


def test_llama_cpp_tools_run_without_the_token(tmp_path, tiny_model, tiny_data):
    """The pinned tools get the locale and search path, never a token: a llama-quantize that writes down the
    environment it was given finds no secret in it."""
    from job import llamacpp

    prefix = tmp_path / "llama"
    shutil.copytree(llamacpp.find().prefix, prefix, symlinks=True)
    real = prefix / "bin" / "llama-quantize.real"
    (prefix / "bin" / "llama-quantize").rename(real)
    seen = tmp_path / "tool-env.txt"
    wrapper = prefix / "bin" / "llama-quantize"
    wrapper.write_text(f"#!/bin/sh\nenv >> {seen}\nexec {real} \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    spec = write_tiny_spec(tmp_path, tiny_model, tiny_data, "tools", train={"max_steps": 2},
                           export={"merge": True, "gguf": ["f16", "q4_k_m"], "tokenizer_pre": "llama-bpe",
                                   "verify_tokens": 4})
    result = run_cli("run", spec, env={**ENV, "LLAMA_CPP_DIR": str(prefix)})
    assert result.returncode == 0, result.stderr[-2000:]
    text = seen.read_text()
    assert "HF_HUB_OFFLINE=1" in text and "PATH=" in text
    assert CANARY not in text and OTHER_SECRET not in text and "HF_TOKEN" not in text
