"""sd_notify over `$NOTIFY_SOCKET`: readiness, status, watchdog pings and start/stop timeout extensions.

Our own ~dozen lines instead of the `sdnotify` package, which swallows every error and connects only once at
construction (research/hardware.md section 6). The protocol is one AF_UNIX datagram per message, `KEY=VALUE` lines;
a leading "@" in the socket address means Linux's abstract namespace. Sending never blocks the event loop (the
socket is non-blocking) and never raises into the agent: a lost notification must not take down the service that
systemd is supervising, so a failure is logged once per failing episode and the message dropped.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from types import TracebackType

import structlog

log = structlog.get_logger("agent.systemd")


def _address(notify_socket: str) -> str | None:
    if notify_socket.startswith("@"):
        return "\0" + notify_socket[1:]
    if notify_socket.startswith("/"):
        return notify_socket
    return None  # vsock: and other transports of newer systemd are not used on the device


def _watchdog_seconds(environ: Mapping[str, str], pid: int) -> float | None:
    watchdog_pid = environ.get("WATCHDOG_PID")
    # systemd sets WATCHDOG_PID when the pings are expected from one process; any other process must stay silent.
    if watchdog_pid is not None and watchdog_pid.strip() != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


class SystemdNotifier:
    """Sends sd_notify messages to the service manager; a silent no-op when not started by systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None, *, pid: int | None = None) -> None:
        env = os.environ if environ is None else environ
        self.notify_socket = env.get("NOTIFY_SOCKET") or None
        self._address = _address(self.notify_socket) if self.notify_socket else None
        self._watchdog_usec_seconds = _watchdog_seconds(env, os.getpid() if pid is None else pid)
        self._failing = False
        self._socket: socket.socket | None = None
        if self.notify_socket and self._address is None:
            log.warning("systemd_notify_unsupported_socket", notify_socket=self.notify_socket)
        elif self._address is not None:
            # Created once: the agent pings every few seconds for its whole life, and a fresh socket per message
            # would be a needless syscall pair each time.
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere (NOTIFY_SOCKET set to a supported address)."""
        return self._socket is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WATCHDOG_USEC); None when systemd expects none from us."""
        # Without a socket a ping goes nowhere, so there is no watchdog to feed.
        if self._watchdog_usec_seconds is None or not self.enabled:
            return None
        return self._watchdog_usec_seconds / 2

    def ready(self) -> None:
        """Tell systemd start-up is complete (READY=1)."""
        self.notify("READY=1")

    def status(self, text: str) -> None:
        """Set the one-line status `systemctl status` shows (STATUS=...)."""
        # A newline would start a new KEY=VALUE assignment in the datagram.
        self.notify("STATUS=" + " ".join(text.splitlines()))

    def stopping(self) -> None:
        """Tell systemd an orderly shutdown has begun (STOPPING=1)."""
        self.notify("STOPPING=1")

    def watchdog(self) -> None:
        """Ping the service watchdog (WATCHDOG=1)."""
        self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more before the start (or stop) timeout fires (EXTEND_TIMEOUT_USEC=...)."""
        self.notify(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def notify(self, message: str) -> bool:
        """Send one raw sd_notify datagram; True when it was handed to the socket."""
        if self._socket is None or self._address is None:
            return False
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError as exc:
            # Typically ENOENT/ECONNREFUSED (no listener) or EAGAIN (systemd's queue full); either way the message
            # is dropped, and logging every ping of a long outage would flood the journal.
            if not self._failing:
                self._failing = True
                log.warning(
                    "systemd_notify_failed",
                    notify_socket=self.notify_socket,
                    message=message,
                    error=exc.strerror or repr(exc),
                )
            return False
        if self._failing:
            self._failing = False
            log.info("systemd_notify_recovered", notify_socket=self.notify_socket)
        return True

    def close(self) -> None:
        """Close the socket; later messages are dropped silently."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> SystemdNotifier:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
