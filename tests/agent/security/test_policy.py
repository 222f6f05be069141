"""Address classes, the allow list, the auth policy and the Host/Origin (DNS rebinding) checks, as tables."""

from __future__ import annotations

from typing import Any

import pytest

from agent.security.policy import (
    AllowList,
    HostCheck,
    PolicyError,
    client_class,
    needs_key,
    parse_address,
    parse_auth_policy,
)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),  # a dual-stack socket's view of an IPv4 loopback peer
        ("10.0.0.1", "private"),
        ("10.255.255.255", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.254", "private"),
        ("172.32.0.1", "public"),
        ("172.15.255.255", "public"),
        ("192.168.1.20", "private"),
        ("192.169.0.1", "public"),
        ("169.254.10.20", "private"),  # link-local
        ("100.64.0.1", "private"),  # CGNAT / Tailscale
        ("100.127.255.255", "private"),
        ("100.128.0.1", "public"),
        ("::ffff:192.168.1.20", "private"),
        ("::ffff:8.8.8.8", "public"),
        ("fe80::1", "private"),
        ("fe80::1%eth0", "private"),
        ("febf::1", "private"),
        ("fec0::1", "public"),
        ("fd12:3456:789a::1", "private"),  # unique local
        ("fc00::1", "private"),
        ("8.8.8.8", "public"),
        ("1.1.1.1", "public"),
        ("2001:4860:4860::8888", "public"),
        ("2002:c0a8:0101::1", "public"),  # 6to4 of 192.168.1.1 is still reached over the internet
        ("64:ff9b::c0a8:101", "public"),  # NAT64
        ("0.0.0.0", "public"),
        ("::", "public"),
        ("::127.0.0.1", "public"),  # deprecated IPv4-compatible form is not loopback
    ],
)
def test_client_class(address: str, expected: str) -> None:
    assert client_class(address) == expected


@pytest.mark.parametrize("address", ["", "localhost", "256.1.1.1", "1.2.3", "::g", "[::1]", "127.0.0.1:80"])
def test_client_class_refuses_what_is_not_an_address(address: str) -> None:
    with pytest.raises(PolicyError, match="not an IP address"):
        client_class(address)


def test_parse_address_unmaps_ipv4_and_drops_the_zone() -> None:
    assert str(parse_address("::ffff:10.1.2.3")) == "10.1.2.3"
    assert str(parse_address("fe80::1%wlan0")) == "fe80::1"


def test_default_allow_list_is_loopback_and_private() -> None:
    allow = AllowList.default()
    assert allow.allows("127.0.0.1") and allow.allows("::1")
    assert allow.allows("192.168.0.9") and allow.allows("fe80::2%eth0") and allow.allows("::ffff:10.0.0.1")
    assert not allow.allows("8.8.8.8")
    assert not allow.allows("2001:4860:4860::8888")
    assert not allow.allows("::ffff:8.8.8.8")
    assert not allow.allows("garbage")


@pytest.mark.parametrize(
    ("entries", "allowed", "refused"),
    [
        (["loopback"], ["127.0.0.1", "::1"], ["192.168.1.1", "8.8.8.8"]),
        (["loopback", "10.1.0.0/16"], ["10.1.200.3", "::ffff:10.1.0.1"], ["10.2.0.1", "192.168.1.1"]),
        (["203.0.113.7"], ["203.0.113.7"], ["203.0.113.8", "127.0.0.1"]),
        (["2001:db8::/32"], ["2001:db8:5::1"], ["2001:db9::1", "10.0.0.1"]),
        (["public"], ["8.8.8.8", "2001:4860::1"], ["127.0.0.1", "10.0.0.1"]),
        (["any"], ["8.8.8.8", "127.0.0.1", "not-even-an-ip"], []),
        (" Loopback , PRIVATE ", ["127.0.0.1", "10.0.0.1"], ["8.8.8.8"]),  # a comma-separated env value
    ],
)
def test_allow_list(entries: list[str] | str, allowed: list[str], refused: list[str]) -> None:
    allow = AllowList.parse(entries)
    assert [a for a in allowed if not allow.allows(a)] == []
    assert [a for a in refused if allow.allows(a)] == []


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "api.allow is empty"),
        (["loopback", ""], r"api.allow\[1\]: empty entry"),
        (["lan"], r"api.allow\[0\]: 'lan' is neither a keyword \(loopback, private, public, any\)"),
        (["10.1.0.1/16"], r"api.allow\[0\]: '10.1.0.1/16' has host bits set; did you mean 10.1.0.0/16\?"),
        (["loopback", "10.1.0.300/16"], r"api.allow\[1\]: '10.1.0.300/16' is neither"),
        (["fd00::/129"], r"api.allow\[0\]"),
        ([7], r"api.allow\[0\]: expected a string, got int"),
    ],
)
def test_allow_list_errors_name_the_entry(entries: list[object], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        AllowList.parse(entries)  # type: ignore[arg-type]  # non-strings on purpose: their errors are tested


@pytest.mark.parametrize(
    ("policy", "address", "expected"),
    [
        ("remote", "127.0.0.1", False),
        ("remote", "::1", False),
        ("remote", "::ffff:127.0.0.1", False),
        ("remote", "192.168.1.10", True),
        ("remote", "fe80::1", True),
        ("remote", "8.8.8.8", True),
        ("remote", "garbage", True),  # fail closed
        ("always", "127.0.0.1", True),
        ("always", "192.168.1.10", True),
        ("off", "127.0.0.1", False),
        ("off", "8.8.8.8", False),
    ],
)
def test_needs_key(policy: str, address: str, expected: bool) -> None:
    assert needs_key(parse_auth_policy(policy), address) is expected


def test_auth_policy_values() -> None:
    assert parse_auth_policy(" Remote ") == "remote"
    with pytest.raises(PolicyError, match=r"api.auth: 'sometimes' is not a policy; use remote"):
        parse_auth_policy("sometimes")
    with pytest.raises(PolicyError, match="unknown auth policy"):
        needs_key("sometimes", "127.0.0.1")  # type: ignore[arg-type]  # not a policy, on purpose


@pytest.fixture
def host_check() -> HostCheck:
    return HostCheck(["thox-box"], ["192.168.1.50", "fe80::1234", "2001:db8::50"])


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:8080",
        "LOCALHOST:8080",
        "127.0.0.1",
        "127.0.0.1:8080",
        "[::1]",
        "[::1]:5381",
        "[0:0:0:0:0:0:0:1]:8080",
        "thox.local",
        "thox.local:8080",
        "thox.local.:8080",  # fully qualified form of the same name
        "thox-box",
        "thox-box:8080",
        "thox-box.local:8080",
        "192.168.1.50:8080",
        "[fe80::1234]:8080",
        "[2001:db8::50]",
        "[::ffff:127.0.0.1]:8080",
    ],
)
def test_host_names_of_this_device_pass(host_check: HostCheck, host: str) -> None:
    assert host_check.check(host, None) is None


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        (None, "no Host header"),
        ("", "no Host header"),
        ("   ", "no Host header"),
        ("evil.example", "not a name of this device (DNS rebinding protection)"),
        ("evil.example:8080", "not a name of this device"),
        ("127.0.0.1.evil.example", "not a name of this device"),
        ("127.0.0.1.nip.io:8080", "not a name of this device"),
        ("localhost.evil.example", "not a name of this device"),
        ("thox.local.evil.example", "not a name of this device"),
        ("thox-box.evil.example", "not a name of this device"),
        ("evilthox.local", "not a name of this device"),
        ("sub.localhost", "not a name of this device"),
        ("127.1", "not a name of this device"),  # not a dotted quad: taken as a name, and not one of ours
        ("2130706433", "not a name of this device"),
        ("::1", "must be written in brackets"),
        ("[::1", "unclosed IPv6 bracket"),
        ("[::1]x", "text after the IPv6 address"),
        ("[fe80::1%25eth0]", "not a valid IPv6 address"),
        ("[evil.example]", "not a valid IPv6 address"),
        ("localhost:0", "invalid port"),
        ("localhost:65536", "invalid port"),
        ("localhost:80a", "invalid port"),
        ("localhost:", "invalid port"),
        ("localhost:８０", "invalid port"),  # full-width digits are digits to str.isdigit, not to HTTP
        ("local host", "not a host name"),
        ("evil.example/.localhost", "not a host name"),
        ("user@localhost", "not a host name"),
    ],
)
def test_hosts_that_are_not_this_device_are_refused(host_check: HostCheck, host: str | None, reason: str) -> None:
    result = host_check.check(host, None)
    assert result is not None and reason in result


def test_any_ip_literal_host_passes_by_default_and_can_be_made_strict() -> None:
    # A renumbered device (DHCP) keeps working: an IP literal cannot be the product of DNS rebinding.
    assert HostCheck().check("10.9.8.7:8080", None) is None
    strict = HostCheck(own_addresses=["192.168.1.50"], allow_any_ip_host=False)
    assert strict.check("192.168.1.50:8080", None) is None
    assert strict.check("127.0.0.2:8080", None) is None  # any loopback address is this device
    refused = strict.check("10.9.8.7:8080", None)
    assert refused is not None and "not a name of this device" in refused


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost:3000",
        "http://127.0.0.1:8080",
        "https://thox.local",
        "http://thox.local:8080",
        "HTTP://THOX.LOCAL:8080",
        "http://thox-box.local:8080",
        "http://192.168.1.50",
        "http://[::1]:8080",
        "http://[fe80::1234]:8080",
    ],
)
def test_origins_of_this_device_pass(host_check: HostCheck, origin: str) -> None:
    assert host_check.check("thox.local:8080", origin) is None


@pytest.mark.parametrize(
    ("origin", "reason"),
    [
        ("http://evil.example", "another web site"),
        ("https://evil.example:8080", "another web site"),
        ("http://127.0.0.1.evil.example", "another web site"),
        ("http://localhost.evil.example:8080", "another web site"),
        ("http://8.8.8.8", "another web site"),  # a page served from an attacker's IP
        ("http://10.9.8.7:3000", "another web site"),  # another LAN host's page is not trusted by default
        ("null", "Origin 'null'"),
        ("file://", "not an http(s) origin"),
        ("chrome-extension://abcdef", "not an http(s) origin"),
        ("thox.local", "not an http(s) origin"),
        ("http://thox.local/app", "scheme://host[:port] only"),
        ("http://user@thox.local", "scheme://host[:port] only"),
        ("http://thox.local:99999", "invalid port"),
        ("http://", "not a host name"),
    ],
)
def test_foreign_origins_are_refused(host_check: HostCheck, origin: str, reason: str) -> None:
    result = host_check.check("thox.local:8080", origin)
    assert result is not None and reason in result


def test_rebinding_attempt_is_refused_even_with_a_matching_origin(host_check: HostCheck) -> None:
    # The rebound page's own requests: Host and Origin both name the attacker's domain.
    result = host_check.check("evil.example:8080", "http://evil.example:8080")
    assert result is not None and "DNS rebinding" in result


def test_trusted_web_apps_can_be_listed_as_origins() -> None:
    check = HostCheck(allowed_origins=["http://openwebui.lan:3000", "https://chat.example/"])
    assert check.check("thox.local:8080", "http://openwebui.lan:3000") is None
    assert check.check("thox.local:8080", "https://CHAT.example:443") is None  # default port, case
    refused = check.check("thox.local:8080", "http://openwebui.lan:3001")
    assert refused is not None and "another web site" in refused


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"allowed_names": ["bad name"]}, "allowed host name 'bad name' is not a DNS name"),
        ({"own_addresses": ["192.168.1"]}, "own address '192.168.1' is not an IP address"),
        ({"allowed_origins": ["openwebui.lan"]}, "must look like http://host"),
        ({"allowed_origins": ["http://a.lan/x"]}, "allowed origin 'http://a.lan/x'"),
    ],
)
def test_host_check_configuration_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        HostCheck(**kwargs)


def test_hostnames_also_answer_as_dot_local() -> None:
    check = HostCheck(["Box-7", "box.example.com."])
    assert {"box-7", "box-7.local", "box.example.com", "localhost", "thox.local"} <= check.names
    assert "box.example.com.local" not in check.names
