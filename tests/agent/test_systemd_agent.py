"""The agent under systemd: STATUS while starting, READY once both APIs listen, watchdog pings, STOPPING."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.agent_process import http_json, start_agent
from tests.waiting import eventually


def test_agent_speaks_sd_notify_to_the_service_manager(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(0.2)
    messages: list[str] = []

    def drain() -> None:
        while True:
            try:
                messages.append(listener.recv(4096).decode())
            except TimeoutError:
                return

    agent = start_agent(tmp_path / "home", env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
    try:

        def heard() -> bool:
            drain()
            serving = any(m.startswith("STATUS=serving http://") for m in messages)
            return "READY=1" in messages and serving and messages.count("WATCHDOG=1") >= 2

        eventually(heard, "READY=1, the serving status and two watchdog pings on the notify socket")
        assert messages[0] == "STATUS=preparing models"
        ready = messages.index("READY=1")
        # READY only after both APIs listen: by then the endpoints file names both, and both answer.
        assert any(m.startswith("STATUS=serving http://") for m in messages[ready:])
        assert http_json("GET", f"{agent.cluster_url}/health")[0] == 200
        pings = [m for m in messages if m == "WATCHDOG=1"]
        assert len(pings) >= 2  # every half WatchdogSec while healthy
    finally:
        assert agent.stop() == 0
    drain()
    listener.close()
    assert "STOPPING=1" in messages
    assert messages.index("STOPPING=1") > messages.index("READY=1")
