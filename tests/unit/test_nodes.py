"""Unit: which node this is, how many there are and where the main node's rendezvous is, from each batch
service's own variables (job/nodes.py); incomplete or inconsistent sets are one-line errors naming the variable."""
import os
import socket

import pytest

from job import nodes
from job.errors import SpecError
from job.settings import load


def of(**environ) -> nodes.Nodes | None:
    return nodes.from_settings(load({k: str(v) for k, v in environ.items()}))


def test_one_node_without_any_service_variable():
    assert of() is None
    assert of(PET_NNODES=1, PET_NODE_RANK=0, PET_MASTER_ADDR="x") is None
    assert of(AWS_BATCH_JOB_NUM_NODES=1) is None
    assert of(BATCH_TASK_INDEX=3) is None  # a sweep's index, not a node's


def test_aws_batch_ranks_nodes_from_the_main_one_and_gives_the_others_its_address():
    main = of(AWS_BATCH_JOB_NUM_NODES=3, AWS_BATCH_JOB_NODE_INDEX=1, AWS_BATCH_JOB_MAIN_NODE_INDEX=1)
    assert (main.service, main.count, main.rank, main.main) == ("aws-batch", 3, 0, socket.gethostname())
    child = of(AWS_BATCH_JOB_NUM_NODES=3, AWS_BATCH_JOB_NODE_INDEX=0, AWS_BATCH_JOB_MAIN_NODE_INDEX=1,
               AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS="10.0.0.7")
    assert (child.rank, child.main, child.port) == (2, "10.0.0.7", 29500)
    with pytest.raises(SpecError, match="AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS"):
        of(AWS_BATCH_JOB_NUM_NODES=2, AWS_BATCH_JOB_NODE_INDEX=1, AWS_BATCH_JOB_MAIN_NODE_INDEX=0)
    with pytest.raises(SpecError, match="AWS_BATCH_JOB_NODE_INDEX=5 is not a node of 2"):
        of(AWS_BATCH_JOB_NUM_NODES=2, AWS_BATCH_JOB_NODE_INDEX=5, AWS_BATCH_JOB_MAIN_NODE_INDEX=0)


def test_kubernetes_pet_variables():
    node = of(PET_NNODES=4, PET_NODE_RANK=2, PET_MASTER_ADDR="job-node-0-0.job", PET_MASTER_PORT=23456)
    assert (node.service, node.count, node.rank, node.main, node.port) == ("kubernetes", 4, 2, "job-node-0-0.job", 23456)
    assert of(PET_NNODES=2, PET_NODE_RANK=0, PET_MASTER_ADDR="a", PEFTOPT_RENDEZVOUS_PORT=4000).port == 4000
    with pytest.raises(SpecError, match="PET_NODE_RANK and PET_MASTER_ADDR"):
        of(PET_NNODES=2, PET_NODE_RANK=1)


def test_gcp_batch_reads_the_hosts_file(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("10.128.0.5 task-0\n10.128.0.6 task-1\n")
    node = of(BATCH_HOSTS_FILE=hosts, BATCH_TASK_COUNT=2, BATCH_TASK_INDEX=1)
    assert (node.service, node.count, node.rank, node.main) == ("gcp-batch", 2, 1, "10.128.0.5")
    assert load({"BATCH_HOSTS_FILE": str(hosts), "BATCH_TASK_INDEX": "1"}).array_index() is None  # not a sweep's
    assert load({"BATCH_TASK_INDEX": "1"}).array_index() == ("BATCH_TASK_INDEX", 1)
    with pytest.raises(SpecError, match="1 hosts listed for BATCH_TASK_COUNT=2"):
        hosts.write_text("10.128.0.5\n")
        of(BATCH_HOSTS_FILE=hosts, BATCH_TASK_COUNT=2, BATCH_TASK_INDEX=0)
    with pytest.raises(SpecError, match="is not a host name or address"):
        hosts.write_text("$(curl evil)\n10.0.0.1\n")
        of(BATCH_HOSTS_FILE=hosts, BATCH_TASK_COUNT=2, BATCH_TASK_INDEX=0)
    with pytest.raises(SpecError, match="BATCH_HOSTS_FILE"):
        of(BATCH_HOSTS_FILE=tmp_path / "missing", BATCH_TASK_COUNT=2, BATCH_TASK_INDEX=0)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(SpecError, match="FIFO"):  # refused at once, not waited on
        of(BATCH_HOSTS_FILE=fifo, BATCH_TASK_COUNT=2, BATCH_TASK_INDEX=0)


def test_addresses_resolve_once_and_a_name_that_does_not_is_named():
    assert nodes.address("127.0.0.1") == "127.0.0.1"
    assert nodes.is_loopback(nodes.address("localhost"))
    with pytest.raises(SpecError, match="does not resolve"):
        nodes.address("no-such-host.invalid")


@pytest.mark.parametrize("name", ["../outside.jsonl", "/etc/passwd", "data/../../outside", ""])
def test_a_file_rank_0_names_outside_the_run_directory_is_refused(tmp_path, name):
    from job import distributed
    from job.errors import ExternalError

    with pytest.raises(ExternalError, match="outside the run directory"):
        distributed._inside(tmp_path, name)
    assert distributed._inside(tmp_path, "data/train.jsonl") == tmp_path / "data" / "train.jsonl"


def test_the_listing_of_what_rank_0_sends_leaves_links_and_partial_files_out(tmp_path):
    from job import distributed

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"a": 1}\n')
    (tmp_path / "data" / ".eval.jsonl.123.partial").write_text("half")
    (tmp_path / "data" / "secret").symlink_to("/etc/hostname")
    (tmp_path / "data" / "elsewhere").symlink_to(tmp_path.parent, target_is_directory=True)
    listing = distributed._listing(tmp_path, ["data", "base"])
    assert [row[0] for row in listing] == ["data/train.jsonl"]
    assert listing[0][1] == 9 and len(listing[0][2]) == 64
