"""GpioDock over a scripted line request: the real add_reader, debounce and confirmation timers, no gpio-sim needed.

The fake request has a real fd (a pipe) that becomes readable when edge events are queued, like a line request's
fd does, and timestamps events on CLOCK_MONOTONIC as the kernel does for the requested event clock.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta

import gpiod
import pytest
from gpiod.line import Bias, Clock, Direction, Edge, Value

from drivers.base import DockEvent, DriverConfigError, DriverError, DriverState, DriverStateError
from drivers.dock.gpio import GpioDock, parse_gpio_config

RISING = gpiod.EdgeEvent.Type.RISING_EDGE.value
FALLING = gpiod.EdgeEvent.Type.FALLING_EDGE.value
DEBOUNCE, CONFIRM = 0.01, 0.05


class FakeLineRequest:
    """A line request with a readable pipe fd, a scripted value and scripted edge events."""

    def __init__(self, line: int, value: Value) -> None:
        self.line = line
        self.value = value
        self._read_fd, self._write_fd = os.pipe()
        self._events: list[gpiod.EdgeEvent] = []
        self.read_error: OSError | None = None
        self.released = False
        self.reads = 0

    @property
    def fd(self) -> int:
        return self._read_fd

    def push(self, *edges: tuple[int, float]) -> None:
        """Queue edges (type, loop time in seconds) and make the fd readable."""
        for kind, at in edges:
            self._events.append(gpiod.EdgeEvent(kind, int(at * 1e9), self.line, len(self._events), len(self._events)))
        os.write(self._write_fd, b"e")

    def get_value(self, line: int | str) -> Value:
        assert line == self.line
        return self.value

    def read_edge_events(self, max_events: int | None = None) -> list[gpiod.EdgeEvent]:
        self.reads += 1
        if self.read_error is not None:
            raise self.read_error
        os.read(self._read_fd, 1024)  # raises BlockingIOError on a spurious wake-up, as the non-blocking fd does
        events, self._events = self._events, []
        return events

    def release(self) -> None:
        self.released = True
        os.close(self._read_fd)
        os.close(self._write_fd)


class Requests:
    """A request_lines stand-in that records its calls."""

    def __init__(self, value: Value = Value.INACTIVE, error: Exception | None = None) -> None:
        self.value = value
        self.error = error
        self.calls: list[tuple[str, str, Mapping[int, gpiod.LineSettings]]] = []
        self.request: FakeLineRequest | None = None

    def __call__(self, path: str, *, consumer: str, config: Mapping[int, gpiod.LineSettings]) -> FakeLineRequest:
        self.calls.append((path, consumer, config))
        if self.error is not None:
            raise self.error
        (line,) = config
        self.request = FakeLineRequest(line, self.value)
        return self.request


@pytest.fixture
async def requests() -> Requests:
    return Requests()


@pytest.fixture
async def dock(requests: Requests) -> AsyncIterator[GpioDock]:
    sensor = GpioDock("gpiochip0", 17, debounce=DEBOUNCE, confirm=CONFIRM, request_lines=requests)
    await sensor.open()
    yield sensor
    await sensor.close()


async def next_event(sensor: GpioDock, timeout: float = 1.0) -> DockEvent:
    return await asyncio.wait_for(anext(aiter(sensor.events())), timeout)


def now() -> float:
    return asyncio.get_running_loop().time()


async def test_open_requests_the_line_as_a_pulled_up_active_low_input_with_both_edges(
    dock: GpioDock, requests: Requests
) -> None:
    ((path, consumer, config),) = requests.calls
    settings = config[17]
    assert (path, consumer, list(config)) == ("/dev/gpiochip0", "thox-agent", [17])
    assert (settings.direction, settings.edge_detection, settings.bias, settings.active_low, settings.event_clock) == (
        Direction.INPUT,
        Edge.BOTH,
        Bias.PULL_UP,
        True,
        Clock.MONOTONIC,
    )
    assert settings.debounce_period == timedelta(milliseconds=5)
    assert requests.request is not None and not os.get_blocking(requests.request.fd)
    assert (dock.name, dock.state) == ("gpio:gpiochip0:17", DriverState.OPEN)


async def test_a_rising_edge_docks_after_debounce_and_confirm_timed_from_the_kernel_timestamp(
    dock: GpioDock, requests: Requests
) -> None:
    assert requests.request is not None
    edge = now()
    requests.request.push((RISING, edge))
    assert not await dock.present()
    event = await next_event(dock)
    assert event.docked and event.at == pytest.approx(edge + DEBOUNCE + CONFIRM, abs=1e-6)
    assert await dock.present()


async def test_a_bounce_train_read_in_one_batch_is_timed_from_its_last_edge(dock: GpioDock, requests: Requests) -> None:
    assert requests.request is not None
    await asyncio.sleep(0.02)  # time passes after the open, so a train 10 ms in the past still follows it (not a wait)
    start = now() - 0.01  # the train happened just before the loop got to read it
    requests.request.push(
        (RISING, start),
        (FALLING, start + 0.002),
        (RISING, start + 0.004),
        (FALLING, start + 0.006),
        (RISING, start + 0.008),
    )
    event = await next_event(dock)
    assert event.docked and event.at == pytest.approx(start + 0.008 + DEBOUNCE + CONFIRM, abs=1e-6)
    assert requests.request.reads == 1


async def test_lifting_is_reported_after_debounce_only(dock: GpioDock, requests: Requests) -> None:
    assert requests.request is not None
    requests.request.push((RISING, now()))
    assert (await next_event(dock)).docked
    lifted = now()
    requests.request.push((FALLING, lifted))
    event = await next_event(dock, timeout=CONFIRM)
    assert not event.docked and event.at == pytest.approx(lifted + DEBOUNCE, abs=1e-6)
    assert not await dock.present()


async def test_a_module_sliding_past_produces_no_event(dock: GpioDock, requests: Requests) -> None:
    assert requests.request is not None
    start = now()
    requests.request.push((RISING, start))
    await asyncio.sleep(0.03)  # the module passing over the sensor for 30 ms: simulated time, not a wait
    requests.request.push((FALLING, start + 0.03))
    with pytest.raises(asyncio.TimeoutError):
        await next_event(dock, timeout=DEBOUNCE + CONFIRM + 0.05)
    assert not await dock.present()


async def test_a_module_present_at_open_is_reported_as_docked() -> None:
    requests = Requests(value=Value.ACTIVE)
    sensor = GpioDock("/dev/gpiochip3", 4, debounce=DEBOUNCE, confirm=CONFIRM, request_lines=requests)
    opened = now()
    await sensor.open()
    try:
        assert not await sensor.present()
        event = await next_event(sensor)
        assert event.docked and event.at >= opened + DEBOUNCE + CONFIRM
        assert await sensor.present()
        assert requests.calls[0][0] == "/dev/gpiochip3"
    finally:
        await sensor.close()


async def test_close_releases_the_line_and_ends_the_event_stream(requests: Requests) -> None:
    sensor = GpioDock("gpiochip0", 17, debounce=DEBOUNCE, confirm=CONFIRM, request_lines=requests)
    await sensor.open()

    async def collect() -> list[DockEvent]:
        return [event async for event in sensor.events()]

    consumer = asyncio.create_task(collect())
    await asyncio.sleep(0)  # one loop turn: the consumer runs up to its wait on the event queue (no suspension before)
    await sensor.close()
    assert await asyncio.wait_for(consumer, 1.0) == []
    assert requests.request is not None and requests.request.released
    assert sensor.state is DriverState.CLOSED
    with pytest.raises(DriverStateError, match="gpio:gpiochip0:17"):
        await sensor.present()


async def test_a_read_error_faults_the_sensor_and_raises_from_events(dock: GpioDock, requests: Requests) -> None:
    assert requests.request is not None
    requests.request.read_error = OSError(errno.ENODEV, "No such device")
    requests.request.push()
    with pytest.raises(DriverError, match="No such device"):
        await next_event(dock)
    assert dock.state is DriverState.FAULTED


async def test_spurious_wake_up_is_ignored(dock: GpioDock, requests: Requests) -> None:
    assert requests.request is not None
    # Readable, but another read drained it: the driver must not block or fail.
    dock._on_readable()
    assert dock.state is DriverState.OPEN and requests.request.reads == 1


@pytest.mark.parametrize(
    ("error", "raised", "message"),
    [
        (FileNotFoundError(errno.ENOENT, "No such file"), DriverConfigError, "no such GPIO chip"),
        (OSError(errno.EBUSY, "Device or resource busy"), DriverError, "in use by another consumer"),
        (PermissionError(errno.EACCES, "Permission denied"), DriverError, "permission denied"),
        (ValueError("line offset of out range"), DriverConfigError, "has no line 17"),
    ],
)
async def test_open_errors_say_what_is_wrong(error: Exception, raised: type[DriverError], message: str) -> None:
    sensor = GpioDock("gpiochip0", 17, request_lines=Requests(error=error))
    with pytest.raises(raised, match=message):
        await sensor.open()
    assert sensor.state is DriverState.FAULTED


def test_config_strings() -> None:
    assert parse_gpio_config("gpio:gpiochip0:17") == ("gpiochip0", 17)
    dock = GpioDock.from_config("gpio:gpiochip1:5", confirm=0.5)
    assert (dock.name, dock.path, dock.confirm) == ("gpio:gpiochip1:5", "/dev/gpiochip1", 0.5)


@pytest.mark.parametrize("text", ["gpio:gpiochip0", "gpio::3", "gpiochip0:17", "gpio:gpiochip0:-1"])
def test_bad_config_strings_are_rejected(text: str) -> None:
    with pytest.raises(DriverConfigError, match="gpio:<chip>:<line>"):
        parse_gpio_config(text)


def test_kernel_debounce_may_not_exceed_the_software_debounce() -> None:
    with pytest.raises(DriverConfigError, match="kernel_debounce"):
        GpioDock("gpiochip0", 1, debounce=0.002)
