"""Unit: the batch-service examples are accepted by each service's own model (AWS Batch's service model from
botocore with its documented limits, GCP Batch's protobuf types, Kubernetes' OpenAPI schemas of every minor
version from 1.31, a GitHub Actions security linter), map peftopt's exit codes onto the service's retry
rules, and each check fails on the fault it exists to catch. Also: the lock and the Dockerfile's contract.
"""
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docker" / "examples"
IMAGE = re.compile(r"/peftopt:\d+\.\d+\.\d+$")


# ------------------------------------------------------------------------------ AWS Batch


def aws_batch_problems(job: dict) -> list[str]:
    """What AWS Batch's RegisterJobDefinition would refuse: the service model's shapes, types and enums
    (botocore), and the limits its documentation states (read from the same model's docs)."""
    import botocore.session
    from botocore.validate import ParamValidator

    operation = botocore.session.get_session().get_service_model("batch").operation_model("RegisterJobDefinition")
    report = ParamValidator().validate(job, operation.input_shape)
    problems = report.generate_report().splitlines() if report.has_errors() else []
    problems += _enum_problems(job, operation.input_shape, "")
    retry = operation.input_shape.members["retryStrategy"]
    strategy = job.get("retryStrategy", {})
    low, high = map(int, re.search(r"between (\d+) and (\d+) attempts", retry.members["attempts"].documentation).groups())
    if "attempts" in strategy and not low <= strategy["attempts"] <= high:
        problems.append(f"retryStrategy.attempts: {strategy['attempts']} is outside {low}..{high}")
    most = int(re.search(r"Array of up to (\d+) objects", retry.members["evaluateOnExit"].documentation).group(1))
    rules = strategy.get("evaluateOnExit", [])
    if len(rules) > most:
        problems.append(f"retryStrategy.evaluateOnExit: {len(rules)} entries, the limit is {most}")
    for i, rule in enumerate(rules):
        if not re.fullmatch(r"\d+\*?|\*", rule.get("onExitCode", "0")):
            problems.append(f"retryStrategy.evaluateOnExit[{i}].onExitCode: only digits and a final '*'")
        for key in ("onReason", "onStatusReason"):
            if not re.fullmatch(r"[A-Za-z0-9.: \t]*\*?", rule.get(key, "")) or len(rule.get(key, "")) > 512:
                problems.append(f"retryStrategy.evaluateOnExit[{i}].{key}: letters, digits, '.', ':', spaces, "
                                "a final '*', up to 512 characters")
    if rules and rules[-1] != {"onReason": "*", "action": "EXIT"}:
        # "If none of the listed conditions match, then the job is retried": a bad spec would be retried.
        problems.append("retryStrategy.evaluateOnExit: must end with {onReason: '*', action: EXIT}")
    return problems


def _enum_problems(value, shape, where: str) -> list[str]:
    if shape.type_name == "structure" and isinstance(value, dict):
        return [p for key, item in value.items() if key in shape.members
                for p in _enum_problems(item, shape.members[key], f"{where}.{key}".lstrip("."))]
    if shape.type_name == "list" and isinstance(value, list):
        return [p for i, item in enumerate(value) for p in _enum_problems(item, shape.member, f"{where}[{i}]")]
    enum = shape.metadata.get("enum")
    if enum and isinstance(value, str) and value not in enum and value.upper() not in enum:
        return [f"{where}: {value!r} is not one of {', '.join(enum)}"]
    return []


def aws_job() -> dict:
    return json.loads((EXAMPLES / "aws-batch-job-definition.json").read_text())


def test_aws_batch_job_definition_is_accepted_and_maps_the_exit_codes():
    job = aws_job()
    assert aws_batch_problems(job) == []
    assert IMAGE.search(job["containerProperties"]["image"])
    rules = job["retryStrategy"]["evaluateOnExit"]
    retried = {r["onExitCode"] for r in rules if r["action"] == "RETRY" and "onExitCode" in r}
    assert retried == {"75", "4"} and any(r.get("onStatusReason", "").startswith("Host EC2") for r in rules)
    assert rules[-1] == {"onReason": "*", "action": "EXIT"}  # 2, 3 and 1 stop at once
    assert not any("hf_" in json.dumps(e) for e in job["containerProperties"]["environment"])


def test_aws_batch_multinode_job_is_accepted_and_every_node_runs_the_same_command():
    """Several nodes (docs/operations.md): one container for every node, the launcher finds its node from AWS
    Batch's variables; a lost node's exit 75 is retried like a preemption."""
    job = json.loads((EXAMPLES / "aws-batch-multinode.json").read_text())
    assert aws_batch_problems(job) == []
    assert job["type"] == "multinode" and job["nodeProperties"]["numNodes"] == 2
    (only,) = job["nodeProperties"]["nodeRangeProperties"]
    assert only["targetNodes"] == "0:1" and IMAGE.search(only["container"]["image"])
    assert {"name": "PEFTOPT_NPROC", "value": "auto"} in only["container"]["environment"]
    assert job["retryStrategy"] == aws_job()["retryStrategy"]


@pytest.mark.parametrize("fault, expected", [
    (lambda j: j["retryStrategy"]["evaluateOnExit"].insert(0, {"onExitCode": "2", "action": "EXIT"}) or
     j["retryStrategy"]["evaluateOnExit"].insert(0, {"onExitCode": "3", "action": "EXIT"}), "the limit is 5"),
    (lambda j: j["retryStrategy"].update(attempts=11), "outside 1..10"),
    (lambda j: j["retryStrategy"]["evaluateOnExit"][0].update(action="RESTART"), "is not one of RETRY, EXIT"),
    (lambda j: j["retryStrategy"]["evaluateOnExit"][0].update(onExitCode="7[0-9]"), "only digits"),
    (lambda j: j["retryStrategy"]["evaluateOnExit"].pop(), "must end with"),
    (lambda j: j["containerProperties"].update(gpus=1), "Unknown parameter in containerProperties: \"gpus\""),
    (lambda j: j["containerProperties"]["resourceRequirements"][0].update(value=1), "containerProperties.resourceRequirements[0].value"),
    (lambda j: j["containerProperties"]["resourceRequirements"][0].update(type="GPUS"), "is not one of GPU"),
])
def test_aws_batch_check_refuses_what_the_service_refuses(fault, expected):
    job = aws_job()
    fault(job)
    problems = aws_batch_problems(job)
    assert any(expected in p for p in problems), problems


# ------------------------------------------------------------------------------ GCP Batch


def gcp_job_text() -> str:
    return (EXAMPLES / "gcp-batch-job.json").read_text()


def parse_gcp_job(text: str):
    """GCP Batch's own types (google-cloud-batch); an unknown field or enum value raises ParseError."""
    from google.cloud import batch_v1

    return batch_v1.Job.from_json(text, ignore_unknown_fields=False)


def test_gcp_batch_job_parses_strictly_and_maps_the_exit_codes():
    from google.cloud import batch_v1

    job = parse_gcp_job(gcp_job_text())
    spec = job.task_groups[0].task_spec
    assert IMAGE.search(spec.runnables[0].container.image_uri)
    policies = {p.action: set(p.action_condition.exit_codes) for p in spec.lifecycle_policies}
    Action = batch_v1.LifecyclePolicy.Action
    assert policies[Action.RETRY_TASK] == {75, 4} and policies[Action.FAIL_TASK] == {2, 3}
    assert 0 < spec.max_retry_count <= 10
    assert job.allocation_policy.instances[0].policy.provisioning_model == batch_v1.AllocationPolicy.ProvisioningModel.SPOT


def test_gcp_batch_multinode_job_parses_and_asks_for_the_hosts_file():
    job = parse_gcp_job((EXAMPLES / "gcp-batch-multinode.json").read_text())
    group = job.task_groups[0]
    assert group.task_count == 2 and group.parallelism == 2 and group.require_hosts_file
    assert group.task_spec.runnables[0].environment.variables["PEFTOPT_NPROC"] == "auto"
    assert group.task_spec.volumes[0].nfs.server  # the nodes share the run directory (docs/operations.md)


@pytest.mark.parametrize("fault, expected", [
    (lambda j: j["taskGroups"][0]["taskSpec"].update(maxRetryCounts=3), 'no field named "maxRetryCounts"'),
    (lambda j: j["taskGroups"][0]["taskSpec"]["lifecyclePolicies"][0].update(action="RETRY"), "Invalid enum value RETRY"),
    (lambda j: j["taskGroups"][0]["taskSpec"]["lifecyclePolicies"][0]["actionCondition"].update(exitCodes=["exit-75"]),
     "exitCodes"),
])
def test_gcp_batch_check_refuses_unknown_fields_and_values(fault, expected):
    from google.protobuf.json_format import ParseError

    job = json.loads(gcp_job_text())
    fault(job)
    with pytest.raises(ParseError, match=re.escape(expected)):
        parse_gcp_job(json.dumps(job))


# ------------------------------------------------------------------------------ Kubernetes

SUPPORTED_FROM = Version("1.31")  # the oldest minor version a managed Kubernetes still supports


def kubernetes_versions() -> list[str]:
    from kubernetes_validate.utils import all_versions

    versions = [v for v in all_versions() if Version(v) >= SUPPORTED_FROM]
    assert len(versions) >= 5, versions  # 1.31 to at least 1.35 must be there to check against
    return versions


def kubernetes_problems(manifest: dict) -> dict[str, str]:
    """Strict OpenAPI validation (unknown fields refused) against every supported minor version."""
    import kubernetes_validate

    problems = {}
    for version in kubernetes_versions():
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems[version] = f"{'.'.join(map(str, exc.path))}: {exc.message}"
    return problems


def k8s_job() -> dict:
    return yaml.safe_load((EXAMPLES / "k8s-indexed-job.yaml").read_text())


def test_kubernetes_indexed_job_is_valid_on_every_supported_version_and_maps_the_exit_codes():
    job = k8s_job()
    assert kubernetes_problems(job) == {}
    assert job["spec"]["completionMode"] == "Indexed"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail = next(r for r in rules if r["action"] == "FailJob")
    assert set(fail["onExitCodes"]["values"]) == {2, 3}
    assert any(r["action"] == "Ignore" and r.get("onPodConditions") for r in rules)
    assert any(75 in r.get("onExitCodes", {}).get("values", []) and r["action"] == "Count" for r in rules)
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert IMAGE.search(pod["containers"][0]["image"])
    assert any(m["mountPath"] == "/runs" for m in pod["containers"][0]["volumeMounts"])
    assert any("persistentVolumeClaim" in v for v in pod["volumes"])


@pytest.mark.parametrize("fault, expected", [
    (lambda j: j["spec"].update(backoffLimitPerIdx=1), "backoffLimitPerIdx"),
    (lambda j: j["spec"].update(completions="3"), "'3' is not of type 'integer'"),
    (lambda j: j["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"].update(values="2,3"), "is not of type 'array'"),
    (lambda j: j["spec"]["template"]["spec"]["containers"][0].update(resource={"limits": {}}), "resource"),
])
def test_kubernetes_check_refuses_on_every_version(fault, expected):
    job = k8s_job()
    fault(job)
    problems = kubernetes_problems(job)
    assert set(problems) == set(kubernetes_versions())
    assert all(expected in p for p in problems.values()), problems


# ------------------------------------------------------------------------------ GitHub Actions


def zizmor(path: Path) -> subprocess.CompletedProcess:
    """zizmor, a GitHub Actions security linter, offline; exit 0 means no finding."""
    binary = Path(sys.executable).with_name("zizmor")
    return subprocess.run([str(binary), "--offline", "--no-progress", "--format", "plain", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_github_actions_workflow_is_clean_and_retries_on_75_and_4():
    result = zizmor(EXAMPLES / "github-actions-gpu.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    workflow = yaml.safe_load((EXAMPLES / "github-actions-gpu.yml").read_text())
    job = workflow["jobs"]["train"]
    assert "gpu" in job["runs-on"] and "self-hosted" in job["runs-on"]
    script = job["steps"][0]["run"]
    assert "75|4)" in script and "--gpus all" in script and "${{" not in script
    assert IMAGE.search(job["steps"][0]["env"]["IMAGE"])


def test_github_actions_check_refuses_an_input_expanded_inside_run(tmp_path):
    text = (EXAMPLES / "github-actions-gpu.yml").read_text()
    injected = tmp_path / "workflow.yml"
    injected.write_text(text.replace('"$IMAGE" "$SPEC"', '"$IMAGE" "${{ inputs.spec }}"'))
    result = zizmor(injected)
    assert result.returncode != 0 and "template-injection" in result.stdout + result.stderr


# ------------------------------------------------------------------------------ lock and Dockerfile


def locked(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^([a-z0-9_.-]+)==(\S+) \\$", path.read_text(), re.M))


def test_both_locks_come_from_one_resolution_and_honour_the_pins():
    image, cpu = locked(ROOT / "requirements.lock"), locked(ROOT / "docker" / "requirements-cpu.lock")
    assert {k: cpu[k] for k in image.keys() & cpu.keys()} == {k: image[k] for k in image.keys() & cpu.keys()}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for wanted, lock in ((project["dependencies"] + extras["gpu"] + extras["demo"] + extras["tracking"], image),
                         (project["dependencies"] + extras["demo"] + extras["test"] + extras["tracking"], cpu)):
        for line in wanted:
            name, version = line.split("==")
            if lock is cpu and name == "torch":
                continue  # installed first from its CPU wheel (Makefile)
            assert lock[name.lower().replace("_", "-")] == version, name
    assert not any(k.startswith(("nvidia-", "cuda-")) or k in ("torch", "triton", "unsloth") for k in cpu)
    assert all(line.strip().startswith(("--hash=sha256:", "#")) or "==" in line
               for line in (ROOT / "requirements.lock").read_text().splitlines()[2:] if line.strip())


def test_dockerfile_contract():
    text = (ROOT / "Dockerfile").read_text()
    assert "latest" not in text
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms == ["${BASE_IMAGE} AS llama-cpp".split()[0]] * 2  # one base image, a build argument
    assert "docker/build-llama-cpp.sh" in text and "/opt/llama.cpp" in text
    assert re.search(r"^USER 1000", text, re.M) and "gcc" in text and "HF_HOME=" in text
    assert "requirements.lock" in text and "--require-hashes" in (ROOT / "docker" / "install-locked.sh").read_text()
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "--"', text, re.M)  # signals reach peftopt
    # A change under job/ rebuilds only what follows it: the heavy layers come first.
    assert text.index("install-locked.sh") < text.index("COPY --from=llama-cpp") < text.index("COPY job")
    assert (ROOT / ".dockerignore").exists()


def test_kubernetes_jobset_runs_each_node_with_the_variables_peftopt_reads():
    """Several nodes on Kubernetes (a JobSet: the CRD's own fields are checked here, its Job template against
    Kubernetes' schema): the pods' environment, with the completion index the downward API gives pod 1, is what
    job/nodes.py turns into node 1 of 2 with pod 0 as the main node."""
    from job import nodes, settings

    jobset = yaml.safe_load((EXAMPLES / "k8s-jobset-multinode.yaml").read_text())
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
    assert jobset["spec"]["network"]["enableDNSHostnames"] is True
    (replicated,) = jobset["spec"]["replicatedJobs"]
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "node"}, "spec": replicated["template"]["spec"]}
    assert kubernetes_problems(job) == {}
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    container = spec["template"]["spec"]["containers"][0]
    assert IMAGE.search(container["image"])
    env = {e["name"]: e for e in container["env"]}
    assert env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    main = f"{jobset['metadata']['name']}-{replicated['name']}-0-0.{jobset['metadata']['name']}"
    assert env["PET_MASTER_ADDR"]["value"] == main  # JobSet's pod hostname and subdomain
    values = {name: e["value"] for name, e in env.items() if "value" in e} | {"PET_NODE_RANK": "1"}
    found = nodes.from_settings(settings.load(values))
    assert (found.count, found.rank, found.main) == (int(env["PET_NNODES"]["value"]), 1, main)
    assert found.port == int(env["PET_MASTER_PORT"]["value"])
