"""TPS25750 driver against its command-level twin on the fake bus: docking, requests, wire bytes, faults."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from drivers.base import (
    BusTimeoutError,
    Contract,
    DeviceMismatchError,
    DriverError,
    DriverState,
    DriverStateError,
    ImplausibleReadingError,
    NegotiationError,
    NotAcknowledgedError,
    NotAttachedError,
)
from drivers.i2c.chips.stusb4500 import Stusb4500Model
from drivers.i2c.chips.tps25750 import TX_SINK_CAPS, Tps25750Model
from drivers.i2c.fake import FakeSMBus, FaultInjector, FaultKind, FaultRule
from drivers.i2c.transport import I2cBus
from drivers.power.tps25750 import Tps25750, decode_block, decode_pdo_list, encode_command, encode_sink_caps

LAPTOP = (0x0001912C, 0x0002D12C, 0x0004B12C, 0x000640E1)  # 5 V/3 A, 9 V/3 A, 15 V/3 A, 20 V/2.25 A


class Port:
    """The far side of the dock port: the stacked module's PD source (raw PDO words), or nothing."""

    def __init__(self) -> None:
        self.pdos: tuple[int, ...] | None = None

    def __call__(self) -> tuple[int, ...] | None:
        return self.pdos


@dataclass
class Rig:
    port: Port
    model: Tps25750Model
    fake: FakeSMBus
    driver: Tps25750


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    port = Port()
    model = Tps25750Model(source=port)
    fake = FakeSMBus(FaultInjector(seed=3, timeout_seconds=0.05))
    fake.attach(0x21, model)
    driver = Tps25750(I2cBus("i2c-7", lambda: fake), settle_timeout=0.2, poll_interval=0.001)
    await driver.open()
    yield Rig(port, model, fake, driver)
    fake.faults.set_rules([])
    model.source_rejects = False
    await driver.close()


async def test_docking_then_9v_then_back_to_5v_then_undocking(rig: Rig) -> None:
    driver, model = rig.driver, rig.model
    assert not await driver.attached()
    assert await driver.contract() == Contract("detached")
    assert model.vbus_mv == 0

    rig.port.pdos = LAPTOP
    default = await driver.contract()
    assert default.state == "explicit" and default.rdo is not None and default.rdo.raw == 0x1004B12C
    assert default.selected is not None and default.selected.max_mv == 5000 and model.vbus_mv == 5000

    caps = await driver.source_caps()
    assert [(p.index, p.max_mv, p.max_ma) for p in caps] == [
        (1, 5000, 3000),
        (2, 9000, 3000),
        (3, 15000, 3000),
        (4, 20000, 2250),
    ]
    contract = await driver.request(2)
    assert contract.state == "explicit" and contract.selected == caps[1] and contract.source_pdos == caps
    assert contract.rdo is not None and contract.rdo.raw == 0x2004B12C
    assert model.vbus_mv == 9000 and model.contract_rdo == 0x2004B12C
    assert await driver.contract() == contract

    back = await driver.reset_to_default()
    assert back.selected == caps[0] and model.vbus_mv == 5000
    assert decode_pdo_list(bytes(model.registers[TX_SINK_CAPS])) == (0x0001912C,)  # the 5 V sink PDO alone

    rig.port.pdos = None
    assert await driver.contract() == Contract("detached")
    assert model.vbus_mv == 0
    assert model.commands == ["GSrC", "GSrC", "GSrC"]


async def test_request_rewrites_tx_sink_caps_then_issues_gsrc(rig: Rig) -> None:
    rig.port.pdos = LAPTOP
    await rig.driver.source_caps()
    rig.model.writes.clear()
    await rig.driver.request(3, 2000)
    assert rig.model.writes == [
        b"\x1a",  # STATUS: PlugPresent?
        b"\x33",  # TX_SINK_CAPS: keep the Application Configuration's 5 V PDO
        bytes([0x33, 29, 2]) + bytes.fromhex("2c910100c8b00400") + bytes(20),  # 5 V/3 A, 15 V/2 A
        b"\x08\x04GSrC",  # CMD1
        b"\x08",
        b"\x08",  # CMD1 reads "GSrC" while the task runs, then 0
        b"\x09",  # DATA1: task result
        b"\x30",  # RX_SOURCE_CAPS
        b"\x35",
        b"\x34",  # ACTIVE_CONTRACT_RDO, ACTIVE_CONTRACT_PDO
    ]
    assert rig.model.contract_rdo == 0x300320C8  # position 3, 2000 mA, 2000 mA
    assert rig.model.vbus_mv == 15000


async def test_request_of_a_pdo_the_source_does_not_offer(rig: Rig) -> None:
    rig.port.pdos = LAPTOP
    with pytest.raises(NegotiationError, match=r"tps25750:i2c-7@0x21: the source does not offer PDO 5 \(it offers"):
        await rig.driver.request(5)
    assert not [w for w in rig.model.writes if w[:1] == b"\x33" and len(w) > 1]  # TX_SINK_CAPS untouched
    assert rig.model.vbus_mv == 5000


async def test_nothing_attached(rig: Rig) -> None:
    with pytest.raises(NotAttachedError, match="cannot read source capabilities: no USB-PD source is attached"):
        await rig.driver.source_caps()
    with pytest.raises(NotAttachedError):
        await rig.driver.request(1)
    assert rig.model.commands == []  # nothing was asked of a port with no partner
    assert await rig.driver.reset_to_default() == Contract("detached")


async def test_a_type_c_source_without_pd(rig: Rig) -> None:
    rig.port.pdos = ()
    assert (await rig.driver.contract()).state == "typec_only"
    with pytest.raises(NegotiationError, match=r"4CC 'GSrC' failed: task result 3 \(rejected\)"):
        await rig.driver.source_caps()


async def test_a_rejected_request_keeps_the_old_contract(rig: Rig) -> None:
    rig.port.pdos = LAPTOP
    await rig.driver.source_caps()
    rig.model.source_rejects = True
    with pytest.raises(
        NegotiationError,
        match=r"asked for PDO 4: fixed 20000 mV 2250 mA at 2250 mA, but the contract "
        r"is RDO 0x1004b12c \(PDO 1: fixed 5000 mV 3000 mA; object position 1",
    ):
        await rig.driver.request(4)
    assert rig.model.vbus_mv == 5000


async def test_concurrent_callers_get_one_task_at_a_time(rig: Rig) -> None:
    rig.port.pdos = LAPTOP
    results = await asyncio.gather(rig.driver.source_caps(), rig.driver.request(3), rig.driver.request(2))
    assert [p.max_mv for p in results[0]] == [5000, 9000, 15000, 20000]
    assert [c.selected.max_mv for c in results[1:] if c.selected is not None] == [15000, 9000]
    assert rig.model.vbus_mv == 9000


async def test_close_brings_the_port_back_to_5v(rig: Rig) -> None:
    rig.port.pdos = LAPTOP
    await rig.driver.request(4)
    assert rig.model.vbus_mv == 20000
    await rig.driver.close()
    assert rig.model.vbus_mv == 5000 and rig.driver.state is DriverState.CLOSED and rig.fake.closed


async def test_another_chip_at_the_address() -> None:
    fake = FakeSMBus()
    fake.attach(0x21, Stusb4500Model(source=Port()))
    driver = Tps25750(I2cBus("i2c-7", lambda: fake), 0x21)
    with pytest.raises(DeviceMismatchError, match=r"MODE \(0x03\) reads 00 00 00 00 00, not a TPS25750 mode"):
        await driver.open()
    assert driver.state is DriverState.FAULTED and fake.closed


async def test_a_chip_waiting_for_its_patch_bundle() -> None:
    fake = FakeSMBus()
    fake.attach(0x21, Tps25750Model(source=Port(), mode="PTCH"))
    driver = Tps25750(I2cBus("i2c-7", lambda: fake))
    with pytest.raises(DriverStateError, match=r"in patch mode \('PTCH'\)"):
        await driver.open()


@pytest.mark.parametrize(
    ("kind", "error", "code"),
    [
        ("nack", NotAcknowledgedError, errno.EREMOTEIO),
        ("enxio", NotAcknowledgedError, errno.ENXIO),
        ("timeout", BusTimeoutError, errno.ETIMEDOUT),
        ("stuck", NegotiationError, None),  # CMD1/RDO repeat their last answers: the contract is not the one asked for
        ("implausible", ImplausibleReadingError, None),  # a byte count of 255
    ],
)
async def test_faults_are_driver_errors_and_the_driver_recovers(
    rig: Rig, kind: FaultKind, error: type[DriverError], code: int | None
) -> None:
    rig.port.pdos = LAPTOP
    await rig.driver.source_caps()
    rig.fake.faults.set_rules([FaultRule(kind, 1.0, 0x21)])
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(error) as caught:
        await rig.driver.request(3)
    assert loop.time() - started < 1.0
    if code is not None:
        assert getattr(caught.value, "errno", None) == code
    assert rig.driver.state is DriverState.OPEN
    rig.fake.faults.set_rules([])
    contract = await rig.driver.request(3)
    assert contract.selected is not None and contract.selected.max_mv == 15000 and rig.model.vbus_mv == 15000


# ----------------------------------------------------------------------------- host interface codec and twin


def _read(model: Tps25750Model, register: int, length: int) -> bytes:
    model.on_write(bytes([register]))
    return model.on_read(length)


def test_codec_bytes() -> None:
    assert encode_command("GSrC") == b"\x08\x04GSrC"
    assert decode_block(0x03, b"\x04APP \x00", 4) == b"APP "
    with pytest.raises(ValueError, match="reports 255 bytes"):
        decode_block(0x1A, b"\xff" * 6, 5)
    with pytest.raises(ValueError, match="reports 2 bytes; expected at least 4"):
        decode_block(0x35, b"\x02\x00\x00\x00\x00", 4)
    assert encode_sink_caps((0x0001912C,)) == b"\x01\x2c\x91\x01\x00" + bytes(24)
    with pytest.raises(ValueError, match="1 to 7"):
        encode_sink_caps(())


def test_twin_block_reads_commands_and_events() -> None:
    port = Port()
    model = Tps25750Model(source=port)
    assert _read(model, 0x03, 5) == b"\x04APP "
    assert _read(model, 0x03, 3) == b"\x04AP"  # the host may stop early
    assert _read(model, 0x1A, 6) == b"\x05" + bytes(5)  # detached
    port.pdos = LAPTOP
    status = _read(model, 0x1A, 6)
    assert status[1] == 0x0D and status[3] >> 4 == 1  # PlugPresent, ConnState 6; VBUS at vSafe5V
    events = int.from_bytes(_read(model, 0x14, 12)[1:], "little")
    assert events == 1 << 3 | 1 << 12 | 1 << 14  # plug, new contract as consumer, source caps received
    model.on_write(bytes([0x18, 11]) + (1 << 3 | 1 << 14).to_bytes(11, "little"))  # INT_CLEAR1
    assert int.from_bytes(_read(model, 0x14, 12)[1:], "little") == 1 << 12
    model.on_write(b"\x08\x04ANeg")  # TPS25751/TPS26750 only
    assert _read(model, 0x08, 5) == b"\x04!CMD"
    port.pdos = None
    model.on_write(b"\x08\x04GSrC")
    assert _read(model, 0x08, 5) == b"\x04GSrC"  # running
    assert _read(model, 0x08, 5) == b"\x04" + bytes(4)  # done
    assert _read(model, 0x09, 2) == b"\x40\x03"  # rejected: nobody to ask
    assert model.commands == ["ANeg", "GSrC"]
    assert model.implausible(2) == b"\xff\xff"
