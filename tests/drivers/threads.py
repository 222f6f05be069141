"""What the drivers' worker threads are doing now, for tests that must wait until a thread is in (or out of) a call."""

from __future__ import annotations

import sys
from types import CodeType, FrameType


def running(code: CodeType) -> bool:
    """Whether some thread is executing `code` now, anywhere in its stack (sys._current_frames)."""
    for frame in sys._current_frames().values():
        current: FrameType | None = frame
        while current is not None:
            if current.f_code is code:
                return True
            current = current.f_back
    return False
