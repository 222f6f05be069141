"""Fixtures for cluster tests: free loopback ports, throwaway cluster CAs (the agent's own PKI) on disk, and
stacks of real agents."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.cluster.etcd_config import PeerTls
from agent.cluster.pki import ClusterCA, NodeKey, make_csr
from tests.agent.cluster.stack import start_box
from tests.agent_process import CALL_FAILED, RunningAgent


@pytest.fixture
def free_ports() -> Callable[[int], list[int]]:
    """Hand out n distinct loopback ports that were free a moment ago (all held open until all are chosen)."""

    def take(count: int) -> list[int]:
        with ExitStack() as stack:
            socks = [stack.enter_context(socket.socket()) for _ in range(count)]
            for sock in socks:
                sock.bind(("127.0.0.1", 0))
            return [int(sock.getsockname()[1]) for sock in socks]

    return take


@dataclass
class TestCa:
    """A cluster CA in a folder, issuing node certificates (server and client use, as etcd peers need)."""

    __test__ = False  # not a test class, whatever its name

    directory: Path
    ca: ClusterCA

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    @classmethod
    def create(cls, directory: Path, cluster_id: str) -> TestCa:
        directory.mkdir(parents=True, exist_ok=True)
        ca = ClusterCA.create(cluster_id)
        (directory / "ca.crt").write_bytes(ca.cert_pem)
        return cls(directory, ca)

    def issue(self, node: str, host: str = "127.0.0.1") -> PeerTls:
        """A node certificate (CN = node id, SAN = its address and id) and its key, as files."""
        key = NodeKey.create()
        cert_file, key_file = self.directory / f"{node}.crt", self.directory / f"{node}.key"
        cert_file.write_bytes(self.ca.issue(make_csr(key, node), node, [host], [node]))
        key_file.write_bytes(key)
        key_file.chmod(0o600)
        return PeerTls(ca=self.ca_file, cert=cert_file, key=key_file)


@pytest.fixture(scope="session")
def cluster_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCa:
    """The stack's CA: members with its certificates may talk to each other."""
    return TestCa.create(tmp_path_factory.mktemp("cluster-ca"), "test-cluster")


@pytest.fixture(scope="session")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCa:
    """A different CA, as a box from another stack (or an attacker) would hold."""
    return TestCa.create(tmp_path_factory.mktemp("other-ca"), "other-cluster")


@pytest.fixture
def boxes(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., RunningAgent]]:
    """Start real agents with the cluster layer on (`boxes(name, env)`); all are SIGKILLed at the end (after
    printing the end of each box's log into the report of a failed test)."""
    started: list[RunningAgent] = []

    def box(name: str, extra: dict[str, str] | None = None) -> RunningAgent:
        started.append(start_box(tmp_path, name, extra))
        return started[-1]

    try:
        yield box
    finally:
        if request.node.stash.get(CALL_FAILED, False):
            for agent in started:
                request.node.add_report_section("teardown", f"log of {agent.home.name}", agent.log_tail())
        for agent in started:
            if agent.process.poll() is None:
                agent.process.send_signal(signal.SIGKILL)  # a whole stack stopping politely takes seconds each
            agent.process.wait(30)
