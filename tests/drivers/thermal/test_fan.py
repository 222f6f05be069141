"""HwmonFan against the generated pwmfan hwmon node: profiles, restoring the platform's control, broken pwm1."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from drivers.base import DriverConfigError, DriverError, DriverState, DriverStateError, FanState
from drivers.sim.sysfs import ORIN_ZONES, SimSysfs, auto_pwm, rpm_for_pwm
from drivers.thermal.fan import HwmonFan, describe_write_error


class World:
    """Every Orin zone at one temperature (the twin's automatic fan follows the hottest zone)."""

    def __init__(self) -> None:
        self.celsius = 55.0

    def __call__(self) -> dict[str, float]:
        return {zone.type: self.celsius for zone in ORIN_ZONES}


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def sim(tmp_path: Path, world: World) -> SimSysfs:
    return SimSysfs(tmp_path / "sys", world)


def attr(sim: SimSysfs, name: str) -> str:
    return (sim.fan_dir / name).read_text().strip()


async def read_attr(sim: SimSysfs, name: str) -> str:
    return await asyncio.to_thread(attr, sim, name)


async def test_finds_the_pwm_fan_not_the_first_hwmon_node(sim: SimSysfs) -> None:
    fan = HwmonFan(sim.root)
    await fan.open()
    assert fan.state is DriverState.OPEN
    assert fan.name == f"hwmon:{sim.root}/class/hwmon/hwmon1"
    await fan.close()


async def test_default_profile_reports_the_platform_duty_and_tachometer(sim: SimSysfs, world: World) -> None:
    fan = HwmonFan(sim.root)
    await fan.open()
    expected = auto_pwm(55.0)
    assert await fan.status() == FanState("default", expected, rpm_for_pwm(expected))
    world.celsius = 80.0
    await asyncio.to_thread(sim.refresh)
    assert await fan.status() == FanState("default", 255, 5000)
    await fan.close()


@pytest.mark.parametrize(("profile", "pwm"), [("cool", 180), ("max", 255)])
async def test_manual_profiles_take_the_fan_and_hold_their_duty(
    sim: SimSysfs, world: World, profile: str, pwm: int
) -> None:
    fan = HwmonFan(sim.root)
    await fan.open()
    await fan.set_profile(profile)
    assert await read_attr(sim, "pwm1_enable") == "1"
    assert await read_attr(sim, "pwm1") == str(pwm)
    world.celsius = 30.0  # the platform curve would stop the fan; manual mode must not
    await asyncio.to_thread(sim.refresh)
    assert await fan.status() == FanState(profile, pwm, rpm_for_pwm(pwm))
    assert await asyncio.to_thread(sim.fan_pwm) == pwm
    await fan.close()


async def test_default_hands_the_fan_back_to_automatic_control(sim: SimSysfs, world: World) -> None:
    fan = HwmonFan(sim.root)
    await fan.open()
    await fan.set_profile("max")
    await fan.set_profile("default")
    assert await read_attr(sim, "pwm1_enable") == "2"
    world.celsius = 30.0
    await asyncio.to_thread(sim.refresh)
    assert await fan.status() == FanState("default", 0, 0)
    await fan.close()


async def test_close_restores_the_default_profile(sim: SimSysfs) -> None:
    fan = HwmonFan(sim.root)
    await fan.open()
    await fan.set_profile("max")
    await fan.close()
    assert fan.state is DriverState.CLOSED
    assert await read_attr(sim, "pwm1_enable") == "2"
    with pytest.raises(DriverStateError):
        await fan.status()


async def test_default_restores_a_manual_setting_found_at_open(sim: SimSysfs) -> None:
    def operator_set_manual() -> None:
        (sim.fan_dir / "pwm1_enable").write_text("1\n")
        (sim.fan_dir / "pwm1").write_text("90\n")

    await asyncio.to_thread(operator_set_manual)
    fan = HwmonFan(sim.root)
    await fan.open()
    await fan.set_profile("max")
    await fan.close()
    assert await read_attr(sim, "pwm1_enable") == "1"
    assert await read_attr(sim, "pwm1") == "90"


async def test_unknown_profile_names_the_valid_ones_and_changes_nothing(sim: SimSysfs) -> None:
    fan = HwmonFan(sim.root)
    await fan.open()
    with pytest.raises(DriverError, match=r"'turbo'.*default, cool, max"):
        await fan.set_profile("turbo")
    assert fan.profile == "default"
    assert await read_attr(sim, "pwm1_enable") == "2"
    await fan.close()


async def test_unwritable_pwm_is_a_driver_error_naming_the_file(sim: SimSysfs) -> None:
    fan = HwmonFan(sim.root)
    await fan.open()
    await asyncio.to_thread(sim.set_pwm_writable, False)
    with pytest.raises(DriverError, match=r"cannot write .*hwmon1/pwm1\b"):
        await fan.set_profile("cool")
    assert fan.profile == "default"
    assert await read_attr(sim, "pwm1_enable") == "2"  # rolled back: not left manual at an unknown duty
    status = await fan.status()
    assert status.pwm is None  # pwm1 cannot be read either
    await asyncio.to_thread(sim.set_pwm_writable, True)
    await fan.set_profile("cool")
    assert await read_attr(sim, "pwm1") == "180"
    await fan.close()


async def test_close_still_closes_when_restoring_fails(sim: SimSysfs) -> None:
    fan = HwmonFan(sim.root)
    await fan.open()
    await asyncio.to_thread(os.replace, sim.fan_dir / "pwm1_enable", sim.fan_dir / "pwm1_enable.gone")
    await asyncio.to_thread((sim.fan_dir / "pwm1_enable").mkdir)
    with pytest.raises(DriverError, match="pwm1_enable"):
        await fan.close()
    assert fan.state is DriverState.CLOSED


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        (errno.EACCES, "write access"),
        (errno.EPERM, "write access"),
        (errno.EROFS, "ProtectKernelTunables"),
        (errno.EISDIR, "pwm fan"),
    ],
)
def test_write_errors_say_what_to_do(code: int, hint: str) -> None:
    message = describe_write_error(Path("/sys/class/hwmon/hwmon1/pwm1"), OSError(code, os.strerror(code)))
    assert message.startswith("cannot write /sys/class/hwmon/hwmon1/pwm1: ")
    assert hint in message


async def test_hwmon_name_selects_and_a_missing_fan_is_a_config_error(sim: SimSysfs) -> None:
    named = HwmonFan(sim.root, hwmon_name="pwmfan")
    await named.open()
    await named.close()
    with pytest.raises(DriverConfigError, match=r"named 'pwm-fan'.*hwmon0='ina3221', hwmon1='pwmfan'"):
        await HwmonFan(sim.root, hwmon_name="pwm-fan").open()


async def test_no_fan_at_all_is_a_config_error(tmp_path: Path) -> None:
    await SimSysfs.create(tmp_path, fan=False)
    with pytest.raises(DriverConfigError, match="with pwm1"):
        await HwmonFan(tmp_path).open()


async def test_tachometer_on_a_separate_hwmon_node_or_none(sim: SimSysfs) -> None:
    def move_tach_to_its_own_node() -> None:
        tach = sim.root / "class" / "hwmon" / "hwmon2"
        tach.mkdir()
        (tach / "name").write_text("pwm_tach\n")
        os.replace(sim.fan_dir / "fan1_input", tach / "fan1_input")
        (tach / "fan1_input").write_text("1234\n")

    await asyncio.to_thread(move_tach_to_its_own_node)
    fan = HwmonFan(sim.root)
    await fan.open()
    assert (await fan.status()).rpm == 1234
    await fan.close()
    await asyncio.to_thread((sim.root / "class" / "hwmon" / "hwmon2" / "fan1_input").unlink)
    fan = HwmonFan(sim.root)
    await fan.open()
    assert (await fan.status()).rpm is None
    await fan.close()
