"""Writing addresses into URLs and host:port strings (IPv6 literals need brackets there)."""

from __future__ import annotations


def url_host(host: str) -> str:
    """A host as it appears in a URL: an IPv6 literal in brackets, anything else as it is."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def host_port(host: str, port: int) -> str:
    """'10.0.0.5:5382', '[fd00::5]:5382'."""
    return f"{url_host(host)}:{port}"
