"""How one box runs its etcd member: ports, data dir, TLS files, timing and limits, as etcd command-line flags.

Configuration only; `agent.cluster.etcd` starts and supervises the process, `agent.cluster.etcd_members` talks to
it.
"""

from __future__ import annotations

import ipaddress
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

from agent.cluster.net import url_host

DEFAULT_PEER_PORT = 5383  # docs/cluster.md
DEFAULT_CLIENT_PORT = 5384

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# etcd 3.4 refuses to start on any GOARCH but amd64 and ppc64le unless ETCD_UNSUPPORTED_ARCH names the running one;
# Jetson boxes are arm64, where Debian's etcd-server otherwise exits at once.
_GOARCH = {
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i686": "386",
    "i386": "386",
    "riscv64": "riscv64",
    "s390x": "s390x",
    "x86_64": "amd64",
    "ppc64le": "ppc64le",
}


@dataclass(frozen=True)
class PeerTls:
    """PEM files for peer mutual TLS: the cluster CA, this node's certificate (server and client use) and its key."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class EtcdConfig:
    """How one box runs its etcd member."""

    name: str  # the node id; etcd's member name, also used in --initial-cluster strings
    data_dir: Path  # under the agent's home; etcd.log and etcd.pid live beside it
    peer_host: str  # the address other members reach this one at (an IP, or a name they resolve)
    tls: PeerTls
    peer_port: int = DEFAULT_PEER_PORT
    # This box's agent reaches its member on 127.0.0.1, over mutual TLS like everything else: on a shared box a
    # plain loopback port would let any local user write cluster state. Other boxes see the stack through the
    # agents' own authenticated APIs.
    client_port: int = DEFAULT_CLIENT_PORT
    # Boxes whose member cannot serve them (a learner answers no writes or linearizable reads; boxes beyond the
    # one learner etcd 3.4 allows run no member) reach a voter's client API over mutual TLS on this port.
    client_tls_port: int | None = None
    # A stack is one LAN segment with sub-millisecond RTT, so the box, not the network, sets these. 50 ms
    # heartbeats and a 500 ms election timeout (etcd's recommended 10 heartbeats) tolerate nine lost heartbeats or
    # a ~450 ms WAL fsync stall on a busy eMMC/SD card; raft randomises the timeout in [500, 1000) ms, so a yanked
    # leader is replaced in well under a second instead of the 1.85 s measured with etcd's 100/1000 defaults.
    # A spurious election costs little here: etcd renews every lease on a leader change. membership.py's lease
    # TTL is derived from this election timeout.
    heartbeat_ms: int = 50
    election_ms: int = 500
    etcd_binary: str | None = None  # None: shutil.which("etcd"), looked up at start in a worker thread
    # Cluster state is topology, placement and leases: kilobytes. 128 MiB caps a runaway writer long before it
    # fills the box's disk (etcd's default is 2 GiB); periodic compaction keeps 10 minutes of history, enough for
    # a watcher to resume after a blip. etcd keeps `snapshot_count` raft entries in memory between snapshots; its
    # 3.4 default of 100 000 is sized for Kubernetes, 10 000 is plenty for us and keeps RSS small.
    quota_backend_bytes: int = 128 * 1024 * 1024
    auto_compaction_retention: str = "10m"
    snapshot_count: int = 10_000
    start_timeout_s: float = 30.0
    stop_timeout_s: float = 10.0
    request_timeout_s: float = 5.0  # per-RPC deadline of client(); etcd without quorum otherwise hangs a call
    log_max_bytes: int = 4 * 1024 * 1024  # etcd.log rotates to etcd.log.1 past this size

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"etcd member name {self.name!r} must be 1-63 letters, digits, '.', '_' or '-'")
        for label, port in (("client_port", self.client_port), ("peer_port", self.peer_port)):
            if not 0 < port < 65536:
                raise ValueError(f"etcd {label} {port} is not a TCP port (1-65535)")
        if self.election_ms < 5 * self.heartbeat_ms:
            raise ValueError(
                f"etcd election_ms ({self.election_ms}) must be at least 5 x heartbeat_ms "
                f"({self.heartbeat_ms}); etcd refuses to start otherwise"
            )

    @property
    def peer_url(self) -> str:
        """The URL other members reach this member's peer port at."""
        return f"https://{url_host(self.peer_host)}:{self.peer_port}"

    @property
    def client_url(self) -> str:
        """This member's client URL, on loopback (mutual TLS)."""
        return f"https://127.0.0.1:{self.client_port}"

    @property
    def client_tls_url(self) -> str | None:
        """This member's client URL for other boxes (mutual TLS), if it serves them."""
        if self.client_tls_port is None:
            return None
        return f"https://{url_host(self.peer_host)}:{self.client_tls_port}"

    @property
    def peer_listen_host(self) -> str:
        """Listen on the peer address itself where it is an IP (etcd binds IPs only), else on every interface."""
        try:
            return str(ipaddress.ip_address(self.peer_host.strip("[]")))
        except ValueError:
            return "0.0.0.0"

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / "etcd.log"

    @property
    def pid_file(self) -> Path:
        return self.data_dir.parent / "etcd.pid"

    def flags(self) -> list[str]:
        """The command-line flags every start of this member passes (identity, listeners, TLS, timing, limits)."""
        cfg = self
        return [
            "--name",
            cfg.name,
            "--data-dir",
            str(cfg.data_dir),
            *self._client_flags(),
            "--listen-peer-urls",
            f"https://{url_host(cfg.peer_listen_host)}:{cfg.peer_port}",
            "--initial-advertise-peer-urls",
            cfg.peer_url,
            "--peer-client-cert-auth",
            "--peer-trusted-ca-file",
            str(cfg.tls.ca),
            "--peer-cert-file",
            str(cfg.tls.cert),
            "--peer-key-file",
            str(cfg.tls.key),
            "--heartbeat-interval",
            str(cfg.heartbeat_ms),
            "--election-timeout",
            str(cfg.election_ms),
            # A box re-docked after a partition would otherwise bump the term and depose a healthy leader.
            "--pre-vote",
            "--snapshot-count",
            str(cfg.snapshot_count),
            "--max-snapshots",
            "2",
            "--max-wals",
            "2",
            "--quota-backend-bytes",
            str(cfg.quota_backend_bytes),
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            cfg.auto_compaction_retention,
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]

    def _client_flags(self) -> list[str]:
        cfg = self
        listen, advertise = [cfg.client_url], cfg.client_url
        if cfg.client_tls_url is not None:
            listen.append(f"https://{url_host(cfg.peer_listen_host)}:{cfg.client_tls_port}")
            advertise = cfg.client_tls_url  # the loopback URL means nothing to another box
        # --client-cert-auth applies to every client listener: no certificate from the cluster CA, no handshake.
        return [
            "--listen-client-urls",
            ",".join(listen),
            "--advertise-client-urls",
            advertise,
            "--cert-file",
            str(cfg.tls.cert),
            "--key-file",
            str(cfg.tls.key),
            "--client-cert-auth",
            "--trusted-ca-file",
            str(cfg.tls.ca),
        ]


def child_env() -> dict[str, str]:
    """The environment etcd runs in: the agent's, without ETCD_* flags, with what etcd 3.4 needs on this machine."""
    # ETCD_* variables are etcd flags too, and 3.4 refuses to start when one shadows a command-line flag.
    env = {key: value for key, value in os.environ.items() if not key.startswith("ETCD_")}
    goarch = _GOARCH.get(platform.machine(), platform.machine())
    if goarch not in ("amd64", "ppc64le"):
        env["ETCD_UNSUPPORTED_ARCH"] = goarch
    # etcd is mostly idle; two OS threads running Go code are plenty and leave the other cores to inference.
    env["GOMAXPROCS"] = "2"
    return env
