"""The dock controller's serial link: the frame codec (drivers.serial.frame) and the asyncio link (.link)."""

from drivers.serial.frame import (
    DOCK_PRODUCT_ID,
    DockStatus,
    ErrorCode,
    ErrorReply,
    FrameDecoder,
    FrameError,
    Kind,
    LedMode,
    LedState,
    Pong,
    crc16_ccitt_false,
    encode_frame,
)
from drivers.serial.link import ControllerError, SerialDockLink

__all__ = [
    "DOCK_PRODUCT_ID",
    "ControllerError",
    "DockStatus",
    "ErrorCode",
    "ErrorReply",
    "FrameDecoder",
    "FrameError",
    "Kind",
    "LedMode",
    "LedState",
    "Pong",
    "SerialDockLink",
    "crc16_ccitt_false",
    "encode_frame",
]
