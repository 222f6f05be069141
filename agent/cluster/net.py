"""Addresses: which one this box advertises to the others, and writing them into URLs and host:port strings."""

from __future__ import annotations

import socket

from agent.settings import Settings


def url_host(host: str) -> str:
    """A host as it appears in a URL: an IPv6 literal in brackets, anything else as it is."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def host_port(host: str, port: int) -> str:
    """'10.0.0.5:5382', '[fd00::5]:5382'."""
    return f"{url_host(host)}:{port}"


def _first_lan_address() -> str:
    """The address the default route leaves from (no packet is sent), or loopback on a box without a network."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere, only used to pick the interface
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def advertise_address(settings: Settings) -> str:
    """The address other boxes reach this one at (blocking: may consult the routing table)."""
    if settings.cluster.advertise:
        return settings.cluster.advertise
    if settings.bind_host not in ("0.0.0.0", "::"):  # noqa: S104 - comparing, not binding
        return settings.bind_host
    return _first_lan_address()
