"""The magnetic dock switch on a GPIO line, through libgpiod 2: edge events on the loop, debounced in software.

The hall switch (open-drain, pulls the line low while a magnet is near) sits on one input line with the SoC's
pull-up. The line is requested with edge detection on both edges, `active_low` so that "active" means "magnet
present", and the kernel's own debounce set short: it only keeps contact chatter from waking us up per bounce, while
`Debouncer` decides what a dock is. Events carry CLOCK_MONOTONIC timestamps, the clock asyncio's loop.time() reads
on Linux, so bounce trains read in one batch are still timed exactly.

Requesting the line (and reading its first value: the line may sit on an I2C GPIO expander, where that sleeps) runs
in a worker thread. After that the request's fd is non-blocking and watched with `loop.add_reader`, and
`read_edge_events()` only ever drains what is already buffered.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import timedelta
from typing import Any, Protocol

import gpiod
from gpiod.line import Bias, Clock, Direction, Edge, Value

from drivers.base import DockEvent, DriverConfigError, DriverError, DriverState, DriverStateError
from drivers.dock.debounce import DEFAULT_CONFIRM, DEFAULT_DEBOUNCE, DebouncePump, Debouncer, require_pump

CONSUMER = "thox-agent"
DEFAULT_KERNEL_DEBOUNCE = 0.005

_CONFIG = re.compile(r"^gpio:([^:\s]+):(\d+)$")


class EdgeEventLike(Protocol):
    """The part of gpiod.EdgeEvent the driver reads."""

    @property
    def event_type(self) -> gpiod.EdgeEvent.Type: ...

    @property
    def timestamp_ns(self) -> int: ...


class LineRequestLike(Protocol):
    """The part of gpiod.LineRequest the driver uses."""

    @property
    def fd(self) -> int: ...

    def get_value(self, line: int | str) -> Value: ...

    def read_edge_events(self, max_events: int | None = None) -> Any: ...  # list[EdgeEventLike]

    def release(self) -> None: ...


RequestLines = Callable[..., LineRequestLike]


def parse_gpio_config(text: str) -> tuple[str, int]:
    """Parse "gpio:gpiochip0:17" into (chip, line offset); DriverConfigError names what is wrong."""
    match = _CONFIG.match(text.strip())
    if match is None:
        raise DriverConfigError(
            f"{text!r} is not a GPIO dock sensor; expected gpio:<chip>:<line> such as gpio:gpiochip0:17"
        )
    return match.group(1), int(match.group(2))


class GpioDock:
    """DockSensor over one libgpiod 2 input line with a hall switch on it."""

    def __init__(
        self,
        chip: str,
        line: int,
        *,
        active_low: bool = True,
        debounce: float = DEFAULT_DEBOUNCE,
        confirm: float = DEFAULT_CONFIRM,
        kernel_debounce: float = DEFAULT_KERNEL_DEBOUNCE,
        request_lines: RequestLines = gpiod.request_lines,
    ) -> None:
        if line < 0:
            raise DriverConfigError(f"GPIO line offset {line} on {chip} is negative")
        if not 0 <= kernel_debounce <= debounce:
            raise DriverConfigError(f"kernel_debounce {kernel_debounce}s must be between 0 and debounce {debounce}s")
        Debouncer(debounce, confirm)  # validates the times here, not first at open()
        self.chip = chip
        self.line = line
        self.active_low = active_low
        self.debounce = debounce
        self.confirm = confirm
        self.kernel_debounce = kernel_debounce
        self.path = chip if chip.startswith("/") else f"/dev/{chip}"
        self._request_lines = request_lines
        self._request: LineRequestLike | None = None
        self._pump: DebouncePump | None = None
        self._state = DriverState.CLOSED

    @classmethod
    def from_config(cls, text: str, **options: Any) -> GpioDock:
        """Build from a config string "gpio:<chip>:<line>"; options are the constructor's keywords."""
        chip, line = parse_gpio_config(text)
        return cls(chip, line, **options)

    @property
    def name(self) -> str:
        return f"gpio:{self.chip}:{self.line}"

    @property
    def state(self) -> DriverState:
        return self._state

    def settings(self) -> gpiod.LineSettings:
        """The line settings requested from the kernel."""
        return gpiod.LineSettings(
            direction=Direction.INPUT,
            edge_detection=Edge.BOTH,
            bias=Bias.PULL_UP,
            active_low=self.active_low,
            debounce_period=timedelta(seconds=self.kernel_debounce),
            event_clock=Clock.MONOTONIC,
        )

    async def open(self) -> None:
        """Request the line, read its level, and start watching edges."""
        if self._state is DriverState.OPEN:
            return
        loop = asyncio.get_running_loop()
        config: Mapping[int, gpiod.LineSettings] = {self.line: self.settings()}

        def acquire() -> tuple[LineRequestLike, bool]:
            request = self._request_lines(self.path, consumer=CONSUMER, config=config)
            try:
                os.set_blocking(request.fd, False)
                return request, request.get_value(self.line) == Value.ACTIVE
            except BaseException:
                request.release()
                raise

        acquiring = asyncio.ensure_future(asyncio.to_thread(acquire))
        try:
            request, present = await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            # The worker thread cannot be stopped; release the line once it has it, or it stays requested.
            acquiring.add_done_callback(_release_when_acquired)
            raise
        except OSError as exc:
            self._state = DriverState.FAULTED
            raise self._open_error(exc) from exc
        except ValueError as exc:  # gpiod: "line offset out of range"
            self._state = DriverState.FAULTED
            raise DriverConfigError(f"{self.name}: {self.path} has no line {self.line} ({exc})") from exc
        self._request = request
        # Start absent and feed the level read: a module already stacked at start is reported like one stacked now.
        pump = DebouncePump(Debouncer(self.debounce, self.confirm, level=False, at=loop.time()))
        self._pump = pump
        loop.add_reader(request.fd, self._on_readable)
        pump.feed(present)
        self._state = DriverState.OPEN

    def _open_error(self, exc: OSError) -> DriverError:
        what = f"{self.name}: cannot request line {self.line} on {self.path}"
        if exc.errno == errno.ENOENT:
            return DriverConfigError(f"{what}: no such GPIO chip (see `gpiodetect`)")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return DriverError(f"{what}: permission denied (the service user needs access to {self.path})")
        if exc.errno == errno.EBUSY:
            return DriverError(f"{what}: the line is in use by another consumer (see `gpioinfo`)")
        if exc.errno == errno.EINVAL:
            return DriverConfigError(
                f"{what}: the chip rejected the settings (no such line, or no edge or "
                f"bias support): {exc.strerror or exc}"
            )
        return DriverError(f"{what}: {exc.strerror or exc}")

    async def present(self) -> bool:
        """Whether a module is docked (confirmed)."""
        if self._state is not DriverState.OPEN:
            raise DriverStateError(f"dock sensor {self.name} is {self._state.value}; open() it first")
        return require_pump(self._pump, self.name).present

    async def events(self) -> AsyncIterator[DockEvent]:
        """Dock and undock events as they are confirmed, until close()."""
        async for event in require_pump(self._pump, self.name).events():
            yield event

    def _on_readable(self) -> None:
        request, pump = self._request, self._pump
        if request is None or pump is None:
            return
        try:
            events = request.read_edge_events()
        except BlockingIOError:
            return  # another wake-up drained it already
        except OSError as exc:
            # ENODEV: the chip went away (an expander unplugged, a driver unbound). Nothing will come back.
            self._fault(DriverError(f"{self.name}: reading edge events from {self.path} failed: {exc.strerror or exc}"))
            return
        for event in events:
            pump.feed(event.event_type == gpiod.EdgeEvent.Type.RISING_EDGE, event.timestamp_ns / 1e9)

    def _fault(self, error: DriverError) -> None:
        self._state = DriverState.FAULTED
        if self._request is not None:
            asyncio.get_running_loop().remove_reader(self._request.fd)
        if self._pump is not None:
            self._pump.fail(error)

    async def close(self) -> None:
        """Stop watching and release the line (an input: there is nothing to leave in a safe state)."""
        request, self._request = self._request, None
        pump = self._pump
        if pump is not None:
            pump.close()
        if request is not None:
            asyncio.get_running_loop().remove_reader(request.fd)
            await asyncio.to_thread(request.release)
        self._state = DriverState.CLOSED


def _release_when_acquired(future: asyncio.Future[tuple[LineRequestLike, bool]]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result()[0].release()
