"""Unit: the batch-service examples name the right exit codes and image, the image's pins match the
project's, and the Dockerfile keeps its contract (pinned build args, non-root, the shared build script)."""
import json
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docker" / "examples"
IMAGE = re.compile(r"/peftopt:\d+\.\d+\.\d+$")


def test_aws_batch_retries_on_75_and_exits_on_2_and_3():
    job = json.loads((EXAMPLES / "aws-batch-job-definition.json").read_text())
    assert IMAGE.search(job["containerProperties"]["image"])
    rules = {r.get("onExitCode"): r["action"] for r in job["retryStrategy"]["evaluateOnExit"] if "onExitCode" in r}
    assert rules["75"] == "RETRY" and rules["2"] == "EXIT" and rules["3"] == "EXIT"
    assert job["retryStrategy"]["attempts"] > 1
    assert not any("hf_" in json.dumps(e) for e in job["containerProperties"]["environment"])


def test_gcp_batch_lifecycle_policies():
    job = json.loads((EXAMPLES / "gcp-batch-job.json").read_text())
    spec = job["taskGroups"][0]["taskSpec"]
    assert IMAGE.search(spec["runnables"][0]["container"]["imageUri"])
    policies = {p["action"]: set(p["actionCondition"]["exitCodes"]) for p in spec["lifecyclePolicies"]}
    assert 75 in policies["RETRY_TASK"] and {2, 3} <= policies["FAIL_TASK"]
    assert spec["maxRetryCount"] > 0


def test_kubernetes_indexed_job_failure_policy_and_volume():
    job = yaml.safe_load((EXAMPLES / "k8s-indexed-job.yaml").read_text())
    assert job["spec"]["completionMode"] == "Indexed"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail = next(r for r in rules if r["action"] == "FailJob")
    assert set(fail["onExitCodes"]["values"]) == {2, 3}
    assert any(r["action"] == "Ignore" and r.get("onPodConditions") for r in rules)
    assert any(75 in r.get("onExitCodes", {}).get("values", []) and r["action"] == "Count" for r in rules)
    pod = job["spec"]["template"]["spec"]
    assert IMAGE.search(pod["containers"][0]["image"])
    assert any(m["mountPath"] == "/runs" for m in pod["containers"][0]["volumeMounts"])
    assert any("persistentVolumeClaim" in v for v in pod["volumes"])


def test_github_actions_workflow_retries_on_75():
    workflow = yaml.safe_load((EXAMPLES / "github-actions-gpu.yml").read_text())
    job = workflow["jobs"]["train"]
    assert "gpu" in job["runs-on"] and "self-hosted" in job["runs-on"]
    script = job["steps"][0]["run"]
    assert "75|4)" in script and "--gpus all" in script
    assert IMAGE.search(job["steps"][0]["env"]["IMAGE"])


def test_image_pins_match_the_project():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["gpu"]
    pinned = dict(line.split("==") for line in wanted)
    constraints = dict(line.split("==") for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines()
                       if line.strip() and not line.startswith("#"))
    assert pinned == constraints, "docker/constraints.txt and pyproject.toml have drifted apart"


def test_dockerfile_contract():
    text = (ROOT / "Dockerfile").read_text()
    assert "latest" not in text
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(froms) == 2 and all("${" in f for f in froms)  # base images are build args
    assert "docker/build-llama-cpp.sh" in text and "/opt/llama.cpp" in text
    assert re.search(r"^USER 1000", text, re.M) and "gcc" in text and "HF_HOME=" in text
    assert "constraints.txt" in text and (ROOT / ".dockerignore").exists()
