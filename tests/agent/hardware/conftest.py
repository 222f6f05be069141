"""Hardware-layer tests run with BlockBuster armed: a blocking call on the loop in agent or drivers fails them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from blockbuster import blockbuster_ctx


@pytest.fixture(autouse=True)
def no_blocking_calls_on_the_loop() -> Iterator[None]:
    """Fail any test in which agent or drivers code blocks the event loop."""
    with blockbuster_ctx(["agent", "drivers"]):
        yield
