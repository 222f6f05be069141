"""The hardware layer through a real agent in the sim profile: heat throttles the engine that is serving eight
streams and recovers with hysteresis, power contracts over HTTP, the dock's join offer in /v1/health, `thox hw`."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.api.app import build_cluster_app
from agent.api.cluster.routes import HealthSources
from agent.hardware.manager import HardwareManager
from agent.monitor import EventLoopMonitor
from agent.settings import load_settings
from tests.agent_process import RunningAgent, http_json, start_agent
from tests.waiting import eventually

# Entry thresholds the agent runs with (the defaults) and its hysteresis.
ENTRY_C = {"warm": 70.0, "throttle": 80.0, "hot": 88.0}
HYSTERESIS_C = 5.0


@pytest.fixture(scope="module")
def hw_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    agent = start_agent(
        tmp_path_factory.mktemp("hw-home"),
        env={
            "THOX_HARDWARE_THERMAL_POLL_SECONDS": "0.2",
            "THOX_HARDWARE_POWER_POLL_SECONDS": "0.2",
            "THOX_HARDWARE_MIN_DWELL_SECONDS": "1.0",
        },
    )
    yield agent
    assert agent.stop() == 0


def _load(url: str, stop: threading.Event, worker: int) -> None:
    body = {
        "messages": [{"role": "user", "content": f"Tell story number {worker} about a robot."}],
        "max_tokens": 48,
        "temperature": 1.0,
        "seed": worker,
    }
    while not stop.is_set():
        status, _, payload = http_json("POST", f"{url}/chat/completions", body)
        assert status in (200, 503), payload


def test_heat_throttles_engine_concurrency_then_recovers_with_hysteresis(hw_agent: RunningAgent) -> None:
    cluster = hw_agent.cluster_url
    stop = threading.Event()
    workers = [threading.Thread(target=_load, args=(hw_agent.inference_url, stop, i), daemon=True) for i in range(8)]
    for worker in workers:
        worker.start()
    try:
        # Eight streams really decode together while the box is cool.
        eventually(
            lambda: hw_agent.health()["engine"].get("scheduler", {}).get("decoding", 0) >= 6,
            "six or more sequences decoding together",
            60,
        )
        cool = hw_agent.health()
        assert cool["hardware"]["thermal"]["level"] == "normal"
        assert cool["engine"]["concurrency"]["applied"] == 16

        status, _, _ = http_json("PUT", f"{cluster}/sim/thermal", {"ambient_c": 72.0, "time_constant_s": 0.5})
        assert status == 200
        hot = eventually(
            lambda: (h := hw_agent.health())["engine"]["concurrency"]["applied"] <= 8 and h,
            "the governor to lower the engine's concurrency",
            15,
        )
        assert hot["temperature_c"] >= ENTRY_C["throttle"]
        assert hot["hardware"]["thermal"]["level"] in ("throttle", "hot")
        assert hot["status"] == "throttled"
        # The engine reports its counters once a second: wait for a report made under the lowered limit.
        eventually(
            lambda: (e := hw_agent.health()["engine"])["scheduler"]["concurrency"] == e["concurrency"]["applied"],
            "a scheduler report under the lowered concurrency",
            30,
        )
        for _ in range(10):  # then the limit holds over a second of reports (a bounded window, not a wait)
            engine = hw_agent.health()["engine"]
            assert engine["scheduler"]["decoding"] <= engine["concurrency"]["applied"] <= 8
            time.sleep(0.1)

        status, _, _ = http_json("PUT", f"{cluster}/sim/thermal", {"ambient_c": 25.0})
        assert status == 200
        cooled = eventually(
            lambda: (h := hw_agent.health())["hardware"]["thermal"]["level"] == "normal" and h,
            "the box to cool back to normal",
            30,
        )
        assert eventually(lambda: hw_agent.health()["engine"]["concurrency"]["applied"] == 16, "full concurrency", 30)
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)

    falling = [t for t in cooled["hardware"]["thermal"]["recent_transitions"] if t["reason"] == "falling"]
    assert falling, cooled["hardware"]["thermal"]
    for transition in falling:  # each level was left only below its entry threshold minus the hysteresis
        assert transition["temperature_c"] <= ENTRY_C[transition["from"]] - HYSTERESIS_C, transition
    transitions = [line for line in hw_agent.log_lines() if line.get("event") == "thermal_level_changed"]
    assert any(t["to"] in ("throttle", "hot") for t in transitions)
    applied = [line for line in hw_agent.log_lines() if line.get("event") == "engine_concurrency_applied"]
    assert [a["concurrency"] for a in applied][-1] == 16 and min(a["concurrency"] for a in applied) <= 8


def test_power_contract_over_http(hw_agent: RunningAgent) -> None:
    cluster = hw_agent.cluster_url
    status, _, body = http_json("POST", f"{cluster}/power/contract", {"voltage_mv": 9000})
    assert status == 409 and body["error"]["code"] == "no_module_docked"

    status, _, _ = http_json(
        "POST",
        f"{cluster}/sim/modules",
        {
            "id": "module-b",
            "pdos": [{"mv": 5000, "ma": 3000}, {"mv": 9000, "ma": 3000}, {"mv": 20000, "ma": 2250}],
            "offer": {"node_id": "thox-b", "endpoint": "127.0.0.1:6381", "token": "K10::s"},
        },
    )
    assert status == 201
    # The dock switch is debounced and presence-confirmed, then the NFC tag is read.
    eventually(lambda: hw_agent.health()["hardware"]["dock"]["join_offer"], "the join offer", 30)
    status, _, body = http_json("POST", f"{cluster}/power/contract", {"voltage_mv": 20000, "current_ma": 2000})
    assert status == 200, body
    assert body["state"] == "explicit" and body["controller"] == "stusb4500"
    assert body["selected"]["voltage_mV"] == 20000 and body["rdo"]["operating_mA"] == 2000
    assert body["peer_module_id"] == "thox-b"  # read from the module's NFC tag when it docked
    status, _, listing = http_json("GET", f"{cluster}/power/contract")
    assert status == 200 and listing["data"][0]["selected"]["pdo_index"] == 3
    measured = eventually(
        lambda: (h := hw_agent.health()["hardware"]["power"])["bus_mV"] and abs(h["bus_mV"] - 20000) < 10 and h,
        "the INA226 to measure 20 V",
        30,
    )
    assert measured["current_mA"] > 0

    status, _, body = http_json("POST", f"{cluster}/power/contract", {"voltage_mv": 15000})
    assert status == 422 and body["error"]["code"] == "no_matching_pdo" and "#2 fixed 9000" in body["error"]["message"]
    status, _, body = http_json("POST", f"{cluster}/power/contract", {"voltage_mv": 9000, "pdo_index": 2})
    assert status == 400 and "either pdo_index, or voltage_mv" in body["error"]["message"]
    status, _, body = http_json("POST", f"{cluster}/power/contract", {"port": "usb-c2", "pdo_index": 1})
    assert status == 404 and body["error"]["code"] == "port_not_found"

    health = hw_agent.health()
    assert health["hardware"]["dock"]["join_offer"]["node_id"] == "thox-b"
    status, _, _ = http_json("DELETE", f"{cluster}/sim/modules/module-b")
    assert status == 200
    eventually(lambda: hw_agent.health()["hardware"]["dock"]["docked"] is False, "the undock", 30)
    status, _, body = http_json("POST", f"{cluster}/power/contract", {"pdo_index": 1})
    assert status == 409


def test_thox_hw_commands(hw_agent: RunningAgent) -> None:
    http_json("POST", f"{hw_agent.cluster_url}/sim/modules", {"id": "module-c"})
    try:

        def thox(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "agent.cli", *args, "--home", str(hw_agent.home)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        result = thox("hw", "pd", "request", "--volts", "15")
        assert result.returncode == 0, result.stderr
        assert "explicit" in result.stdout and "15.00 V" in result.stdout
        result = thox("hw", "pd", "request", "--volts", "12")
        assert result.returncode == 1 and "no offered PDO provides 12000 mV" in result.stderr
        result = thox("hw", "status")
        assert result.returncode == 0, result.stderr
        assert "level normal" in result.stdout and "docked" in result.stdout and "thermal:sysfs" in result.stdout
    finally:
        http_json("DELETE", f"{hw_agent.cluster_url}/sim/modules/module-c")


def test_bad_sim_requests_get_clear_errors(hw_agent: RunningAgent) -> None:
    cluster = hw_agent.cluster_url
    status, _, body = http_json("POST", f"{cluster}/sim/faults", {"target": "i2c-9", "kind": "nack"})
    assert status == 400 and "unknown target 'i2c-9'" in body["error"]["message"]
    status, _, body = http_json("POST", f"{cluster}/sim/faults", {"target": "i2c-7", "kind": "melt"})
    assert status == 400 and "unknown I2C fault kind 'melt'" in body["error"]["message"]
    status, _, body = http_json("POST", f"{cluster}/sim/modules", {"id": "x", "pdos": [{"mv": 9000, "ma": 1000}]})
    assert status == 400 and "must be fixed 5 V" in body["error"]["message"]
    status, _, body = http_json("DELETE", f"{cluster}/sim/modules/nobody")
    assert status == 404 and body["error"]["code"] == "module_not_found"


@pytest.mark.allow_blocking("load_settings and HardwareManager set up in the test; the routes stay checked")
async def test_device_profile_has_no_sim_routes(tmp_path: Path) -> None:
    settings = load_settings({"profile": "device"}, home=tmp_path, env={})
    hardware = HardwareManager(settings, [])
    app = build_cluster_app(
        HealthSources(time.monotonic(), (), EventLoopMonitor(), hardware), hardware, max_request_bytes=1 << 20
    )
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/v1/sim/world")
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "unknown_route"
        response = await client.get("/v1/power/contract")
        assert response.status == 200 and (await response.json())["data"] == []


def test_shutdown_returns_the_port_to_5v(tmp_path: Path) -> None:
    agent = start_agent(tmp_path / "home")
    try:
        http_json("POST", f"{agent.cluster_url}/sim/modules", {"id": "module-d"})
        status, _, body = http_json("POST", f"{agent.cluster_url}/power/contract", {"voltage_mv": 20000})
        assert status == 200 and body["selected"]["voltage_mV"] == 20000
    finally:
        assert agent.stop() == 0
    restored = [line for line in agent.log_lines() if line.get("event") == "power_contract_default_restored"]
    assert restored and restored[-1]["mv"] == 5000
    events = [line.get("event") for line in agent.log_lines()]
    assert events.index("power_contract_default_restored") > events.index("api_stopping")


def test_emergency_heat_ends_streams_cleanly_and_refuses_until_cooled(hw_agent: RunningAgent) -> None:
    import http.client
    import json
    import urllib.parse

    cluster = hw_agent.cluster_url
    parts = urllib.parse.urlsplit(hw_agent.inference_url)
    assert parts.hostname, hw_agent.inference_url
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    body = {
        "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
        "max_tokens": 1500,
        "temperature": 1.0,
        "seed": 3,
        "stream": True,
    }
    connection.request(
        "POST", f"{parts.path}/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the stream is running
    try:
        status, _, _ = http_json("PUT", f"{cluster}/sim/thermal", {"ambient_c": 110.0, "time_constant_s": 0.3})
        assert status == 200
        events = [line for line in response.read().decode().splitlines() if line.startswith("data: ")]
    finally:
        connection.close()
    error = json.loads(events[-2][6:]) if events[-1] == "data: [DONE]" else json.loads(events[-1][6:])
    assert error["error"]["code"] == "thermal_emergency", events[-3:]
    status, headers, refused = http_json(
        "POST",
        f"{hw_agent.inference_url}/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert status == 503 and refused["error"]["code"] == "thermal_emergency" and headers["retry-after"] == "30"
    assert hw_agent.health()["hardware"]["thermal"]["level"] == "emergency"

    http_json("PUT", f"{cluster}/sim/thermal", {"ambient_c": 25.0})
    eventually(lambda: hw_agent.health()["hardware"]["thermal"]["level"] == "normal", "the box to cool", 30)
    status, _, answer = http_json(
        "POST",
        f"{hw_agent.inference_url}/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert status == 200, answer


def test_a_bad_driver_string_stops_serve_with_a_clear_message(tmp_path: Path) -> None:
    import os

    from tests.agent_process import TEST_MODEL_CACHE

    env = {
        **os.environ,
        "THOX_HOME": str(tmp_path),
        "THOX_CACHE_DIR": str(TEST_MODEL_CACHE),
        "THOX_HARDWARE_PD": "stusb4500:i2c-7@0x99",
    }
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "serve", "--inference-port", "0", "--cluster-port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "hardware settings" in result.stderr and "0x99" in result.stderr and "reserved" in result.stderr
    assert "Traceback" not in result.stderr
