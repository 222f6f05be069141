"""`thox logs [--filter TOPIC] [--follow]`: the agent's structured log lines, from the journal or the log file.

Where they are: an agent under systemd logs to the journal (unit thox-agent.service); one started otherwise also
writes `<home>/logs/agent.log` (JSON lines, rotated). A running agent says which in its endpoints file; for a
stopped one the log file is used if it exists, else the journal.

A TOPIC selects lines by the logger that wrote them, as one or more whole dotted components: `thermal` selects
agent.hardware.thermal, `hardware` everything under agent.hardware, `api.security` the auth and rate-limit lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from agent.cli.common import endpoints, err, home_of
from agent.errors import ThoxError
from agent.logs import log_file_of

UNIT = "thox-agent.service"
LEVELS = ("debug", "info", "warning", "error", "critical")
_CURSOR_PREFIX = "-- cursor: "
_FOLLOW_POLL_SECONDS = 0.25


class LogSourceError(ThoxError):
    """No log could be found or read; the message says where it looked."""


def topic_matches(logger: str, topic: str) -> bool:
    """Whether `topic` is a run of whole dotted components of the logger name."""
    parts = logger.split(".")
    wanted = [p for p in topic.strip().strip(".").split(".") if p]
    if not wanted:
        return True
    return any(parts[i : i + len(wanted)] == wanted for i in range(len(parts) - len(wanted) + 1))


class LineSelector:
    """Which lines to show: any of the topics (all when none), at or above a level."""

    def __init__(self, topics: list[str], min_level: str) -> None:
        self.topics = topics
        self.min_rank = LEVELS.index(min_level)

    @property
    def selective(self) -> bool:
        return bool(self.topics) or self.min_rank > 0

    def wants(self, record: dict[str, Any] | None) -> bool:
        """`record` is a parsed JSON line, or None for a line that is not one (shown only when nothing filters)."""
        if record is None:
            return not self.selective
        level = str(record.get("level", "info")).lower()
        if level in LEVELS and LEVELS.index(level) < self.min_rank:
            return False
        logger = str(record.get("logger", ""))
        return not self.topics or any(topic_matches(logger, topic) for topic in self.topics)


def parse_line(line: str) -> dict[str, Any] | None:
    """A log line as a dict, or None when it is not one of our JSON lines (a traceback, a foreign line)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "event" in record else None


def render(record: dict[str, Any] | None, line: str) -> str:
    """One line for a human: time, level, topic, event, then the fields."""
    if record is None:
        return line
    fields = dict(record)
    timestamp = str(fields.pop("timestamp", ""))[:23].replace("T", " ")
    level = str(fields.pop("level", ""))
    logger = str(fields.pop("logger", ""))
    topic = logger.removeprefix("agent.")
    event = str(fields.pop("event", ""))
    exception = fields.pop("exception", None)
    rest = " ".join(
        f"{key}={value if isinstance(value, str) and ' ' not in value else json.dumps(value)}"
        for key, value in fields.items()
    )
    text = f"{timestamp} {level:<7} {topic:<18} {event} {rest}".rstrip()
    return f"{text}\n{exception}" if exception else text


# ------------------------------------------------------------------------------ sources


def choose_source(home: Path, requested: str) -> Path | None:
    """The log file to read, or None for the journal."""
    if requested == "journal":
        return None
    if requested == "file":
        return log_file_of(home)
    running = endpoints(home).get("logs")
    if running == "journald":
        return None
    if isinstance(running, str) and running:
        return Path(running)
    path = log_file_of(home)
    if path.exists() or not shutil.which("journalctl"):
        return path
    return None


def _file_lines(path: Path) -> Iterator[str]:
    # The rotated file first, so "the last N lines" reach back across a rotation.
    for part in (path.with_name(path.name + ".1"), path):
        try:
            with part.open(encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    yield line.rstrip("\n")
        except FileNotFoundError:
            continue


def _follow_file(path: Path) -> Iterator[str]:
    """Lines appended to `path` from now on, across rotations (the file renamed and a new one created)."""
    handle: IO[str] | None = None
    pending = ""
    try:
        while True:
            if handle is None:
                try:
                    handle = path.open(encoding="utf-8", errors="replace")
                    handle.seek(0, os.SEEK_END)
                except FileNotFoundError:
                    time.sleep(_FOLLOW_POLL_SECONDS)
                    continue
            chunk = handle.read()
            if chunk:
                pending += chunk
                *complete, pending = pending.split("\n")
                yield from complete
                continue
            try:
                rotated = os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                rotated = True
            if rotated:  # the old file is complete (read to its end above): continue with the new one from its start
                handle.close()
                handle = None
                while not path.exists():
                    time.sleep(_FOLLOW_POLL_SECONDS)
                handle = path.open(encoding="utf-8", errors="replace")
                continue
            time.sleep(_FOLLOW_POLL_SECONDS)
    finally:
        if handle is not None:
            handle.close()


def _journalctl(*arguments: str) -> subprocess.Popen[str]:
    if not shutil.which("journalctl"):
        raise LogSourceError("journalctl is not installed, and the agent writes no log file in this home")
    return subprocess.Popen(
        ["journalctl", f"--unit={UNIT}", "--output=cat", "--no-pager", *arguments],
        stdout=subprocess.PIPE,
        text=True,
        errors="replace",
    )


def _journal_history(lines: int | None) -> tuple[list[str], str | None]:
    """The journal's lines so far (the last `lines`, or all) and the cursor after them."""
    process = _journalctl(f"--lines={lines if lines is not None else 'all'}", "--show-cursor")
    assert process.stdout is not None
    output, _ = process.communicate()
    if process.returncode not in (0, None):
        raise LogSourceError(f"journalctl --unit={UNIT} failed with exit status {process.returncode}")
    history, cursor = [], None
    for line in output.splitlines():
        if line.startswith(_CURSOR_PREFIX):
            cursor = line[len(_CURSOR_PREFIX) :].strip()
        else:
            history.append(line)
    return history, cursor


def _follow_journal(cursor: str | None) -> Iterator[str]:
    process = _journalctl("--follow", f"--after-cursor={cursor}" if cursor else "--lines=0")
    assert process.stdout is not None
    try:
        for line in process.stdout:
            yield line.rstrip("\n")
    finally:
        process.terminate()
        process.wait()


# ------------------------------------------------------------------------------ command


def _show(lines: Iterable[str], selector: LineSelector, raw: bool, limit: int | None) -> None:
    chosen: Iterable[tuple[str, dict[str, Any] | None]] = (
        (line, record) for line in lines if selector.wants(record := parse_line(line))
    )
    if limit is not None:
        chosen = deque(chosen, maxlen=limit)
    for line, record in chosen:
        sys.stdout.write((line if raw else render(record, line)) + "\n")
        sys.stdout.flush()  # a follower piped into grep or a file sees each line as it comes


def cmd_logs(args: argparse.Namespace) -> int:
    """thox logs: the last lines (all matching ones with --lines 0), then new ones with --follow."""
    selector = LineSelector(args.filter or [], args.level)
    limit = args.lines or None
    path = choose_source(home_of(args), args.source)
    if path is not None and not path.exists() and not args.follow:
        err.print(
            f"[red]error:[/red] no log file at {path}: the agent has not run with this home "
            "(under systemd, see `thox logs --source journal`)"
        )
        return 1
    try:
        if path is None:
            # With a filter the last N *matching* lines are wanted, so the journal hands over everything.
            history, cursor = _journal_history(None if selector.selective or limit is None else limit)
            _show(history, selector, args.json, limit)
            if args.follow:
                _show(_follow_journal(cursor), selector, args.json, None)
            return 0
        _show(_file_lines(path), selector, args.json, limit)
        if args.follow:
            _show(_follow_file(path), selector, args.json, None)
    except LogSourceError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    """Register `thox logs`."""
    logs = sub.add_parser("logs", parents=[common], help="the agent's log lines (journal or log file)")
    logs.add_argument(
        "--filter",
        action="append",
        metavar="TOPIC",
        help="only lines of this topic, e.g. thermal, hardware, api.security, engine (repeatable)",
    )
    logs.add_argument("--level", choices=LEVELS, default="debug", help="only lines at or above this level")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("-n", "--lines", type=int, default=50, help="how many past lines (0: all; default 50)")
    logs.add_argument(
        "--source",
        choices=("auto", "journal", "file"),
        default="auto",
        help="auto: the running agent's, else the log file if present, else the journal",
    )
    logs.add_argument("--json", action="store_true", help="the lines as stored (JSON)")
    logs.set_defaults(func=cmd_logs)
