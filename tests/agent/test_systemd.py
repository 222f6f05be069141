"""systemd integration: sd_notify datagrams on a real socket, the health-gated watchdog, and the unit files checked
offline with systemd's own tools."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.systemd import SystemdNotifier
from agent.watchdog import Watchdog

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD_DIR / "thox-agent.service"


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A fake service manager: a datagram socket and the NOTIFY_SOCKET value that reaches it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = notify_socket = str(tmp_path / "notify")
    else:
        notify_socket = f"@thox-test-{uuid.uuid4().hex}"
        address = "\0" + notify_socket[1:]
    sock.bind(address)
    sock.settimeout(2)
    yield sock, notify_socket
    sock.close()


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram already queued on `sock`."""
    sock.setblocking(False)
    received: list[bytes] = []
    try:
        while True:
            received.append(sock.recv(4096))
    except BlockingIOError:
        return received


# --- the notifier -------------------------------------------------------------------------------------------------


def test_notifier_sends_exact_datagrams(listener: tuple[socket.socket, str]) -> None:
    sock, notify_socket = listener
    with SystemdNotifier({"NOTIFY_SOCKET": notify_socket}) as notifier, capture_logs() as logs:
        assert notifier.enabled
        notifier.ready()
        notifier.status("converting smollm2-135m\nstep 3/5")
        notifier.watchdog()
        notifier.extend_timeout(90)
        notifier.extend_timeout(1.5)
        notifier.stopping()
    assert drain(sock) == [
        b"READY=1",
        b"STATUS=converting smollm2-135m step 3/5",  # a newline would start a new assignment
        b"WATCHDOG=1",
        b"EXTEND_TIMEOUT_USEC=90000000",
        b"EXTEND_TIMEOUT_USEC=1500000",
        b"STOPPING=1",
    ]
    assert logs == []


@pytest.mark.timeout(10)  # a blocking send would hang on the full queue instead of failing
def test_notifier_socket_is_non_blocking(listener: tuple[socket.socket, str]) -> None:
    sock, notify_socket = listener
    with SystemdNotifier({"NOTIFY_SOCKET": notify_socket}) as notifier:
        # Far more than a datagram socket's queue holds: a full queue must drop pings, never stall the loop.
        started = time.monotonic()
        with capture_logs() as logs:
            sent = sum(notifier.notify("WATCHDOG=1") for _ in range(5000))
        assert time.monotonic() - started < 2
    assert 0 < sent < 5000, "the queue never filled, so this test proved nothing"
    assert [entry["event"] for entry in logs] == ["systemd_notify_failed"]
    assert len(drain(sock)) == sent


def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    with SystemdNotifier({}) as notifier, capture_logs() as logs:
        assert not notifier.enabled
        assert notifier.watchdog_interval is None
        notifier.ready()
        notifier.status("idle")
        notifier.watchdog()
        notifier.extend_timeout(10)
        notifier.stopping()
        assert notifier.notify("READY=1") is False
    assert logs == []


def test_missing_socket_is_logged_once_per_outage_and_never_raised(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with SystemdNotifier({"NOTIFY_SOCKET": str(path)}) as notifier, capture_logs() as logs:
        for _ in range(5):
            notifier.watchdog()
        assert [entry["event"] for entry in logs] == ["systemd_notify_failed"]
        assert logs[0]["message"] == "WATCHDOG=1" and logs[0]["log_level"] == "warning"

        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(str(path))
        notifier.ready()
        listener.close()
        path.unlink()
        notifier.watchdog()
        notifier.watchdog()
    assert [entry["event"] for entry in logs] == [
        "systemd_notify_failed",
        "systemd_notify_recovered",
        "systemd_notify_failed",
    ]


def test_unsupported_socket_address_disables_the_notifier() -> None:
    with capture_logs() as logs, SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:1234"}) as notifier:
        notifier.ready()
        assert not notifier.enabled
    assert [entry["event"] for entry in logs] == ["systemd_notify_unsupported_socket"]


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),  # pings are expected from another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "thirty"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(environ: dict[str, str], interval: float | None) -> None:
    with SystemdNotifier({"NOTIFY_SOCKET": "@unused", **environ}, pid=4242) as notifier:
        assert notifier.watchdog_interval == interval


def test_watchdog_pid_defaults_to_this_process() -> None:
    environ = {"NOTIFY_SOCKET": "@unused", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    with SystemdNotifier(environ) as notifier:
        assert notifier.watchdog_interval == 1.0


def test_no_watchdog_without_a_socket_to_ping() -> None:
    assert SystemdNotifier({"WATCHDOG_USEC": "2000000"}).watchdog_interval is None


# --- the watchdog -------------------------------------------------------------------------------------------------


class Recorder:
    """A notifier that records when each watchdog ping was sent (by the loop's clock)."""

    def __init__(self) -> None:
        self.pings: list[float] = []
        self.pinged = asyncio.Event()

    def watchdog(self) -> None:
        self.pings.append(asyncio.get_running_loop().time())
        self.pinged.set()

    async def wait_for(self, count: int) -> None:
        async def enough() -> None:
            while len(self.pings) < count:
                self.pinged.clear()
                await self.pinged.wait()

        await asyncio.wait_for(enough(), 5)  # not asyncio.timeout: the agent still supports Python 3.10


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_pings_arrive_at_the_interval_while_healthy(tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    interval = 0.05
    with sock, SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "notify")}) as notifier:
        watchdog = Watchdog(notifier, interval, max_loop_lag=1.0, heartbeat_timeout=1.0)
        heartbeat = watchdog.register("thermal")

        async def subsystem() -> None:
            while True:
                heartbeat.beat()
                await asyncio.sleep(0.01)  # a live subsystem's pace (the test double), not a wait

        started = loop.time()
        tasks = [asyncio.create_task(watchdog.run()), asyncio.create_task(subsystem())]
        arrivals: list[float] = []
        with capture_logs() as logs:
            while len(arrivals) < 6:
                assert await asyncio.wait_for(loop.sock_recv(sock, 4096), 5) == b"WATCHDOG=1"
                arrivals.append(loop.time())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert arrivals[0] - started < interval, "the first ping goes out at once"
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert all(interval * 0.6 <= gap < interval * 10 for gap in gaps), gaps  # 0.6: receive-side jitter
    assert logs == []


async def test_blocked_loop_withholds_the_next_ping() -> None:
    recorder = Recorder()
    interval = 0.05
    watchdog = Watchdog(recorder, interval, max_loop_lag=0.1)
    runner = asyncio.create_task(watchdog.run())
    await recorder.wait_for(2)
    loop = asyncio.get_running_loop()

    async def blocking_subsystem() -> tuple[float, float]:
        start = loop.time()
        time.sleep(0.3)  # noqa: ASYNC251 - the bug guarded against: a synchronous call on the event loop
        return start, loop.time()

    with capture_logs() as logs:
        blocked_at, unblocked_at = await asyncio.create_task(blocking_subsystem())
        await recorder.wait_for(len(recorder.pings) + 2)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)

    after = [t for t in recorder.pings if t >= blocked_at]
    # Unguarded, the late wake-up would ping at once, right after the block; the guard waits a healthy interval.
    assert after[0] >= unblocked_at + interval * 0.8, (after, unblocked_at)
    withheld = [entry for entry in logs if entry["event"] == "watchdog_withheld"]
    assert len(withheld) == 1 and withheld[0]["reason"] == "loop_lag", logs
    assert withheld[0]["lag_s"] >= 0.2


async def test_short_hiccups_do_not_withhold_pings() -> None:
    recorder = Recorder()
    watchdog = Watchdog(recorder, 0.05, max_loop_lag=0.2)
    runner = asyncio.create_task(watchdog.run())
    with capture_logs() as logs:
        for _ in range(3):
            time.sleep(0.03)  # noqa: ASYNC251 - a short block, well under max_loop_lag
            await asyncio.sleep(0.03)  # the loop runs between the hiccups (the scenario's pace, not a wait)
        await recorder.wait_for(len(recorder.pings) + 2)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    assert logs == []


async def test_stale_heartbeat_stops_pings_until_it_beats_again() -> None:
    clock = FakeClock()
    recorder = Recorder()
    watchdog = Watchdog(recorder, 0.02, heartbeat_timeout=10, clock=clock)
    heartbeat = watchdog.register("power")
    watchdog.register("thermal", timeout=1000)  # a healthy neighbour must not mask the stale one
    runner = asyncio.create_task(watchdog.run())
    await recorder.wait_for(2)

    with capture_logs() as logs:
        clock.now = 11.0
        assert watchdog.stale() == ["power"]
        sent = len(recorder.pings)
        # A window in which no ping may go out (about 15 intervals): what must not happen has no later event to
        # wait for, so this stays a bounded window.
        await asyncio.sleep(0.3)
        assert len(recorder.pings) == sent, "pinged while a heartbeat was stale"
        heartbeat.beat()
        await recorder.wait_for(sent + 2)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)

    assert [(entry["event"], entry.get("subsystem")) for entry in logs] == [
        ("watchdog_withheld", "power"),
        ("watchdog_heartbeat_recovered", "power"),
    ]
    assert logs[0]["reason"] == "heartbeat_stale" and logs[0]["age_s"] == 11.0
    assert watchdog.stale() == []


def test_each_stale_episode_is_logged_once_and_unregister_forgets() -> None:
    clock = FakeClock()
    watchdog = Watchdog(Recorder(), 1.0, heartbeat_timeout=5, clock=clock)
    engine = watchdog.register("engine")
    with capture_logs() as logs:
        assert watchdog.check()
        clock.now = 6.0
        assert [watchdog.check() for _ in range(3)] == [False, False, False]
        engine.beat()
        assert watchdog.check()
        clock.now = 12.0
        assert not watchdog.check()
        watchdog.unregister(engine)
        assert watchdog.check()
        assert not watchdog.check(loop_lag=6.0)
    assert [(entry["event"], entry.get("reason")) for entry in logs] == [
        ("watchdog_withheld", "heartbeat_stale"),
        ("watchdog_heartbeat_recovered", None),
        ("watchdog_withheld", "heartbeat_stale"),
        ("watchdog_withheld", "loop_lag"),
    ]
    watchdog.register("x")
    with pytest.raises(ValueError, match="already registered"):
        watchdog.register("x")


# --- the unit files, checked offline ------------------------------------------------------------------------------


def systemd_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package systemd; scripts/system-deps.sh installs it)")
    return path


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_PAGER": "cat", "SYSTEMD_COLORS": "0", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=False)


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment in a unit file, in order, repeated keys kept."""
    section, found = "", []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key, value))
    return found


@pytest.fixture
def runnable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart's binary swapped for one that exists here (verify checks it is executable)."""
    text = UNIT.read_text()
    assert text.count("ExecStart=/usr/bin/thox ") == 1
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("ExecStart=/usr/bin/thox ", f"ExecStart={sys.executable} "))
    return unit


def test_unit_declares_a_notify_service_with_watchdog() -> None:
    service = {key: value for section, key, value in directives(UNIT.read_text()) if section == "Service"}
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["ExecStart"] == "/usr/bin/thox serve --profile device"
    assert service["WatchdogSec"] == "30s" and service["Restart"] == "on-failure"
    assert service["User"] == "thox" and set(service["SupplementaryGroups"].split()) == {"i2c", "gpio", "dialout"}
    environment = [value for section, key, value in directives(UNIT.read_text()) if key == "Environment"]
    assert "THOX_HOME=/var/lib/thox-agent" in environment and "THOX_CACHE_DIR=/var/cache/thox-agent" in environment
    assert "ProtectKernelTunables" not in service, "it makes /sys read-only and breaks the fan's pwm writes"


def test_systemd_analyze_verify_prints_nothing(runnable_unit: Path) -> None:
    tool = systemd_tool("systemd-analyze")
    result = run_tool(tool, "verify", str(runnable_unit))
    # verify exits 0 on unknown keys and unparseable values and only warns, so any output at all is a failure.
    assert result.stderr == "" and result.stdout == "", result.stderr + result.stdout
    assert result.returncode == 0


def test_systemd_analyze_security_exposure_is_at_most_2_5(runnable_unit: Path) -> None:
    tool = systemd_tool("systemd-analyze")
    result = run_tool(tool, "security", "--offline=true", str(runnable_unit))
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.5, result.stdout


def test_sysusers_and_tmpfiles_create_user_groups_and_directories(tmp_path: Path) -> None:
    sysusers, tmpfiles = systemd_tool("systemd-sysusers"), systemd_tool("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    result = run_tool(sysusers, f"--root={root}", str(SYSTEMD_DIR / "sysusers.d" / "thox-agent.conf"))
    assert result.returncode == 0, result.stderr
    users = {line.split(":")[0]: line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc" / "group").read_text().splitlines()}
    assert users["thox"][5] == "/var/lib/thox-agent"
    for group in ("i2c", "gpio", "dialout"):
        assert "thox" in groups[group][3].split(","), group

    result = run_tool(tmpfiles, f"--root={root}", "--create", str(SYSTEMD_DIR / "tmpfiles.d" / "thox-agent.conf"))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    thox_uid = int(users["thox"][2])
    for directory in ("var/lib/thox-agent", "var/cache/thox-agent", "var/log/thox-agent"):
        stat = (root / directory).stat()
        assert (stat.st_uid, stat.st_mode & 0o777) == (thox_uid, 0o750), directory
