"""STUSB4500 driver against its register-level twin on the fake bus: docking, requests, wire bytes, faults."""

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
from drivers.i2c.chips.stusb4500 import DPM_PDO_NUMB, Stusb4500Model
from drivers.i2c.fake import FakeSMBus, FaultInjector, FaultKind, FaultRule
from drivers.i2c.transport import I2cBus
from drivers.power.stusb4500 import Stusb4500, decode_alert_block
from tests.drivers.threads import running
from tests.waiting import until

# A USB-C laptop charger: 5 V/3 A, 9 V/3 A, 15 V/3 A, 20 V/2.25 A.
LAPTOP = (0x0001912C, 0x0002D12C, 0x0004B12C, 0x000640E1)
PPS_3V3_11V_5A = 0xC0DC2164


class Port:
    """The far side of the dock port: the stacked module's PD source (raw PDO words), or nothing."""

    def __init__(self) -> None:
        self.pdos: tuple[int, ...] | None = None

    def __call__(self) -> tuple[int, ...] | None:
        return self.pdos


@dataclass
class Rig:
    port: Port
    model: Stusb4500Model
    fake: FakeSMBus
    driver: Stusb4500

    def register_writes(self) -> list[bytes]:
        """Writes that set registers (a lone pointer byte only selects what the next read returns)."""
        return [w for w in self.model.writes if len(w) > 1]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    port = Port()
    model = Stusb4500Model(source=port)
    fake = FakeSMBus(FaultInjector(seed=7, timeout_seconds=0.05))
    fake.attach(0x28, model)
    driver = Stusb4500(I2cBus("i2c-7", lambda: fake), settle_timeout=0.2, poll_interval=0.001)
    await driver.open()
    yield Rig(port, model, fake, driver)
    fake.faults.set_rules([])
    await driver.close()


async def test_docking_then_9v_then_back_to_5v_then_undocking(rig: Rig) -> None:
    driver, model = rig.driver, rig.model
    assert not await driver.attached()
    assert await driver.contract() == Contract("detached")
    assert model.vbus_mv == 0

    rig.port.pdos = LAPTOP  # a module is stacked: its source attaches and the chip takes 5 V on its own
    assert await driver.attached()
    default = await driver.contract()
    assert default.state == "explicit" and default.rdo is not None and default.rdo.object_position == 1
    assert model.vbus_mv == 5000

    caps = await driver.source_caps()
    assert [(p.index, p.kind, p.max_mv, p.max_ma) for p in caps] == [
        (1, "fixed", 5000, 3000),
        (2, "fixed", 9000, 3000),
        (3, "fixed", 15000, 3000),
        (4, "fixed", 20000, 2250),
    ]

    contract = await driver.request(2)
    assert contract.state == "explicit" and contract.selected == caps[1] and contract.source_pdos == caps
    assert contract.rdo is not None and contract.rdo.raw == 0x2004B12C  # position 2, 3000 mA, 3000 mA
    assert model.vbus_mv == 9000 and model.contract_rdo == 0x2004B12C
    assert await driver.contract() == contract

    back = await driver.reset_to_default()
    assert back.selected == caps[0] and back.rdo is not None and back.rdo.object_position == 1
    assert model.vbus_mv == 5000 and model.registers[DPM_PDO_NUMB] == 1

    rig.port.pdos = None
    assert await driver.contract() == Contract("detached")
    assert model.vbus_mv == 0


async def test_reading_source_caps_follows_st_sample_code_on_the_wire(rig: Rig) -> None:
    rig.port.pdos = LAPTOP
    rig.model.writes.clear()
    await rig.driver.source_caps()
    assert rig.model.writes == [
        b"\x0e",  # PORT_STATUS_1: attached?
        b"\x0c\xfd",  # ALERT_STATUS_MASK: unmask PRT_STATUS_AL only
        b"\x0b",  # read ALERT_STATUS_1..PRT_STATUS: clear what is latched
        b"\x51\x0d",  # TX_HEADER = Soft_Reset
        b"\x1a\x26",  # PD_COMMAND_CTRL = send
        b"\x0b",
        b"\x31",  # alert, then RX_HEADER: the source's Accept of the soft reset
        b"\x0b",
        b"\x31",
        b"\x33",  # alert, RX_HEADER: Source_Capabilities, then its four objects
        b"\x0b",
        b"\x31",  # Accept: the source grants the request the chip made from its sink PDOs
        b"\x0b",
        b"\x31",  # PS_RDY: the contract is settled
    ]


@pytest.mark.parametrize(
    ("index", "operating_ma", "sink_pdo2"),
    [
        (2, None, b"\x2c\xd1\x02\x00"),  # 9 V, 3 A: 0x0002D12C little-endian
        (2, 1500, b"\x96\xd0\x02\x00"),  # 9 V, 1.5 A
        (4, None, b"\xe1\x40\x06\x00"),  # 20 V, 2.25 A
    ],
)
async def test_request_writes_sink_pdo2_then_soft_reset(
    rig: Rig, index: int, operating_ma: int | None, sink_pdo2: bytes
) -> None:
    rig.port.pdos = LAPTOP
    await rig.driver.source_caps()
    rig.model.writes.clear()
    contract = await rig.driver.request(index, operating_ma)
    assert rig.register_writes() == [
        b"\x89" + sink_pdo2,  # DPM_SNK_PDO2
        b"\x70\x02",  # DPM_PDO_NUMB: PDO1 (5 V) and PDO2
        b"\x0c\xfd",  # ALERT_STATUS_MASK
        b"\x51\x0d",  # TX_HEADER = Soft_Reset
        b"\x1a\x26",  # PD_COMMAND_CTRL = send
    ]
    assert contract.rdo is not None and contract.selected is not None
    assert contract.rdo.operating_ma == (operating_ma or contract.selected.max_ma)


async def test_request_of_a_pdo_the_source_does_not_offer(rig: Rig) -> None:
    rig.port.pdos = LAPTOP
    with pytest.raises(NegotiationError, match=r"does not offer PDO 6 \(it offers PDO 1: fixed 5000 mV 3000 mA;"):
        await rig.driver.request(6)
    assert not [w for w in rig.register_writes() if w[0] in (0x89, 0x70)]  # the sink PDOs were left alone
    assert rig.model.vbus_mv == 5000


async def test_only_fixed_supplies_are_requested(rig: Rig) -> None:
    rig.port.pdos = (*LAPTOP, PPS_3V3_11V_5A)
    with pytest.raises(NegotiationError, match="PDO 5: augmented 3300-11000 mV 5000 mA is not a fixed supply"):
        await rig.driver.request(5)
    with pytest.raises(NegotiationError, match="3010 mA cannot be requested from PDO 2"):
        await rig.driver.request(2, 3010)


async def test_nothing_attached(rig: Rig) -> None:
    with pytest.raises(NotAttachedError, match="stusb4500:i2c-7@0x28: cannot read source capabilities"):
        await rig.driver.source_caps()
    with pytest.raises(NotAttachedError):
        await rig.driver.request(1)
    # The safe state is reachable without a source: the next attach will negotiate 5 V.
    assert await rig.driver.reset_to_default() == Contract("detached")
    assert rig.model.registers[DPM_PDO_NUMB] == 1


async def test_a_type_c_source_without_pd(rig: Rig) -> None:
    rig.port.pdos = ()
    assert (await rig.driver.contract()).state == "typec_only"
    with pytest.raises(NegotiationError, match=r"no Source_Capabilities from the source within 0.20 s"):
        await rig.driver.source_caps()
    assert rig.model.vbus_mv == 5000


async def test_a_rejected_request_keeps_the_old_contract(rig: Rig) -> None:
    rig.port.pdos = LAPTOP
    await rig.driver.source_caps()
    rig.model.source_rejects = True
    with pytest.raises(NegotiationError, match="the source rejected the request for PDO 3: fixed 15000 mV 3000 mA"):
        await rig.driver.request(3)
    contract = await rig.driver.contract()
    assert contract.rdo is not None and contract.rdo.object_position == 1 and rig.model.vbus_mv == 5000
    rig.model.source_rejects = False  # so that close() can restore the sink PDOs


async def test_capability_mismatch_is_reported_with_the_rdo_fields(rig: Rig) -> None:
    rig.port.pdos = LAPTOP
    await rig.driver.source_caps()
    rig.port.pdos = (LAPTOP[0], LAPTOP[2], LAPTOP[3])  # the source stops offering 9 V after we read its offer
    expected = (
        r"asked for PDO 2: fixed 9000 mV 3000 mA at 3000 mA, but the contract is RDO 0x14025896 "
        r"\(object position 1, operating 1500 mA, max 1500 mA, capability mismatch set\)"
    )
    with pytest.raises(NegotiationError, match=expected):
        await rig.driver.request(2)
    assert rig.model.vbus_mv == 5000
    assert [p.max_mv for p in (await rig.driver.contract()).source_pdos] == [5000, 15000, 20000]


async def test_reading_the_offer_settles_the_contract_the_chip_requests_for_it(rig: Rig) -> None:
    rig.port.pdos = LAPTOP
    await rig.driver.request(2)
    rig.port.pdos = (LAPTOP[0], LAPTOP[2])  # the source no longer offers 9 V
    caps = await rig.driver.source_caps()
    assert [p.max_mv for p in caps] == [5000, 15000]
    contract = await rig.driver.contract()
    assert contract.rdo is not None and contract.rdo.object_position == 1 and contract.rdo.capability_mismatch
    assert contract.selected == caps[0] and rig.model.vbus_mv == 5000


async def test_concurrent_callers_get_one_exchange_at_a_time(rig: Rig) -> None:
    rig.port.pdos = LAPTOP
    caps, contract, _ = await asyncio.gather(rig.driver.source_caps(), rig.driver.request(3), rig.driver.contract())
    assert len(caps) == 4 and contract.selected is not None and contract.selected.max_mv == 15000
    assert rig.model.vbus_mv == 15000


async def test_close_brings_the_port_back_to_5v(rig: Rig) -> None:
    rig.port.pdos = LAPTOP
    await rig.driver.request(4)
    assert rig.model.vbus_mv == 20000
    await rig.driver.close()
    assert rig.model.vbus_mv == 5000 and rig.model.registers[DPM_PDO_NUMB] == 1
    assert rig.driver.state is DriverState.CLOSED and rig.fake.closed
    with pytest.raises(DriverStateError, match="is closed; open"):
        await rig.driver.contract()


async def test_close_on_a_failing_bus_reports_it_and_still_releases_the_bus(rig: Rig) -> None:
    rig.port.pdos = LAPTOP
    await rig.driver.request(2)
    rig.fake.faults.set_rules([FaultRule("nack", 1.0)])
    with pytest.raises(NotAcknowledgedError):
        await rig.driver.close()  # the port may still be at 9 V: the caller must hear about it
    assert rig.driver.state is DriverState.CLOSED and rig.fake.closed


async def test_wrong_device_id() -> None:
    fake = FakeSMBus()
    fake.attach(0x28, Stusb4500Model(source=Port(), device_id=0x42))
    driver = Stusb4500(I2cBus("i2c-7", lambda: fake))
    with pytest.raises(DeviceMismatchError, match=r"DEVICE_ID \(0x2F\) reads 0x42, expected 0x25 or 0x21"):
        await driver.open()
    assert driver.state is DriverState.FAULTED and fake.closed
    with pytest.raises(DriverStateError):
        await driver.source_caps()


async def test_nobody_at_the_address() -> None:
    fake = FakeSMBus()
    driver = Stusb4500(I2cBus("i2c-7", lambda: fake))
    with pytest.raises(NotAcknowledgedError) as caught:
        await driver.open()
    assert caught.value.errno == errno.EREMOTEIO and driver.state is DriverState.FAULTED


@pytest.mark.parametrize(
    ("kind", "error", "code"),
    [
        ("nack", NotAcknowledgedError, errno.EREMOTEIO),
        ("enxio", NotAcknowledgedError, errno.ENXIO),
        ("timeout", BusTimeoutError, errno.ETIMEDOUT),
        ("stuck", NegotiationError, None),  # the RX registers never change: no Accept before settle_timeout
        ("implausible", ImplausibleReadingError, None),  # RX_HEADER 0xFFFF has the reserved revision 11b
    ],
)
async def test_faults_are_driver_errors_and_the_driver_recovers(
    rig: Rig, kind: FaultKind, error: type[DriverError], code: int | None
) -> None:
    rig.port.pdos = LAPTOP
    await rig.driver.source_caps()
    rig.fake.faults.set_rules([FaultRule(kind, 1.0, 0x28)])
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(error) as caught:
        await rig.driver.request(3)
    assert loop.time() - started < 1.0  # bounded by settle_timeout and the bus timeout, never a hang
    if code is not None:
        assert getattr(caught.value, "errno", None) == code
    assert rig.driver.state is DriverState.OPEN  # a bus fault is not the driver's end
    rig.fake.faults.set_rules([])
    contract = await rig.driver.request(3)
    assert contract.selected is not None and contract.selected.max_mv == 15000 and rig.model.vbus_mv == 15000


async def test_a_transfer_that_never_returns_times_out_and_the_bus_recovers() -> None:
    port = Port()
    port.pdos = LAPTOP
    fake = FakeSMBus(FaultInjector(timeout_seconds=0.3))
    fake.attach(0x28, Stusb4500Model(source=port))
    driver = Stusb4500(I2cBus("i2c-7", lambda: fake, timeout=0.1), settle_timeout=0.2)
    await driver.open()
    fake.faults.set_rules([FaultRule("timeout", 1.0)])
    with pytest.raises(BusTimeoutError, match="no answer within 0.10s"):
        await driver.source_caps()
    fake.faults.set_rules([])
    # The stalled transfer holds the bus thread until the adapter gives up.
    await until(lambda: not running(FakeSMBus.i2c_rdwr.__code__), "the stalled transfer giving up")
    assert len(await driver.source_caps()) == 4
    await driver.close()


# ----------------------------------------------------------------------------- the twin's register semantics


def _read(model: Stusb4500Model, register: int, length: int) -> bytes:
    model.on_write(bytes([register]))
    return model.on_read(length)


def test_twin_event_registers_clear_on_read_and_report_attach() -> None:
    port = Port()
    model = Stusb4500Model(source=port)
    assert _read(model, 0x2F, 1) == b"\x25"
    assert _read(model, 0x0E, 1) == b"\x00"
    port.pdos = LAPTOP
    block = decode_alert_block(_read(model, 0x0B, 12))
    assert block.attached and block.alert & 0x40 and not block.message_received
    assert _read(model, 0x0B, 1) == b"\x00"  # ALERT_STATUS_1 cleared by the read above
    assert _read(model, 0x11, 1) == b"\x03"
    assert _read(model, 0x91, 4) == (0x10025896).to_bytes(4, "little")  # 5 V at the NVM's 1.5 A
    assert model.implausible(3) == b"\xff\xff\xff"


def test_twin_message_sequence_after_a_soft_reset() -> None:
    port = Port()
    port.pdos = LAPTOP
    model = Stusb4500Model(source=port)
    # One write auto-increments through DPM_SNK_PDO2 and DPM_SNK_PDO3.
    model.on_write(b"\x89" + (0x0002D12C).to_bytes(4, "little") + (0x0004B12C).to_bytes(4, "little"))
    assert _read(model, 0x89, 8) == bytes.fromhex("2cd102002cb10400")
    model.on_write(b"\x70\x03")
    model.on_write(b"\x51\x0d")
    model.on_write(b"\x1a\x26")
    headers = []
    for _ in range(4):
        assert _read(model, 0x16, 1) == b"\x04"  # MSG_RECEIVED, then cleared by reading
        header = int.from_bytes(_read(model, 0x31, 2), "little")
        headers.append(header)
        if header >> 12:
            assert model.contract_rdo == 0x10025896  # nothing requested before the offer is read
            assert _read(model, 0x33, 16) == b"".join(w.to_bytes(4, "little") for w in LAPTOP)
            assert model.contract_rdo == 0x3004B12C and model.vbus_mv == 5000  # accepted, not yet switched
    # Accept (of the soft reset), Source_Capabilities (4 objects), Accept, PS_RDY; message IDs 0..3.
    assert headers == [0x01A3, 0x43A1, 0x05A3, 0x07A6]
    assert model.vbus_mv == 15000  # the highest-numbered sink PDO the source meets
    assert _read(model, 0x16, 1) == b"\x00"


def test_twin_falls_back_to_5v_with_capability_mismatch_and_models_reset() -> None:
    port = Port()
    port.pdos = LAPTOP
    model = Stusb4500Model(source=port)
    model.on_write(b"\x89" + (0x0003C064).to_bytes(4, "little"))  # 12 V/1 A: not offered
    model.on_write(b"\x70\x02")
    model.on_write(b"\x23\x01")  # RESET_CTRL: the port is held in reset, the source sees a detach
    assert model.vbus_mv == 0 and model.contract_rdo == 0
    model.on_write(b"\x23\x00")  # released: attach, negotiate from the sink PDOs
    assert model.contract_rdo == 0x14025896 and model.vbus_mv == 5000
