"""Unit: how many threads llama.cpp gets (physical cores, capped by a container's CPU quota)."""
import os

from job import llamacpp


def test_cgroup_quota_is_read_and_rounded_up(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    for text, want in (("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000\n", 1),
                       ("max 100000\n", None), ("garbage\n", None)):
        cpu_max.write_text(text)
        assert llamacpp.cgroup_cpu_quota(cpu_max) == want, text
    assert llamacpp.cgroup_cpu_quota(tmp_path / "missing") is None


def test_threads_are_physical_cores_within_the_affinity_and_the_quota(monkeypatch):
    allowed = os.sched_getaffinity(0)
    siblings = {open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read().strip() for c in allowed}
    monkeypatch.setattr(llamacpp, "cgroup_cpu_quota", lambda: None)
    assert llamacpp.physical_cores() == len(siblings) <= len(allowed)
    monkeypatch.setattr(llamacpp, "cgroup_cpu_quota", lambda: 1)
    assert llamacpp.physical_cores() == 1
