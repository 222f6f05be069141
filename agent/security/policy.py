"""Who may talk to the agent: address classes, the `api.allow` list, the `api.auth` policy and Host/Origin checks.

Everything here is pure (no I/O, no aiohttp) so that the request middleware stays a thin sequence of calls:

1. `HostCheck.check(Host, Origin)`  -> 403 when the request was aimed at another name (DNS rebinding, cross-site);
2. `AllowList.allows(peer)`         -> 403 for source addresses outside `api.allow`;
3. `needs_key(api.auth, peer)`      -> whether a Bearer key is required (401 without a valid one).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

from agent.errors import ThoxError

ClientClass = Literal["loopback", "private", "public"]
AuthPolicy = Literal["remote", "always", "off"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

AUTH_POLICIES: tuple[str, ...] = get_args(AuthPolicy)
DEFAULT_ALLOW: tuple[str, ...] = ("loopback", "private")
ALLOW_KEYWORDS: tuple[str, ...] = ("loopback", "private", "public", "any")

# Names every device answers to, whatever its hostname.
BUILTIN_NAMES: tuple[str, ...] = ("localhost", "thox.local")
_LOOPBACK: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
# An explicit list rather than `ipaddress.is_private`: that property also covers documentation and benchmark
# ranges and has changed between Python releases (3.12.4 and 3.13 rewrote it); a security boundary must not move
# with the interpreter.
_PRIVATE: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(net)
    for net in (
        "10.0.0.0/8",  # RFC 1918
        "172.16.0.0/12",  # RFC 1918
        "192.168.0.0/16",  # RFC 1918
        "169.254.0.0/16",  # IPv4 link-local (a laptop cabled straight to the box, no DHCP)
        # RFC 6598 shared space: not routable on the internet; it is where Tailscale puts its peers.
        "100.64.0.0/10",
        "fc00::/7",  # IPv6 unique local
        "fe80::/10",  # IPv6 link-local
    )
)


class PolicyError(ThoxError, ValueError):
    """A setting or an address that the security policy cannot use; the message names the entry and the fix."""


def parse_address(address: str) -> IPAddress:
    """A peer address as an IP, with any IPv6 zone (`%eth0`) dropped and IPv4-mapped IPv6 turned into IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        raise PolicyError(f"{address!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; they must be judged as the IPv4 they are.
        return ip.ipv4_mapped
    return ip


def _in_any(ip: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    return any(ip.version == net.version and ip in net for net in networks)


def client_class(address: str) -> ClientClass:
    """Classify a peer address as loopback, private (LAN, link-local, ULA, CGNAT) or public."""
    ip = parse_address(address)
    if _in_any(ip, _LOOPBACK):
        return "loopback"
    if _in_any(ip, _PRIVATE):
        return "private"
    return "public"


@dataclass(frozen=True)
class AllowList:
    """The parsed `api.allow` setting: class keywords and networks a client's source address must fall in."""

    classes: frozenset[str]
    networks: tuple[IPNetwork, ...]

    @classmethod
    def parse(cls, entries: str | Iterable[str], *, setting: str = "api.allow") -> AllowList:
        """Parse keywords (loopback, private, public, any), addresses and CIDR networks; raise PolicyError."""
        items = entries.split(",") if isinstance(entries, str) else list(entries)
        classes: set[str] = set()
        networks: list[IPNetwork] = []
        for index, raw in enumerate(items):
            if not isinstance(raw, str):
                raise PolicyError(f"{setting}[{index}]: expected a string, got {type(raw).__name__}")
            entry = raw.strip().lower()
            if not entry:
                raise PolicyError(f"{setting}[{index}]: empty entry")
            if entry in ALLOW_KEYWORDS:
                classes.add(entry)
                continue
            networks.append(_parse_network(entry, f"{setting}[{index}]"))
        if not classes and not networks:
            raise PolicyError(
                f"{setting} is empty, so no client at all could connect (not even this device's own `thox` "
                f"commands); use the default {list(DEFAULT_ALLOW)} or name the networks to allow"
            )
        return cls(frozenset(classes), tuple(networks))

    @classmethod
    def default(cls) -> AllowList:
        """Loopback and private ranges: the product's default."""
        return cls.parse(DEFAULT_ALLOW)

    def allows(self, address: str) -> bool:
        """Whether a peer at `address` may connect; an address that does not parse is refused."""
        if "any" in self.classes:
            return True
        try:
            ip = parse_address(address)
        except PolicyError:
            return False
        if client_class(str(ip)) in self.classes:
            return True
        return _in_any(ip, self.networks)


def _parse_network(entry: str, where: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(entry, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            words = ", ".join(ALLOW_KEYWORDS)
            raise PolicyError(
                f"{where}: {entry!r} is neither a keyword ({words}) nor an IP address or network "
                f"such as 192.168.1.0/24 or fd00::/8 ({exc})"
            ) from None
        raise PolicyError(f"{where}: {entry!r} has host bits set; did you mean {loose}?") from None


def parse_auth_policy(value: str, *, setting: str = "api.auth") -> AuthPolicy:
    """Validate an `api.auth` value (remote, always, off)."""
    normalized = value.strip().lower()
    if normalized == "remote":
        return "remote"
    if normalized == "always":
        return "always"
    if normalized == "off":
        return "off"
    raise PolicyError(
        f"{setting}: {value!r} is not a policy; use remote (keys for everyone but this device itself), "
        f"always (keys for everyone) or off (no keys)"
    )


def needs_key(policy: AuthPolicy, address: str) -> bool:
    """Whether a request from `address` must carry a valid API key under `policy`; unparseable peers always do."""
    if policy == "off":
        return False
    if policy == "always":
        return True
    if policy != "remote":
        raise PolicyError(f"unknown auth policy {policy!r}; expected one of {', '.join(AUTH_POLICIES)}")
    try:
        return client_class(address) != "loopback"
    except PolicyError:
        return True


# A DNS name as browsers send it in Host/Origin: LDH labels (underscores tolerated, some LAN names have them).
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")


class _Refused(ThoxError):
    pass


def _split_authority(value: str, what: str) -> tuple[str | IPAddress, int | None]:
    """`host[:port]` or `[v6][:port]` -> (lower-case name or IP, port or None); raises _Refused."""
    if not value or any(ch.isspace() for ch in value):
        raise _Refused(f"{what} {value!r} is not a host name or address")
    port_text: str | None = None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise _Refused(f"{what} {value!r} has an unclosed IPv6 bracket")
        inner, rest = value[1:end], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise _Refused(f"{what} {value!r} has text after the IPv6 address")
            port_text = rest[1:]
        # Zone ids ([fe80::1%25eth0]) are refused too: browsers never send them.
        try:
            host: str | IPAddress = ipaddress.IPv6Address(inner if "%" not in inner else "")
        except ValueError:
            raise _Refused(f"{what} {value!r} is not a valid IPv6 address") from None
    else:
        if value.count(":") > 1:
            raise _Refused(f"{what} {value!r}: an IPv6 address must be written in brackets, e.g. [::1]:8080")
        name, sep, port = value.partition(":")
        if sep:
            port_text = port
        name = name.lower()
        if name.endswith("."):
            name = name[:-1]  # "thox.local." is the same name written fully qualified
        try:
            host = ipaddress.IPv4Address(name)
        except ValueError:
            if not _NAME.match(name):
                raise _Refused(f"{what} {value!r} is not a host name or address") from None
            host = name
    port_number: int | None = None
    if port_text is not None:
        if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise _Refused(f"{what} {value!r} has an invalid port {port_text!r}")
        port_number = int(port_text)
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        host = host.ipv4_mapped
    return host, port_number


class HostCheck:
    """Refuses requests whose Host (or browser Origin) does not name this device: the DNS-rebinding defence.

    Why it works: in a DNS-rebinding attack a page on evil.example makes its own name resolve to this device
    (127.0.0.1 or its LAN address) and then calls "its own" origin, so the browser lets the page read the answers
    and the request passes any address-based check. The browser still sends `Host: evil.example`, because that is
    the name it connected to, and a page cannot forge Host. Accepting only names that really are this device
    (localhost, thox.local, its hostname, hostname.local) therefore stops it. An IP literal in Host cannot be the
    product of rebinding (no DNS lookup is involved and the browser connected to exactly that address), so by default
    any IP literal is accepted: a DHCP renumbering then never locks users out; pass `allow_any_ip_host=False` to
    accept only loopback and `own_addresses`.

    The Origin check covers the other browser attack: a page on another site sending a cross-site "simple" request
    (form POST, text/plain fetch) to http://localhost:8080, which the browser sends without a CORS preflight and
    which, under `api.auth = remote`, needs no key from loopback. An Origin, when present, must name this device
    (here IP literals count only when they are loopback or one of `own_addresses`, since any page served from an
    attacker's IP carries that IP as its Origin) or be listed in `allowed_origins`. Clients that are not browsers
    send no Origin and are not affected. Ports are not compared: rebinding and cross-site requests are about names,
    and the agent serves two ports.
    """

    def __init__(
        self,
        allowed_names: Iterable[str] = (),
        own_addresses: Iterable[str] = (),
        *,
        allowed_origins: Iterable[str] = (),
        allow_any_ip_host: bool = True,
    ) -> None:
        names = set(BUILTIN_NAMES)
        for raw in allowed_names:
            name = raw.strip().lower().rstrip(".")
            if not _NAME.match(name):
                raise PolicyError(f"allowed host name {raw!r} is not a DNS name")
            names.add(name)
            if "." not in name:
                names.add(f"{name}.local")  # what mDNS (avahi) announces for hostname `name`
        self.names = frozenset(names)
        addresses: set[IPAddress] = set()
        for raw in own_addresses:
            try:
                addresses.add(parse_address(raw))
            except PolicyError:
                raise PolicyError(f"own address {raw!r} is not an IP address") from None
        self.addresses = frozenset(addresses)
        origins: set[str] = set()
        for raw in allowed_origins:
            origins.add(_normalize_origin(raw))
        self.origins = frozenset(origins)
        self.allow_any_ip_host = allow_any_ip_host

    def _is_device(self, host: str | IPAddress, *, any_ip: bool) -> bool:
        if isinstance(host, str):
            return host in self.names
        return any_ip or _in_any(host, _LOOPBACK) or host in self.addresses

    def check(self, host_header: str | None, origin_header: str | None) -> str | None:
        """None when the request may proceed, else the reason to refuse it (for a 403 message)."""
        if host_header is None or not host_header.strip():
            return "the request has no Host header; HTTP/1.1 requires one and this API refuses requests without it"
        try:
            host, _ = _split_authority(host_header.strip(), "Host")
        except _Refused as exc:
            return str(exc)
        if not self._is_device(host, any_ip=self.allow_any_ip_host):
            return (
                f"Host {host_header!r} is not a name of this device (DNS rebinding protection); "
                f"call it as http://thox.local:<port>, its hostname or its IP address"
            )
        if origin_header is None:
            return None
        return self._check_origin(origin_header)

    def _check_origin(self, origin: str) -> str | None:
        value = origin.strip()
        if value.lower() == "null":
            return "Origin 'null' (a sandboxed frame or a local file) may not call this API"
        scheme, sep, authority = value.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            return f"Origin {origin!r} is not an http(s) origin"
        if "/" in authority or "@" in authority or "?" in authority or "#" in authority:
            return f"Origin {origin!r} is not an origin (scheme://host[:port] only)"
        try:
            host, _ = _split_authority(authority, "Origin")
        except _Refused as exc:
            return str(exc)
        if self._is_device(host, any_ip=False) or _normalize_origin(value) in self.origins:
            return None
        return (
            f"Origin {origin!r} is another web site; pages from other sites may not call this API "
            f"(list trusted web apps in the allowed origins)"
        )


def _normalize_origin(origin: str) -> str:
    """Lower-case scheme and host, default port dropped, no trailing slash."""
    value = origin.strip().rstrip("/")
    scheme, sep, authority = value.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "https") or not authority:
        raise PolicyError(f"allowed origin {origin!r} must look like http://host[:port] or https://host[:port]")
    try:
        host, port = _split_authority(authority, "origin")
    except _Refused as exc:
        raise PolicyError(f"allowed origin {origin!r}: {exc}") from None
    if port == {"http": 80, "https": 443}[scheme]:
        port = None
    shown = f"[{host}]" if isinstance(host, ipaddress.IPv6Address) else str(host)
    return f"{scheme}://{shown}" + (f":{port}" if port is not None else "")
