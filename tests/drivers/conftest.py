"""Every driver test runs with BlockBuster armed for the drivers package: a blocking call on the loop fails it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from blockbuster import blockbuster_ctx


@pytest.fixture(autouse=True)
def no_blocking_calls_on_the_loop() -> Iterator[None]:
    """Fail any test in which drivers code blocks the event loop (file, socket, sleep, lock)."""
    with blockbuster_ctx(["drivers"]):
        yield
