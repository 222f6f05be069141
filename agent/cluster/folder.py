"""The cluster folder (<home>/cluster): this box's node id, its cluster's certificates and etcd data, and the files
that let a restart come back the way it left (the voters' client URLs, the client-only mark).

Every function here touches the disk and blocks; the node calls them through `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import time
from pathlib import Path

from agent.atomic import atomic_write_bytes
from agent.cluster.pki import ClusterCA, Identity, NodeKey, make_csr, read_identity, write_identity
from agent.settings import Settings

NODE_ID_FILE = "node-id"
VOTERS_FILE = "voters.json"  # the voters' client URLs, for a box that reaches etcd through them and restarts
CLIENT_FILE = "client-only"  # present on a box beyond the fourth: it runs no etcd member of its own
# What belongs to one cluster (moved aside as a whole when the box joins another, put back if that fails).
_CLUSTER_FILES = ("etcd", "tls", "etcd.pid", "etcd.log", VOTERS_FILE, CLIENT_FILE)


def tls_dir(cluster_dir: Path) -> Path:
    return cluster_dir / "tls"


def node_id_of(settings: Settings) -> str:
    """The configured node id, else the one generated on the first start and kept in the cluster folder."""
    if settings.cluster.node_id:
        return settings.cluster.node_id
    path = settings.cluster_dir / NODE_ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        node_id = f"thox-{secrets.token_hex(4)}"
        settings.cluster_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_text(node_id + "\n")
        return node_id


def certificate_addresses(address: str) -> list[str]:
    """The IP addresses a node certificate names: the advertised one and loopback (the box's own etcd client)."""
    return sorted({address, "127.0.0.1"})


def found_cluster(settings: Settings, node_id: str, address: str) -> Identity:
    """A new cluster CA and this node's certificate, written to the cluster folder."""
    cluster_id = f"stack-{secrets.token_hex(4)}"
    ca = ClusterCA.create(cluster_id)
    key = NodeKey.create()
    cert = ca.issue(make_csr(key, node_id), node_id, certificate_addresses(address), [node_id, socket.gethostname()])
    write_identity(tls_dir(settings.cluster_dir), ca.cert_pem, cert, key, ca.key_pem)
    identity = read_identity(tls_dir(settings.cluster_dir))
    assert identity is not None  # just written
    return identity


def is_client_only(cluster_dir: Path) -> bool:
    return (cluster_dir / CLIENT_FILE).exists()


def set_client_only(cluster_dir: Path, client_only: bool) -> None:
    if client_only:
        atomic_write_bytes(cluster_dir / CLIENT_FILE, b"")
    else:
        (cluster_dir / CLIENT_FILE).unlink(missing_ok=True)


def load_voter_urls(cluster_dir: Path) -> list[str]:
    try:
        urls = json.loads((cluster_dir / VOTERS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [url for url in urls if isinstance(url, str)] if isinstance(urls, list) else []


def save_voter_urls(cluster_dir: Path, urls: list[str]) -> None:
    if urls and urls != load_voter_urls(cluster_dir):
        atomic_write_bytes(cluster_dir / VOTERS_FILE, json.dumps(urls).encode())


def retire(cluster_dir: Path) -> Path:
    """Move this box's own cluster (etcd data, certificates) aside before it joins another; returns where to."""
    previous = cluster_dir / f"previous-{int(time.time())}"
    previous.mkdir(mode=0o700)
    for name in _CLUSTER_FILES:
        if (cluster_dir / name).exists():
            (cluster_dir / name).rename(previous / name)
    return previous


def restore(cluster_dir: Path, previous: Path) -> None:
    """A join that failed after the switch puts the box's own cluster back."""
    for name in _CLUSTER_FILES:
        if (cluster_dir / name).exists():
            shutil.rmtree(cluster_dir / name) if (cluster_dir / name).is_dir() else (cluster_dir / name).unlink()
        if (previous / name).exists():
            (previous / name).rename(cluster_dir / name)
    previous.rmdir()


def remove_member_data(cluster_dir: Path) -> None:
    """Drop the etcd data of a member that could not start (a standby that failed to join)."""
    shutil.rmtree(cluster_dir / "etcd", ignore_errors=True)
