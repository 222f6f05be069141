"""Structured logging: JSON lines under a service manager or in a pipe, readable key=value on a terminal.

Request handlers bind `request_id` with structlog's contextvars, so every line logged while serving a request
carries it, including lines from code that knows nothing about HTTP. Every line names its `logger` (the topic
`thox logs --filter` selects on: agent.hardware.thermal, agent.api.security, ...).

Where the lines go: stderr always (journald stores it under systemd); outside journald also a rotated JSON-lines
file, `<home>/logs/agent.log`, which `thox logs` reads. The file is written by a thread behind a queue, so a slow
disk never stalls the event loop.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import structlog

LOG_FILE_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUPS = 3


def under_journald() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM to its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{stat.st_dev}:{stat.st_ino}"


def log_file_of(home: Path) -> Path:
    """The log file of an agent home (written when the agent does not log to the journal)."""
    return home / "logs" / "agent.log"


def _capture_exc_info(_logger: object, _name: str, event_dict: structlog.types.EventDict) -> structlog.types.EventDict:
    # `exc_info=True` means "the exception being handled now": resolve it in the logging thread, because the log
    # file is rendered later on the writer thread, where there is no current exception.
    if event_dict.get("exc_info") is True:
        event_dict["exc_info"] = sys.exc_info()
    return event_dict


def _wants_json(log_format: Literal["auto", "json", "console"]) -> bool:
    if log_format != "auto":
        return log_format == "json"
    under_service_manager = "INVOCATION_ID" in os.environ or "JOURNAL_STREAM" in os.environ
    return under_service_manager or not sys.stderr.isatty()


def configure_logging(
    log_format: Literal["auto", "json", "console"] = "auto",
    level: int = logging.INFO,
    log_file: Path | None = None,
) -> Callable[[], None]:
    """Route structlog and the standard library's logging through one renderer on stderr (and `log_file`).

    Returns the function that flushes and closes the file writer; call it once logging is over.
    """
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _capture_exc_info,
    ]
    renderer: structlog.types.Processor
    json_renderer = structlog.processors.JSONRenderer()
    if _wants_json(log_format):
        renderer = json_renderer
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processor=renderer))
    handlers: list[logging.Handler] = [handler]
    close: Callable[[], None] = lambda: None  # noqa: E731 - nothing to close without a file
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        writer = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"
        )
        writer.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=shared,
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    json_renderer,
                ],
            )
        )
        lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        listener = logging.handlers.QueueListener(lines, writer, respect_handler_level=False)
        listener.start()
        handlers.append(_QueueHandlerKeepingRecords(lines))

        def close() -> None:
            listener.stop()
            writer.close()

    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)
    # aiohttp's access log duplicates our own request lines.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return close


class _QueueHandlerKeepingRecords(logging.handlers.QueueHandler):
    """A QueueHandler that hands the record over untouched.

    The stock one formats the record in the caller's thread and replaces msg/args with the result, which would
    leave the file's formatter nothing structured to render; structlog's event dict travels in `msg`, and the
    records are not shared with another process, so no pickling-safe copy is needed.
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record
