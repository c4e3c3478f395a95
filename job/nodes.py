"""Several nodes: which node this is, how many there are and where the main node's rendezvous is, from what the
batch service sets in each node's environment (read in job/settings.py, like every variable).

- AWS Batch multi-node parallel jobs: AWS_BATCH_JOB_NUM_NODES, AWS_BATCH_JOB_NODE_INDEX,
  AWS_BATCH_JOB_MAIN_NODE_INDEX; the other nodes get AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS, the main node
  listens on its own host name's address.
- Kubernetes (Kubeflow Trainer's torch runtime, JobSet): PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR,
  PET_MASTER_PORT.
- GCP Batch with `requireHostsFile`: BATCH_TASK_COUNT, BATCH_TASK_INDEX and BATCH_HOSTS_FILE (one host per line,
  task 0's first). Without a hosts file BATCH_TASK_INDEX is a sweep's index, not a node's.

The node whose rank is 0 serves the rendezvous on the main address only (never on every interface); every node's
`peftopt run --nproc N` starts its N ranks with global ranks node * N + local rank.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from job.errors import SpecError


@dataclass(frozen=True)
class Nodes:
    service: str
    count: int
    rank: int  # 0: the main node, whose rank 0 serves the rendezvous
    main: str  # the main node's address as the service gives it (a host name or an IP address)
    port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_settings(settings) -> Nodes | None:
    """The nodes of this job, or None on one node.

    Raises:
        SpecError: the service's variables are there but incomplete or inconsistent (named).
    """
    if settings.aws_batch_job_num_nodes is not None and settings.aws_batch_job_num_nodes > 1:
        count = settings.aws_batch_job_num_nodes
        index, main_index = settings.aws_batch_job_node_index, settings.aws_batch_job_main_node_index
        if index is None or main_index is None:
            raise SpecError("AWS Batch multi-node job: AWS_BATCH_JOB_NODE_INDEX and AWS_BATCH_JOB_MAIN_NODE_INDEX "
                            "must both be set")
        _check_index("AWS_BATCH_JOB_NODE_INDEX", index, count)
        _check_index("AWS_BATCH_JOB_MAIN_NODE_INDEX", main_index, count)
        rank = (index - main_index) % count
        main = settings.aws_batch_job_main_node_private_ipv4_address
        if rank == 0:
            main = socket.gethostname()  # AWS gives the main node no address of its own
        elif not main:
            raise SpecError("AWS Batch multi-node job: AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS is not set on "
                            f"node {index}")
        return Nodes("aws-batch", count, rank, main, settings.rendezvous_port)
    if settings.pet_nnodes is not None and settings.pet_nnodes > 1:
        if settings.pet_node_rank is None or not settings.pet_master_addr:
            raise SpecError("Kubernetes multi-node job: PET_NODE_RANK and PET_MASTER_ADDR must be set with PET_NNODES")
        _check_index("PET_NODE_RANK", settings.pet_node_rank, settings.pet_nnodes)
        return Nodes("kubernetes", settings.pet_nnodes, settings.pet_node_rank, settings.pet_master_addr,
                     settings.pet_master_port or settings.rendezvous_port)
    if settings.batch_hosts_file:
        count, index = settings.batch_task_count, settings.batch_task_index
        if count is None or index is None:
            raise SpecError("GCP Batch multi-node job: BATCH_TASK_COUNT and BATCH_TASK_INDEX must be set with "
                            "BATCH_HOSTS_FILE")
        if count == 1:
            return None
        _check_index("BATCH_TASK_INDEX", index, count)
        hosts = _hosts(Path(settings.batch_hosts_file))
        if len(hosts) < count:
            raise SpecError(f"BATCH_HOSTS_FILE: {len(hosts)} hosts listed for BATCH_TASK_COUNT={count}")
        return Nodes("gcp-batch", count, index, hosts[0], settings.rendezvous_port)
    return None


def _check_index(name: str, value: int, count: int) -> None:
    if not 0 <= value < count:
        raise SpecError(f"{name}={value} is not a node of {count}")


def _hosts(path: Path) -> list[str]:
    from job.inputs import read_regular_file

    try:  # a regular file of at most 1 MB (a FIFO or a device is refused, never waited on)
        text = read_regular_file(path, 1_000_000, "BATCH_HOSTS_FILE").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"BATCH_HOSTS_FILE: cannot read {path}: {exc}") from None
    hosts = [line.split()[0] for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    for host in hosts:
        if len(host) > 253 or not all(c.isalnum() or c in ".-:_" for c in host):
            raise SpecError(f"BATCH_HOSTS_FILE: {host[:60]!r} is not a host name or address")
    return hosts


def address(host: str) -> str:
    """The IPv4 address of `host` (an address stays as it is).

    Raises:
        SpecError: the name does not resolve.
    """
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError) as exc:
        raise SpecError(f"the main node's address {host[:100]!r} does not resolve: {exc}") from None


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback
