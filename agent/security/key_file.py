"""The API key file's format: `{"version": 1, "keys": [{id, name, scope, source, created, last_used, hash}]}`,
written whole and read strictly (any malformed record makes the whole file refused, naming the record)."""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from agent.errors import ThoxError
from agent.security.key_rules import (
    HASH_ALGORITHM,
    SALT_BYTES,
    SCOPES,
    SOURCES,
    TIME_FORMAT,
    KeyRecord,
    KeyStoreCorruptError,
    Scope,
    Source,
)

FILE_VERSION = 1
_ID = re.compile(r"^key_[0-9a-f]{8}$")
_RECORD_FIELDS = frozenset({"id", "name", "scope", "source", "created", "last_used", "hash"})


class _BadRecord(ThoxError):
    """One record of the file is malformed (wrapped into KeyStoreCorruptError with the path and position)."""


@dataclass(frozen=True)
class Entry:
    """One record with its salt and salted hash."""

    record: KeyRecord
    salt: bytes
    digest: bytes


@dataclass(frozen=True)
class Index:
    """The records as `verify()` looks them up."""

    by_id: dict[str, Entry]
    # Installed keys whose secret does not carry its id; `verify()` checks each of these.
    installed: tuple[Entry, ...]


def serialize(entries: dict[str, Entry]) -> bytes:
    """The whole file for these records."""
    keys = []
    for entry in sorted(entries.values(), key=lambda e: (e.record.created, e.record.id)):
        fields: dict[str, Any] = entry.record.as_dict()
        fields["hash"] = f"{HASH_ALGORITHM}${entry.salt.hex()}${entry.digest.hex()}"
        keys.append(fields)
    return (json.dumps({"version": FILE_VERSION, "keys": keys}, indent=2) + "\n").encode("utf-8")


def parse(path: Path, raw: bytes) -> dict[str, Entry]:
    """The records of the file at `path`; KeyStoreCorruptError naming the first problem."""

    def corrupt(problem: str) -> KeyStoreCorruptError:
        return KeyStoreCorruptError(
            f"key store {path} is unusable: {problem}. It was left as it is (starting over empty would silently "
            f"drop every key); repair it, or move it away and generate new keys"
        )

    if not raw.strip():
        raise corrupt("the file is empty")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise corrupt(f"not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise corrupt(f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(doc, dict):
        raise corrupt(f"expected a JSON object at the top, found {type(doc).__name__}")
    version = doc.get("version")
    if "version" not in doc:
        raise corrupt('no "version" field')
    if not isinstance(version, int) or isinstance(version, bool):
        raise corrupt(f'"version" must be an integer, found {version!r}')
    if version > FILE_VERSION:
        raise corrupt(f"written by a newer thox (file version {version}; this one reads version {FILE_VERSION})")
    if version < 1:
        raise corrupt(f"unknown file version {version}")
    extra = set(doc) - {"version", "keys"}
    if extra:
        raise corrupt(f"unexpected top-level field(s) {', '.join(sorted(extra))}")
    keys = doc.get("keys")
    if not isinstance(keys, list):
        raise corrupt(f'"keys" must be a list, found {type(keys).__name__}')
    entries: dict[str, Entry] = {}
    for number, item in enumerate(keys):
        where = f"keys[{number}]"
        try:
            entry = _parse_entry(item)
        except _BadRecord as exc:
            raise corrupt(f"{where}: {exc}") from None
        if entry.record.id in entries:
            raise corrupt(f"{where}: id {entry.record.id} appears twice")
        entries[entry.record.id] = entry
    return entries


def _parse_entry(item: object) -> Entry:
    if not isinstance(item, dict):
        raise _BadRecord(f"expected an object, found {type(item).__name__}")
    missing = _RECORD_FIELDS - set(item)
    if missing:
        raise _BadRecord(f"missing field(s) {', '.join(sorted(missing))}")
    extra = set(item) - _RECORD_FIELDS
    if extra:
        raise _BadRecord(f"unexpected field(s) {', '.join(sorted(extra))}")
    key_id, name, scope, source = item["id"], item["name"], item["scope"], item["source"]
    if not isinstance(key_id, str) or not _ID.match(key_id):
        raise _BadRecord(f"id {key_id!r} is not of the form key_<8 hex digits>")
    if not isinstance(name, str):
        raise _BadRecord(f"name must be a string, found {name!r}")
    if scope not in SCOPES:
        raise _BadRecord(f"scope {scope!r} is not one of {', '.join(SCOPES)}")
    if source not in SOURCES:
        raise _BadRecord(f"source {source!r} is not one of {', '.join(SOURCES)}")
    created, last_used = item["created"], item["last_used"]
    _check_time("created", created, optional=False)
    _check_time("last_used", last_used, optional=True)
    hashed = item["hash"]
    parts = hashed.split("$") if isinstance(hashed, str) else []
    if len(parts) != 3 or parts[0] != HASH_ALGORITHM:
        raise _BadRecord(f"hash must read {HASH_ALGORITHM}$<salt hex>$<digest hex>")
    try:
        salt, digest = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
    except ValueError:
        raise _BadRecord("hash salt or digest is not hexadecimal") from None
    if len(salt) != SALT_BYTES or len(digest) != hashlib.sha256().digest_size:
        raise _BadRecord(f"hash salt must be {SALT_BYTES} bytes and digest 32 bytes")
    record = KeyRecord(key_id, name, cast(Scope, scope), cast(Source, source), created, last_used)
    return Entry(record, salt, digest)


def _check_time(field: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise _BadRecord(f"{field} must be a time like 2025-01-31T12:00:00Z, found {value!r}")
    try:
        time.strptime(value, TIME_FORMAT)
    except ValueError:
        raise _BadRecord(f"{field} {value!r} is not a time like 2025-01-31T12:00:00Z") from None
