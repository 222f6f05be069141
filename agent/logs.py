"""Structured logging: JSON lines under a service manager or in a pipe, readable key=value on a terminal.

Request handlers bind `request_id` with structlog's contextvars, so every line logged while serving a request
carries it, including lines from code that knows nothing about HTTP.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal

import structlog


def _wants_json(log_format: Literal["auto", "json", "console"]) -> bool:
    if log_format != "auto":
        return log_format == "json"
    under_service_manager = "INVOCATION_ID" in os.environ or "JOURNAL_STREAM" in os.environ
    return under_service_manager or not sys.stderr.isatty()


def configure_logging(log_format: Literal["auto", "json", "console"] = "auto", level: int = logging.INFO) -> None:
    """Route structlog and the standard library's logging through one renderer on stderr."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if _wants_json(log_format):
        renderer = structlog.processors.JSONRenderer()
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
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log duplicates our own request lines.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
