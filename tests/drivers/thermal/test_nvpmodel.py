"""NvpModel against a command-level twin: an executable `nvpmodel` put first on PATH, as jetson-stats' tests do.

The twin keeps its state in a JSON file beside it, prints what the real tool prints for -q and -p --verbose
(formats from jetson-stats' emulator and NVIDIA's conf files) and, for a switch that changes TPC power gating,
asks "reboot now?" on stdin and records the answer, so a test can prove the driver never agreed to a reboot.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from drivers.base import DriverError, DriverState, DriverStateError, PowerMode
from drivers.power.nvpmodel import ModeSpec, NvpModel, needs_reboot, parse_modes, parse_query
from tests.waiting import until

TWIN = r"""
import json, os, sys, time
from pathlib import Path

STATE = Path(__file__).with_name("nvpmodel-state.json")
# (id, name, TPC_PG_MASK): modes 0-2 share GPU power gating, mode 3 gates TPCs and so needs a reboot.
MODES = [(0, "MAXN", 0), (1, "MODE_15W", 0), (2, "MODE_30W", 0), (3, "MODE_10W", 5)]

state = json.loads(STATE.read_text())
state["calls"].append(sys.argv[1:])
state["pid"] = os.getpid()

def save():
    scratch = STATE.with_suffix(".new")
    scratch.write_text(json.dumps(state))
    os.replace(scratch, STATE)

save()
if state.get("hang"):
    time.sleep(30)  # the twin of a hung tool: it hangs (the test kills it), nothing waits on this
args = sys.argv[1:]
names = {m[0]: m[1] for m in MODES}
masks = {m[0]: m[2] for m in MODES}
if args[:1] == ["-q"]:
    print("NVPM WARN: fan mode is not set!")
    print(f"NV Power Mode: {names[state['mode']]}")
    if not state.get("query_without_id"):
        print(state["mode"])
elif "-p" in args:
    print("NVPM VERB: Config file: /etc/nvpmodel.conf")
    print("NVPM VERB: parsing done for /etc/nvpmodel.conf")
    print("succeed to parse file /etc/nvpmodel.conf.")
    print("NVPM VERB: PM_CONFIG: DEFAULT=MODE_30W(2)")
    print("NVPM VERB: PARAM TYPE=FILE NAME=TPC_POWER_GATING")
    print("NVPM VERB: TPC_PG_MASK /sys/devices/gpu.0/tpc_pg_mask")
    print("NVPM VERB: ")
    for mode_id, name, mask in MODES:
        print(f"NVPM VERB: POWER_MODEL: ID={mode_id} NAME={name}")
        print("NVPM VERB: CPU_ONLINE CORE_0 1")
        if state.get("verbose_params", True):
            print(f"NVPM VERB: TPC_POWER_GATING TPC_PG_MASK {mask}")
        print(f"NVPM VERB: GPU MAX_FREQ {300000000 * (mode_id + 1)}")
        print("NVPM VERB: ")
elif args[:1] == ["-m"]:
    target = int(args[1])
    if state.get("deny"):
        print("NVPM ERROR: Error opening /sys/devices/gpu.0/tpc_pg_mask: Permission denied")
        sys.exit(1)
    if target not in names:
        print(f"NVPM ERROR: Invalid power mode ID: {target}")
        sys.exit(1)
    if state.get("ignore"):
        sys.exit(0)
    if masks[target] != masks[state["mode"]]:
        print(f"NVPM WARN: Reboot required for changing to this power mode: {target}")
        print("NVPM WARN: DO YOU WANT TO REBOOT NOW? enter YES/yes to confirm:")
        answer = sys.stdin.readline().strip()
        state["stdin"].append(answer)
        if answer in ("YES", "yes"):
            state["mode"] = target
            state["rebooted"] = True
        save()
        sys.exit(0)
    state["mode"] = target
    save()
else:
    print(f"[ERROR] Unknown option: {args}")
    sys.exit(1)
"""

ORIN_CONF = """\
# nvpmodel configuration in NVIDIA's format (abridged)
< PARAM TYPE=FILE NAME=CPU_ONLINE >
CORE_0 /sys/devices/system/cpu/cpu0/online
< PARAM TYPE=FILE NAME=TPC_POWER_GATING >
TPC_PG_MASK /sys/devices/gpu.0/tpc_pg_mask

< POWER_MODEL ID=0 NAME=MAXN >
CPU_ONLINE CORE_0 1
TPC_POWER_GATING TPC_PG_MASK 0
GPU MAX_FREQ -1

< POWER_MODEL ID=1 NAME=MODE_15W >
CPU_ONLINE CORE_0 1
TPC_POWER_GATING TPC_PG_MASK 0
< POWER_MODEL ID=2 NAME=MODE_30W >
TPC_POWER_GATING TPC_PG_MASK 0
< POWER_MODEL ID=3 NAME=MODE_10W >
TPC_POWER_GATING TPC_PG_MASK 5

< PM_CONFIG DEFAULT=2 >
"""

MODES = [PowerMode(0, "MAXN"), PowerMode(1, "MODE_15W"), PowerMode(2, "MODE_30W"), PowerMode(3, "MODE_10W")]


class Twin:
    """The twin's state file, read and written by the test."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        return dict(json.loads(self.path.read_text()))

    def update(self, **changes: Any) -> None:
        state = self.load()
        state.update(changes)
        self.path.write_text(json.dumps(state))

    @property
    def mode(self) -> int:
        return int(self.load()["mode"])

    def switches(self) -> list[list[str]]:
        return [call for call in self.load()["calls"] if call[:1] == ["-m"]]


@pytest.fixture
def twin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Twin:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvpmodel"
    script.write_text(f"#!{sys.executable} -S\n{TWIN}")  # -S: no site import, faster start
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    twin = Twin(bin_dir / "nvpmodel-state.json")
    twin.path.write_text(json.dumps({"mode": 2, "calls": [], "stdin": [], "rebooted": False}))
    return twin


@pytest.fixture
async def nvp(twin: Twin) -> NvpModel:
    driver = NvpModel(conf_path=None, timeout=10.0)
    await driver.open()
    return driver


# ----------------------------------------------------------------------------- parsing


def test_query_parses_name_and_id_and_ignores_warnings() -> None:
    assert parse_query("NVPM WARN: fan mode is not set!\nNV Power Mode: MODE_30W\n2\n") == ("MODE_30W", 2)
    assert parse_query("NV Power Mode: MAXN\n") == ("MAXN", None)
    with pytest.raises(DriverError, match="NV Power Mode"):
        parse_query("NVPM ERROR: cannot open status file\n")


def test_conf_file_and_verbose_output_parse_to_the_same_modes() -> None:
    from_conf = parse_modes(ORIN_CONF)
    assert [spec.mode for spec in from_conf] == MODES
    assert from_conf[0].settings == {
        "CPU_ONLINE CORE_0": "1",
        "TPC_POWER_GATING TPC_PG_MASK": "0",
        "GPU MAX_FREQ": "-1",
    }
    assert from_conf[3].settings == {"TPC_POWER_GATING TPC_PG_MASK": "5"}
    verbose = "\n".join(
        [
            "NVPM VERB: PARAM TYPE=CLOCK NAME=GPU",
            "NVPM VERB: MAX_FREQ /sys/devices/gpu.0/devfreq/max_freq",
            "NVPM VERB: ",
            "NVPM VERB: POWER_MODEL: ID=0 NAME=MAXN",
            "NVPM VERB: TPC_POWER_GATING TPC_PG_MASK 0",
            "NVPM VERB: ",
            "NVPM VERB: POWER_MODEL: ID=1 NAME=MODE_15W",
            "NVPM VERB: TPC_POWER_GATING TPC_PG_MASK 248",
        ]
    )
    assert parse_modes(verbose) == [
        ModeSpec(PowerMode(0, "MAXN"), {"TPC_POWER_GATING TPC_PG_MASK": "0"}),
        ModeSpec(PowerMode(1, "MODE_15W"), {"TPC_POWER_GATING TPC_PG_MASK": "248"}),
    ]


def test_only_a_tpc_gating_change_needs_a_reboot() -> None:
    maxn, m15, m30, m10 = parse_modes(ORIN_CONF)
    assert not needs_reboot(maxn, m15)  # GPU clocks and CPU cores change at runtime
    assert not needs_reboot(m15, m30)
    assert needs_reboot(m30, m10)


# ----------------------------------------------------------------------------- driver against the twin


async def test_open_lists_modes_from_the_tool_and_reads_the_active_one(twin: Twin, nvp: NvpModel) -> None:
    assert nvp.state is DriverState.OPEN
    assert nvp.name == "nvpmodel:nvpmodel"
    assert await nvp.modes() == MODES
    assert await nvp.get() == PowerMode(2, "MODE_30W")
    assert ["-p", "--verbose"] in twin.load()["calls"]


async def test_a_conf_file_is_used_instead_of_parsing_the_tool(twin: Twin, tmp_path: Path) -> None:
    conf = tmp_path / "nvpmodel.conf"
    conf.write_text(ORIN_CONF)
    nvp = NvpModel(conf_path=conf)
    await nvp.open()
    assert await nvp.modes() == MODES
    assert all("-p" not in call for call in twin.load()["calls"])
    await nvp.close()


async def test_set_switches_modes_and_verifies(twin: Twin, nvp: NvpModel) -> None:
    await nvp.set(1)
    assert twin.mode == 1
    assert await nvp.get() == PowerMode(1, "MODE_15W")
    assert twin.switches() == [["-m", "1"]]


async def test_setting_the_active_mode_runs_nothing(twin: Twin, nvp: NvpModel) -> None:
    await nvp.set(2)
    assert twin.switches() == []


async def test_a_switch_that_needs_a_reboot_is_refused_before_running_it(twin: Twin, nvp: NvpModel) -> None:
    with pytest.raises(DriverError, match=r"mode 2 \(MODE_30W\) to 3 \(MODE_10W\).*reboot; refused"):
        await nvp.set(3)
    assert twin.switches() == []
    assert twin.mode == 2
    assert twin.load()["rebooted"] is False


async def test_when_the_tool_asks_to_reboot_the_answer_is_no(twin: Twin) -> None:
    twin.update(verbose_params=False)  # the driver cannot foresee the reboot: the tool's prompt must be declined
    nvp = NvpModel(conf_path=None)
    await nvp.open()
    with pytest.raises(DriverError, match=r"mode 3 \(MODE_10W\) needs a reboot.*declined"):
        await nvp.set(3)
    state = twin.load()
    assert state["stdin"] == ["NO"]
    assert state["rebooted"] is False
    assert state["mode"] == 2


async def test_unknown_mode_lists_the_modes_and_runs_nothing(twin: Twin, nvp: NvpModel) -> None:
    with pytest.raises(DriverError, match=r"power mode 9 does not exist.*0 MAXN, 1 MODE_15W"):
        await nvp.set(9)
    assert twin.switches() == []


async def test_a_failing_switch_reports_the_tools_error(twin: Twin, nvp: NvpModel) -> None:
    twin.update(deny=True)
    with pytest.raises(DriverError, match=r"exit 1.*Permission denied"):
        await nvp.set(0)


async def test_a_switch_that_silently_did_nothing_is_caught(twin: Twin, nvp: NvpModel) -> None:
    twin.update(ignore=True)
    with pytest.raises(DriverError, match=r"asked for mode 0 \(MAXN\) but the device reports 2"):
        await nvp.set(0)


async def test_query_without_an_id_line_maps_the_name(twin: Twin, nvp: NvpModel) -> None:
    twin.update(query_without_id=True, mode=1)
    assert await nvp.get() == PowerMode(1, "MODE_15W")


async def test_restore_on_close_puts_the_opening_mode_back(twin: Twin) -> None:
    nvp = NvpModel(conf_path=None, restore_on_close=True)
    await nvp.open()
    await nvp.set(0)
    await nvp.close()
    assert twin.mode == 2
    assert nvp.state is DriverState.CLOSED
    with pytest.raises(DriverStateError):
        await nvp.get()


async def test_close_leaves_the_mode_alone_by_default(twin: Twin, nvp: NvpModel) -> None:
    await nvp.set(1)
    await nvp.close()
    assert twin.mode == 1


async def test_missing_tool_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    nvp = NvpModel(conf_path=None)
    with pytest.raises(DriverError, match="'nvpmodel' not found; nvpmodel exists only on Jetson"):
        await nvp.open()
    assert nvp.state is DriverState.CLOSED


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_hung_tool_times_out_and_is_killed(twin: Twin) -> None:
    short = NvpModel(conf_path=None, timeout=0.5)
    await short.open()
    twin.update(hang=True)
    with pytest.raises(DriverError, match=r"`-q` gave no answer within 0.5s"):
        await short.get()
    assert not _alive(twin.load()["pid"])


async def test_cancelling_a_call_kills_the_tool(twin: Twin, nvp: NvpModel) -> None:
    twin.update(hang=True)
    task = asyncio.create_task(nvp.get())
    await until(lambda: len(twin.load()["calls"]) > 2, "the twin started and recorded its pid")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not _alive(twin.load()["pid"])
