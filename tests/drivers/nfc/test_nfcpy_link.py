"""NfcpyLink over nfcpy's `udp` driver: a real reader/emulated-tag exchange, across processes and within one.

nfcpy's udp card side binds 0.0.0.0:<port> and the reader sends to <host>:<port> from an ephemeral port, so every
test takes its own free UDP port and parallel runs do not meet. nfcpy's udp poll waits 1 s for an answer, which
sets the pace of these tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

import ndef
import pytest

from drivers.base import DriverConfigError, DriverState, DriverStateError, JoinOffer, LinkError
from drivers.nfc.ndef import NdefError, OfferTooLargeError, encode_join_offer
from drivers.nfc.nfcpy_link import NfcpyLink
from tests.drivers.threads import running
from tests.waiting import until

REPO = Path(__file__).resolve().parents[3]
OFFER = JoinOffer("thox-abc123", "10.0.0.2:7443", "t0k", 1700000000, {"fp": "5e3a"})


def free_udp_port() -> int:
    """A UDP port nobody holds now and that /etc/services does not name (nfcpy's udp driver chokes on those)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("0.0.0.0", 0))
            port: int = probe.getsockname()[1]
        try:
            socket.getservbyport(port, "udp")
        except OSError:
            return port


def nfc_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("nfc-")]


def state_of(link: NfcpyLink) -> DriverState:
    """The link's state now (a call: mypy would carry an earlier assert's narrowing of `link.state` across awaits)."""
    return link.state


@pytest.fixture
def path() -> str:
    return f"udp:localhost:{free_udp_port()}"


@pytest.fixture
async def reader(path: str) -> AsyncIterator[NfcpyLink]:
    link = NfcpyLink(path)
    await link.open()
    yield link
    await link.close()


@pytest.fixture
async def tag(path: str) -> AsyncIterator[NfcpyLink]:
    """A second link on the same udp path, in this process, acting as the emulated tag."""
    link = NfcpyLink(path)
    await link.open()
    yield link
    await link.close()


async def test_join_offer_crosses_two_processes_over_udp(path: str) -> None:
    peer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.drivers.nfc.offer_peer",
        path,
        "8",
        json.dumps(asdict(OFFER)),
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert peer.stdout is not None
    link = NfcpyLink(path)
    try:
        lines: list[bytes] = []
        while not lines or lines[-1].strip() != b"ready":
            line = await asyncio.wait_for(peer.stdout.readline(), 10)
            assert line, f"the peer exited before offering: {b''.join(lines).decode()}"
            lines.append(line)
        await link.open()
        got = await link.read(timeout=8)
        output, _ = await asyncio.wait_for(peer.communicate(), 10)
    finally:
        await link.close()
        if peer.returncode is None:
            peer.kill()
            await peer.wait()
    assert got == OFFER
    assert peer.returncode == 0, output.decode()
    assert output.strip().endswith(b"read")


async def test_read_with_nobody_offering_times_out_and_cancels_promptly_leaving_no_thread(path: str) -> None:
    link = NfcpyLink(path)
    await link.open()
    assert len(nfc_threads()) == 1  # one dedicated thread per link
    started = time.monotonic()
    assert await link.read(timeout=0.4) is None
    assert 0.4 <= time.monotonic() - started < 1.0
    assert link.state is DriverState.OPEN
    assert len(nfc_threads()) == 1

    reading = asyncio.create_task(link.read(timeout=30))
    await until(lambda: running(NfcpyLink._read_blocking.__code__), "the worker thread reading")
    started = time.monotonic()
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert time.monotonic() - started < 0.2
    assert link.state is DriverState.OPEN

    started = time.monotonic()
    await link.close()  # waits for nfcpy's current udp poll (1 s at most) to notice it must stop
    assert time.monotonic() - started < 2.0
    assert nfc_threads() == []
    assert state_of(link) is DriverState.CLOSED


async def test_close_ends_a_running_read(reader: NfcpyLink) -> None:
    reading = asyncio.create_task(reader.read(timeout=30))
    await until(lambda: running(NfcpyLink._read_blocking.__code__), "the worker thread reading")
    started = time.monotonic()
    await reader.close()
    assert await asyncio.wait_for(reading, 1.0) is None
    assert time.monotonic() - started < 2.0
    assert nfc_threads() == []


def udp_bound(port: int) -> bool:
    """Whether a UDP socket of this machine is bound to `port` (/proc/net/udp and udp6)."""
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            if int(line.split()[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


async def settle(path: str) -> None:
    """Until the tag's worker has bound its socket: a reader poll that comes first costs a 1 s udp timeout."""
    port = int(path.rsplit(":", 1)[1])
    await until(lambda: udp_bound(port), f"the emulated tag bound to udp port {port}")


async def test_reader_and_tag_in_one_process(reader: NfcpyLink, tag: NfcpyLink, path: str) -> None:
    offering = asyncio.create_task(tag.offer(OFFER, timeout=5))
    await settle(path)
    assert await reader.read(timeout=5) == OFFER
    assert await offering is True


async def test_a_tag_without_our_record_is_skipped_and_polling_goes_on(
    reader: NfcpyLink, tag: NfcpyLink, path: str
) -> None:
    other = b"".join(ndef.message_encoder([ndef.UriRecord("https://example.com/"), ndef.TextRecord("hello")]))
    presenting = asyncio.create_task(tag.present(other, timeout=5))
    await settle(path)
    reading = asyncio.create_task(reader.read(timeout=5))
    assert await presenting is True  # the reader read the whole foreign message...
    assert not reading.done()  # ...and did not return on it
    assert await tag.offer(OFFER, timeout=5) is True
    assert await reading == OFFER


async def test_a_malformed_join_record_raises_and_the_link_stays_usable(
    reader: NfcpyLink, tag: NfcpyLink, path: str
) -> None:
    good = encode_join_offer(OFFER)
    bad = good[:15] + good[15:].replace(b'"v":1', b'"v":2')
    presenting = asyncio.create_task(tag.present(bad, timeout=5))
    await settle(path)
    with pytest.raises(NdefError, match="unsupported join offer version 2"):
        await reader.read(timeout=5)
    assert await presenting is True
    assert reader.state is DriverState.OPEN
    offering = asyncio.create_task(tag.offer(OFFER, timeout=5))
    await settle(path)
    assert await reader.read(timeout=5) == OFFER
    assert await offering is True


async def test_offer_nobody_reads_returns_false_after_the_timeout(tag: NfcpyLink) -> None:
    started = time.monotonic()
    assert await tag.offer(OFFER, timeout=0.3) is False
    assert 0.3 <= time.monotonic() - started < 0.9


async def test_offer_too_large_is_refused_before_emulating(tag: NfcpyLink) -> None:
    with pytest.raises(OfferTooLargeError):
        await tag.offer(JoinOffer("n", "h:1", token="t" * 300), timeout=1)
    assert tag.state is DriverState.OPEN


async def test_a_failing_reader_faults_the_link_until_reopened(path: str) -> None:
    # The udp driver cannot poll 848 kbit/s Type B: nfcpy's connect gives up with False, as on a lost USB reader.
    link = NfcpyLink(path, targets=("848B",))
    await link.open()
    try:
        with pytest.raises(LinkError, match=f"nfcpy:{path}: the reader stopped during read"):
            await link.read(timeout=2)
        assert link.state is DriverState.FAULTED
        with pytest.raises(DriverStateError, match="is faulted; open it before read"):
            await link.read(timeout=0.1)
        await link.open()
        assert state_of(link) is DriverState.OPEN
        assert len(nfc_threads()) == 1
    finally:
        await link.close()
    assert nfc_threads() == []


async def test_closed_link_refuses_operations(path: str) -> None:
    link = NfcpyLink(path)
    assert link.name == f"nfcpy:{path}"
    with pytest.raises(DriverStateError, match=f"nfcpy:{path} is closed; open it before read"):
        await link.read(timeout=0.1)
    with pytest.raises(DriverStateError, match="open it before offer"):
        await link.offer(OFFER, timeout=0.1)


async def test_open_without_a_reader_names_the_path() -> None:
    link = NfcpyLink("tty:NOPE0:pn532")
    with pytest.raises(LinkError, match=r"no NFC reader at 'tty:NOPE0:pn532': No such device"):
        await link.open()
    assert link.state is DriverState.CLOSED
    assert nfc_threads() == []


def test_a_path_nfcpy_does_not_know_is_a_config_error() -> None:
    with pytest.raises(DriverConfigError, match=r"'pn532:/dev/ttyS0' is not an nfcpy device path"):
        NfcpyLink("pn532:/dev/ttyS0")


async def test_a_udp_port_named_in_etc_services_is_a_config_error() -> None:
    try:
        service = socket.getservbyport(9, "udp")
    except OSError:
        pytest.skip("this system's services database does not name udp port 9")
    link = NfcpyLink("udp:localhost:9")
    with pytest.raises(DriverConfigError, match=f"port 9 is the '{service}' service"):
        await link.open()
    assert nfc_threads() == []
