"""SerialDockLink against the dock controller twin over a real pty: requests, errors, events and every fault."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from drivers.base import DeviceMismatchError, DriverState, DriverStateError, LinkError, SerialMessage
from drivers.serial.frame import DOCK_PRODUCT_ID, DockStatus, ErrorCode, Kind, LedMode, LedState, Pong, encode_frame
from drivers.serial.link import ControllerError, SerialDockLink
from drivers.sim.dock_controller import DockControllerTwin, SerialFault, status_from_world
from drivers.sim.world import SimModule, SimWorld

FAST = 0.15  # request timeout in fault tests: the twin answers in well under a millisecond


@dataclass
class World:
    """What the dock's sensors read; the twin asks it on every GET_STATUS."""

    status: DockStatus = DockStatus(magnet=True, module_present=True, vbus_mv=5012)
    broken: bool = False

    def read(self) -> DockStatus:
        if self.broken:
            raise RuntimeError("ADC conversion timed out")
        return self.status


@pytest.fixture
async def world() -> World:
    return World()


@pytest.fixture
async def twin(world: World) -> AsyncIterator[DockControllerTwin]:
    controller = DockControllerTwin(world.read, seed=7).start()
    yield controller
    await controller.aclose()


@pytest.fixture
async def link(twin: DockControllerTwin) -> AsyncIterator[SerialDockLink]:
    serial_link = SerialDockLink(twin.path)
    await serial_link.open()
    yield serial_link
    await serial_link.close()


async def test_open_pings_and_identifies_the_controller(link: SerialDockLink, twin: DockControllerTwin) -> None:
    assert link.state is DriverState.OPEN and link.name == f"serial:{twin.path}"
    assert link.controller == Pong(DOCK_PRODUCT_ID, (1, 0), b"thox")
    # What went over the wire: one PING, sequence 1, the nonce.
    assert twin.requests == [SerialMessage(Kind.PING, 1, b"thox")]


async def test_ping_echoes_the_nonce(link: SerialDockLink) -> None:
    assert (await link.ping(b"\x00\x01\x02")).nonce == b"\x00\x01\x02"


async def test_requests_carry_consecutive_sequence_numbers(link: SerialDockLink, twin: DockControllerTwin) -> None:
    replies = [await link.request(Kind.PING, b"") for _ in range(3)]
    assert [r.sequence for r in replies] == [2, 3, 4]
    assert [m.sequence for m in twin.requests] == [1, 2, 3, 4]


async def test_status_is_what_the_world_reads(link: SerialDockLink, world: World) -> None:
    assert await link.status() == DockStatus(True, True, 5012, LedState())
    world.status = DockStatus(False, False, 0)
    assert await link.status() == DockStatus(False, False, 0, LedState())


async def test_set_led_changes_the_controllers_led(link: SerialDockLink, twin: DockControllerTwin) -> None:
    led = LedState(LedMode.BLINK, 0, 128, 255)
    assert await link.set_led(led) == led
    assert twin.led == led
    assert (await link.status()).led == led
    assert twin.requests[-2] == SerialMessage(Kind.SET_LED, 2, bytes((2, 0, 128, 255)))


async def test_unknown_kind_raises_with_the_controllers_text(link: SerialDockLink) -> None:
    with pytest.raises(ControllerError, match="kind 0x2a is not a request") as caught:
        await link.request(0x2A)
    assert caught.value.code == ErrorCode.UNKNOWN_KIND
    assert isinstance(caught.value, LinkError)


async def test_a_reply_kind_sent_as_a_request_is_rejected(link: SerialDockLink) -> None:
    with pytest.raises(ControllerError, match="kind STATUS is not a request"):
        await link.request(Kind.STATUS, DockStatus(True, True, 1).encode())


@pytest.mark.parametrize(
    ("kind", "payload", "code", "text"),
    [
        (Kind.SET_LED, bytes((9, 0, 0, 0)), ErrorCode.BAD_VALUE, "LED mode 9"),
        (Kind.SET_LED, bytes((1, 0)), ErrorCode.BAD_LENGTH, "must be 4 bytes"),
        (Kind.GET_STATUS, b"\x01", ErrorCode.BAD_LENGTH, "takes no payload"),
        (Kind.PING, bytes(17), ErrorCode.BAD_LENGTH, "at most 16"),
    ],
)
async def test_malformed_payloads_are_answered_with_errors(
    link: SerialDockLink, twin: DockControllerTwin, kind: Kind, payload: bytes, code: ErrorCode, text: str
) -> None:
    with pytest.raises(ControllerError, match=text) as caught:
        await link.request(kind, payload)
    assert caught.value.code == code
    assert twin.led == LedState()  # a rejected SET_LED changes nothing


async def test_a_failing_sensor_is_an_internal_error(link: SerialDockLink, world: World) -> None:
    world.broken = True
    with pytest.raises(ControllerError, match="ADC conversion timed out") as caught:
        await link.status()
    assert caught.value.code == ErrorCode.INTERNAL


async def test_an_unencodable_reading_is_an_internal_error(link: SerialDockLink, world: World) -> None:
    world.status = DockStatus(True, True, vbus_mv=70_000)
    with pytest.raises(ControllerError, match="does not fit in 16 bits") as caught:
        await link.status()
    assert caught.value.code == ErrorCode.INTERNAL
    world.status = DockStatus(True, True, 5000)
    assert (await link.status()).vbus_mv == 5000  # the controller thread survived it


async def test_events_arrive_between_replies(link: SerialDockLink, twin: DockControllerTwin) -> None:
    twin.notify(DockStatus(False, False, 0))
    twin.notify()
    assert (await link.ping()).product_id == DOCK_PRODUCT_ID  # replies still match with events in between
    events = link.events()
    first = await asyncio.wait_for(anext(events), 1.0)
    second = await asyncio.wait_for(anext(events), 1.0)
    assert first == SerialMessage(Kind.EVENT, 0, DockStatus(False, False, 0).encode())
    assert (second.kind, second.sequence, DockStatus.decode(second.payload, Kind.EVENT)) == (
        Kind.EVENT,
        1,
        DockStatus(True, True, 5012),
    )
    assert link.stale_replies == 0


async def test_garbage_between_frames_is_skipped(link: SerialDockLink, twin: DockControllerTwin) -> None:
    twin.set_faults([SerialFault("garbage")])
    for _ in range(10):
        assert (await link.status(timeout=FAST)).vbus_mv == 5012
    assert twin.injected.count("garbage") == 10
    assert link.decoder.stats.discarded_bytes > 0 and link.timeouts == 0


async def test_a_stray_header_mid_stream_does_not_stall_the_reply(
    link: SerialDockLink, twin: DockControllerTwin
) -> None:
    # A plausible header claiming 32 bytes arrives just before the reply: without the idle resync the reply would
    # sit inside the claimed payload until more bytes came, and the request would time out.
    twin.inject(bytes.fromhex("a5 41 09 20 00"))
    assert (await link.status(timeout=0.5)).magnet
    assert link.decoder.stats.abandoned == 1 and link.timeouts == 0


async def test_a_silent_controller_fails_after_one_retry(link: SerialDockLink, twin: DockControllerTwin) -> None:
    twin.set_faults([SerialFault("drop")])
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(LinkError, match=r"no answer to GET_STATUS \(sequence 2, 3\) within 0.15s"):
        await link.status(timeout=FAST)
    assert loop.time() - started == pytest.approx(2 * FAST, abs=0.1)
    assert [m.sequence for m in twin.requests[-2:]] == [2, 3] and link.timeouts == 2
    twin.set_faults([])
    assert (await link.status(timeout=FAST)).magnet  # the link itself is fine


async def test_one_corrupt_reply_is_retried(link: SerialDockLink, twin: DockControllerTwin) -> None:
    twin.set_faults([SerialFault("corrupt", limit=1)])
    assert await link.status(timeout=FAST) == DockStatus(True, True, 5012)
    assert twin.injected == ["corrupt"] and link.timeouts == 1
    stats = link.decoder.stats
    assert stats.crc_errors + stats.header_errors + stats.abandoned + stats.discarded_bytes > 0


async def test_corrupt_replies_every_time_fail(link: SerialDockLink, twin: DockControllerTwin) -> None:
    twin.set_faults([SerialFault("corrupt")])
    with pytest.raises(LinkError, match="no answer to PING"):
        await link.ping(timeout=FAST)
    assert twin.injected == ["corrupt", "corrupt"]


async def test_a_late_reply_to_the_first_attempt_completes_the_retry(
    link: SerialDockLink, twin: DockControllerTwin
) -> None:
    # The controller stays silent; the reply to the first attempt (sequence 2) turns up while the box is waiting
    # on its retry (sequence 3). It is the answer to the same request, so it is taken.
    twin.set_faults([SerialFault("drop")])
    late = encode_frame(Kind.PONG, 2, Pong(DOCK_PRODUCT_ID, (1, 0), b"late").encode())

    async def answer_once_the_retry_is_out() -> None:
        # The twin's thread appends to `requests`; there is nothing to await, so poll it.
        while len(twin.requests) < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.005)  # a test double's poll, bounded by the ping's timeout
        twin.inject(late)

    answering = asyncio.create_task(answer_once_the_retry_is_out())
    assert (await link.ping(b"late", timeout=2 * FAST)).nonce == b"late"
    await answering
    assert link.timeouts == 1 and [m.sequence for m in twin.requests[-2:]] == [2, 3]


async def test_a_stale_reply_is_counted_and_never_taken_for_a_later_request(
    link: SerialDockLink, twin: DockControllerTwin
) -> None:
    # A PONG for sequence 1 (answered long ago, at open) arrives just before the reply to GET_STATUS.
    twin.inject(encode_frame(Kind.PONG, 1, Pong(DOCK_PRODUCT_ID, (1, 0), b"thox").encode()))
    assert await link.status() == DockStatus(True, True, 5012)
    assert link.stale_replies == 1


async def test_close_ends_events_and_refuses_requests(link: SerialDockLink) -> None:
    consumer = asyncio.create_task(anext(link.events(), None))
    await asyncio.sleep(0)
    await link.close()
    assert await consumer is None
    assert link.state is DriverState.CLOSED
    with pytest.raises(DriverStateError, match="closed"):
        await link.ping()


async def test_controller_gone_faults_the_link(twin: DockControllerTwin, caplog: pytest.LogCaptureFixture) -> None:
    link = SerialDockLink(twin.path)
    await link.open()
    try:
        await twin.aclose()  # the master side closes: the port hangs up
        with pytest.raises(LinkError):
            await asyncio.wait_for(anext(link.events()), 1.0)
        assert link.state is DriverState.FAULTED
        with pytest.raises(DriverStateError, match="faulted"):
            await link.ping()
    finally:
        await link.close()
    # Closing a transport that hung up must not start a second, failing teardown inside the library: a window
    # in which that error may show (nothing later proves it will not), so a bounded pause, not a wait.
    await asyncio.sleep(0.05)
    gc.collect()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_open_fails_on_a_missing_port() -> None:
    link = SerialDockLink("/dev/does-not-exist")
    with pytest.raises(LinkError, match="cannot open the dock controller's port at 115200 8N1"):
        await link.open()
    assert link.state is DriverState.FAULTED


async def test_open_fails_when_nothing_answers(twin: DockControllerTwin) -> None:
    twin.set_faults([SerialFault("drop")])
    link = SerialDockLink(twin.path, verify_timeout=0.05)
    with pytest.raises(LinkError, match="no answer to PING"):
        await link.open()
    assert link.state is DriverState.FAULTED


async def test_open_rejects_another_product(world: World) -> None:
    other = DockControllerTwin(world.read, product_id=0x1234, firmware=(3, 1)).start()
    try:
        link = SerialDockLink(other.path)
        with pytest.raises(DeviceMismatchError, match="product 0x1234 firmware 3.1"):
            await link.open()
        assert link.state is DriverState.FAULTED
    finally:
        await other.aclose()


async def test_twin_status_follows_the_sim_world() -> None:
    world = SimWorld()
    controller = DockControllerTwin(status_from_world(world, vbus_mv=9000)).start()
    link = SerialDockLink(controller.path)
    try:
        await link.open()
        assert await link.status() == DockStatus(False, False, 0)
        world.stack(SimModule("m1", (0x0001912C,)))
        assert await link.status() == DockStatus(True, True, 9000)
    finally:
        await link.close()
        await controller.aclose()
