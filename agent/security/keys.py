"""API keys: random Bearer secrets, stored hashed in one JSON file, verified from memory.

A generated secret reads `thox_<8 hex>_<43 chars of urlsafe base64 of 32 random bytes>`; the 8 hex digits are the
public part of the record id (`key_<8 hex>`), so `verify()` finds the one record to check without trying them all.
Keys installed with `thox config set api.key VALUE` may have any shape (32+ visible ASCII characters); those few
records are each checked.

Threads and the event loop: `verify()` and `touch_last_used()` only read and write memory (no file I/O, no lock held
across I/O) and are called on the event loop. Every other public method may touch the file (stat, read, fsync,
rename) and is blocking: the agent calls it through `asyncio.to_thread`. Writers in several processes (the agent,
`thox api-key ...`) take an exclusive `flock` on a lock file beside the store and re-read the file before changing
it, so no writer undoes another's change.

How the running agent sees changes made by another process: `reload_if_changed()` costs one `stat` when nothing
changed (every write renames a new file into place, so the inode changes). The agent should call it via
`asyncio.to_thread` before verifying each request's key, so that a revoke or regenerate by `thox api-key` takes
effect at the very next request; if that thread hop ever shows in profiles, a background task calling it every
second bounds the delay to one second instead.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

from agent.errors import ThoxError

Scope = Literal["inference", "admin"]
Source = Literal["generated", "installed"]
SCOPES: tuple[str, ...] = get_args(Scope)
SOURCES: tuple[str, ...] = get_args(Source)

FILE_VERSION = 1
FILE_MODE = 0o600
SECRET_PREFIX = "thox_"
ID_PREFIX = "key_"
MIN_INSTALLED_LENGTH = 32
MAX_INSTALLED_LENGTH = 512
# Fewer distinct characters than this is a pattern ("aaaa...", "abababab..."), not a secret.
MIN_INSTALLED_DISTINCT = 8
MAX_NAME_LENGTH = 64
DEFAULT_FLUSH_INTERVAL = 60.0
HASH_ALGORITHM = "hmac-sha256"
SALT_BYTES = 16
_SECRET = re.compile(r"^thox_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
_ID = re.compile(r"^key_[0-9a-f]{8}$")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_RECORD_FIELDS = frozenset({"id", "name", "scope", "source", "created", "last_used", "hash"})
# Bearer secrets longer than this are not ours; refusing them before hashing keeps verify() cheap for any input.
_MAX_SECRET_LENGTH = 4096
# Hashed when a well-formed secret names an id we do not have, so hits and misses cost the same work.
_DUMMY_SALT = bytes(SALT_BYTES)


class KeyStoreError(ThoxError):
    """Base of the key store's errors; messages name the file or the key and say what to do."""


class KeyNotFoundError(KeyStoreError):
    """No key with that id."""


class KeyStoreCorruptError(KeyStoreError):
    """The store file exists but cannot be read or parsed; it is never replaced by an empty store."""


class KeyInputError(KeyStoreError):
    """A name, scope or installed secret that cannot be accepted."""


class _BadRecord(ThoxError):
    """One record of the file is malformed (wrapped into KeyStoreCorruptError with the path and position)."""


@dataclass(frozen=True)
class KeyRecord:
    """One API key as `thox api-key list` shows it: never the secret, never its hash."""

    id: str
    name: str
    scope: Scope
    source: Source
    created: str
    last_used: str | None

    def allows(self, needed: Scope) -> bool:
        """Whether this key may call an API that needs `needed` (admin keys may do everything)."""
        return self.scope == "admin" or needed == "inference"

    def as_dict(self) -> dict[str, str | None]:
        """The record as JSON-ready fields (for `list` output and the admin API)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Entry:
    record: KeyRecord
    salt: bytes
    digest: bytes


@dataclass(frozen=True)
class _Index:
    by_id: dict[str, _Entry]
    # Installed keys whose secret does not carry its id; `verify()` checks each of these.
    installed: tuple[_Entry, ...]


_EMPTY_INDEX = _Index({}, ())
# (st_dev, st_ino, st_size, st_mtime_ns): every write renames a new file into place, so the inode changes (see
# KeyStore._hold for why the inode number cannot come back).
_Identity = tuple[int, int, int, int]


def _identity_of(st: os.stat_result) -> _Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _digest(salt: bytes, secret: bytes) -> bytes:
    # Why a keyed SHA-256 (HMAC with a random per-key salt) and not scrypt/PBKDF2: generated keys carry 256 random
    # bits, so offline guessing from a stolen file is hopeless whatever the hash; a slow KDF would add nothing for
    # them but cost tens of milliseconds of a Jetson's CPU on every request, and would hand unauthenticated clients
    # a CPU-exhaustion lever (each wrong key forces a slow hash). Installed keys are held to 32+ characters with
    # some variety for the same reason. The per-key salt keeps equal secrets from having equal hashes across
    # records and stores. The file itself is mode 0600 and owned by the agent's user.
    return hmac.new(salt, secret, hashlib.sha256).digest()


def _format_time(epoch: float) -> str:
    return time.strftime(_TIME_FORMAT, time.gmtime(epoch))


def _new_secret(key_id: str) -> str:
    body = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    return f"{SECRET_PREFIX}{key_id.removeprefix(ID_PREFIX)}_{body}"


def _free_id(entries: dict[str, _Entry]) -> str:
    # 32 random bits: collisions are rare among a handful of keys, and retried.
    while (key_id := f"{ID_PREFIX}{secrets.token_hex(4)}") in entries:
        pass
    return key_id


def parse_key_id(secret: str) -> str | None:
    """The record id a generated-format secret names (`thox_ab12cd34_...` -> `key_ab12cd34`), else None."""
    match = _SECRET.match(secret)
    return f"{ID_PREFIX}{match.group(1)}" if match else None


def _normalize_id(key_id: str) -> str:
    value = key_id.strip().lower()
    return value if value.startswith(ID_PREFIX) else f"{ID_PREFIX}{value}"


def _check_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH:
        raise KeyInputError(f"key name is {len(name)} characters long; at most {MAX_NAME_LENGTH} are allowed")
    if any(not ch.isprintable() for ch in name):
        raise KeyInputError(f"key name {name!r} contains control characters")
    return name


def _check_scope(scope: str) -> Scope:
    if scope not in SCOPES:
        raise KeyInputError(f"scope {scope!r} is not one of {', '.join(SCOPES)}")
    return cast(Scope, scope)


def _check_installed_secret(secret: str) -> None:
    if secret != secret.strip():
        raise KeyInputError("the API key starts or ends with whitespace (a copy-paste slip?); remove it")
    if len(secret) < MIN_INSTALLED_LENGTH:
        raise KeyInputError(
            f"the API key is {len(secret)} characters long; use at least {MIN_INSTALLED_LENGTH} random characters "
            f"(or `thox api-key generate`)"
        )
    if len(secret) > MAX_INSTALLED_LENGTH:
        raise KeyInputError(f"the API key is {len(secret)} characters long; at most {MAX_INSTALLED_LENGTH} are allowed")
    bad = sorted({ch for ch in secret if not "\x21" <= ch <= "\x7e"})
    if bad:
        raise KeyInputError(
            f"the API key contains {', '.join(repr(ch) for ch in bad[:5])}; an HTTP Authorization header carries "
            f"only visible ASCII characters without spaces"
        )
    if len(set(secret)) < MIN_INSTALLED_DISTINCT:
        raise KeyInputError(
            f"the API key uses only {len(set(secret))} distinct characters; that is a pattern, not a random secret"
        )


class KeyStore:
    """API key records in the JSON file at `path`, with an in-memory index for `verify()`."""

    def __init__(
        self,
        path: Path,
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.flush_interval = flush_interval
        self._wall_clock = wall_clock
        self._monotonic = monotonic
        # Swapped whole (one attribute store), so `verify()` on the loop never sees a half-built index.
        self._index = _EMPTY_INDEX
        self._identity: _Identity | None = None
        self._held_fd: int | None = None
        self._loaded = False
        self._error: KeyStoreError | None = None
        # Serialises this process's readers and writers of the file; never held by verify().
        self._mutex = threading.RLock()
        self._pending_lock = threading.Lock()
        self._pending: dict[str, float] = {}
        self._last_flush = float("-inf")
        # Things worth a log line that are not errors (e.g. permissions tightened); the agent drains and logs them.
        self.notices: list[str] = []

    # ----- reading -----

    @property
    def error(self) -> KeyStoreError | None:
        """Why the store is unusable right now (file corrupt or unreadable), or None; `verify()` refuses all then."""
        if not self._loaded and self._error is None:
            return KeyStoreError(f"key store {self.path} has not been loaded yet")
        return self._error

    def load(self) -> None:
        """Read the file now (blocking); a missing file is an empty store, a corrupt one raises KeyStoreCorruptError."""
        with self._mutex:
            fd: int | None = None
            identity: _Identity | None = None
            try:
                fd, identity, raw = self._read_raw()
                entries = {} if raw is None else _parse(self.path, raw)
            except KeyStoreError as exc:
                # Fail closed: a store we cannot read verifies nothing (a revoked key must never come back).
                self._index = _EMPTY_INDEX
                self._error = exc
                self._loaded = True
                # Remember which file failed, so that the same broken file is not re-read on every request.
                self._hold(fd)
                self._identity = identity if identity is not None else self._stat_identity()
                raise
            self._hold(fd)
            self._install_index(identity, entries)

    def close(self) -> None:
        """Release the descriptor held on the loaded file (see `_hold`); the index stays usable."""
        with self._mutex:
            self._hold(None)

    def reload_if_changed(self) -> bool:
        """Re-read the file if another process replaced it since the last read (blocking: one stat); True if so."""
        with self._mutex:
            if self._loaded and self._stat_identity() == self._identity:
                return False
            self.load()
            return True

    def _stat_identity(self) -> _Identity | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError:
            # Unreadable metadata: report a fresh identity so that load() runs and raises the precise error.
            return (-1, -1, -1, -1)
        return _identity_of(st)

    def _read_raw(self) -> tuple[int | None, _Identity | None, bytes | None]:
        """(open descriptor, identity, bytes) of the file, or Nones when it does not exist."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, None, None
        except OSError as exc:
            raise KeyStoreCorruptError(f"key store {self.path} cannot be opened: {exc.strerror}") from exc
        try:
            # Identity from the open descriptor, so it describes exactly the bytes read (a rename may land between
            # a stat and an open).
            st = os.fstat(fd)
            self._tighten_mode(fd, st)
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        except OSError as exc:
            os.close(fd)
            raise KeyStoreCorruptError(f"key store {self.path} cannot be read: {exc.strerror}") from exc
        return fd, _identity_of(st), b"".join(chunks)

    def _hold(self, fd: int | None) -> None:
        # The file whose contents the index reflects stays open: while it is open its inode number cannot be
        # reused, so any replacement (a rename from another process) has a different (st_dev, st_ino) even when
        # size and a coarse mtime are equal. Without this, two quick writes could recycle the inode and a
        # regenerated key would keep working in the agent.
        previous, self._held_fd = self._held_fd, fd
        if previous is not None and previous != fd:
            os.close(previous)

    def _tighten_mode(self, fd: int, st: os.stat_result) -> None:
        if st.st_mode & 0o077 and (st.st_uid == os.geteuid() or os.geteuid() == 0):
            os.fchmod(fd, FILE_MODE)
            self.notices.append(
                f"key store {self.path} was readable by others (mode {st.st_mode & 0o777:o}); set it to 600"
            )

    def _install_index(self, identity: _Identity | None, entries: dict[str, _Entry]) -> None:
        installed = tuple(e for e in entries.values() if e.record.source == "installed")
        self._index = _Index(dict(entries), installed)
        self._identity = identity
        self._error = None
        self._loaded = True

    def list(self) -> list[KeyRecord]:
        """Every key, oldest first, with last-used times not yet flushed (blocking: reloads if changed)."""
        self.reload_if_changed()
        with self._pending_lock:
            pending = dict(self._pending)
        records = []
        for entry in self._index.by_id.values():
            record = entry.record
            if record.id in pending:
                touched = _format_time(pending[record.id])
                if record.last_used is None or touched > record.last_used:
                    record = dataclasses.replace(record, last_used=touched)
            records.append(record)
        return sorted(records, key=lambda r: (r.created, r.id))

    def get(self, key_id: str) -> KeyRecord:
        """One key by id (`key_ab12cd34` or `ab12cd34`); raises KeyNotFoundError."""
        wanted = _normalize_id(key_id)
        for record in self.list():
            if record.id == wanted:
                return record
        raise self._not_found(key_id)

    def _not_found(self, key_id: str) -> KeyNotFoundError:
        return KeyNotFoundError(f"no API key with id {key_id!r} in {self.path}; `thox api-key list` shows the ids")

    # ----- the hot path (event loop; memory only) -----

    def verify(self, secret: str) -> KeyRecord | None:
        """The record whose secret this is, or None; constant-time comparison, no file I/O."""
        index = self._index
        if self._error is not None or not self._loaded or len(secret) > _MAX_SECRET_LENGTH:
            return None
        try:
            data = secret.encode("utf-8")
        except UnicodeEncodeError:
            return None
        key_id = parse_key_id(secret)
        if key_id is not None:
            entry = index.by_id.get(key_id)
            if entry is None:
                _digest(_DUMMY_SALT, data)
                return None
            return entry.record if hmac.compare_digest(_digest(entry.salt, data), entry.digest) else None
        found: _Entry | None = None
        for entry in index.installed:
            # No early exit: the time taken does not depend on which installed key (if any) matched.
            if hmac.compare_digest(_digest(entry.salt, data), entry.digest):
                found = entry
        return found.record if found is not None else None

    def touch_last_used(self, key_id: str) -> None:
        """Note that `key_id` was just used; memory only, written by the next `flush_last_used()`."""
        now = self._wall_clock()
        with self._pending_lock:
            self._pending[key_id] = now

    def flush_last_used(self, *, force: bool = False) -> bool:
        """Write noted last-used times, at most once per `flush_interval` unless `force` (blocking); True if written."""
        with self._pending_lock:
            if not self._pending:
                return False
            if not force and self._monotonic() - self._last_flush < self.flush_interval:
                return False
            pending, self._pending = self._pending, {}
            self._last_flush = self._monotonic()

        def apply(entries: dict[str, _Entry]) -> bool:
            changed = False
            for key_id, when in pending.items():
                entry = entries.get(key_id)
                if entry is None:
                    continue  # revoked meanwhile (perhaps by another process): never bring it back
                touched = _format_time(when)
                if entry.record.last_used is None or touched > entry.record.last_used:
                    entries[key_id] = dataclasses.replace(
                        entry, record=dataclasses.replace(entry.record, last_used=touched)
                    )
                    changed = True
            return changed

        try:
            written = self._mutate(apply)
        except BaseException:
            with self._pending_lock:
                for key_id, when in pending.items():
                    self._pending[key_id] = max(when, self._pending.get(key_id, when))
            raise
        return written

    # ----- changing keys (blocking) -----

    def generate(self, name: str = "", scope: str = "inference") -> tuple[KeyRecord, str]:
        """Create a key; returns its record and the secret, which is shown once and never stored."""
        checked_name, checked_scope = _check_name(name), _check_scope(scope)
        result: list[tuple[KeyRecord, str]] = []

        def apply(entries: dict[str, _Entry]) -> None:
            record = KeyRecord(_free_id(entries), checked_name, checked_scope, "generated", self._now(), None)
            secret = _new_secret(record.id)
            entries[record.id] = self._entry(record, secret)
            result.append((record, secret))

        self._mutate(apply)
        return result[0]

    def install(self, secret: str, name: str = "", scope: str = "inference", *, replace: bool = False) -> KeyRecord:
        """Store a key of the user's choosing (`thox config set api.key`); `replace` drops other keys of that name."""
        _check_installed_secret(secret)
        checked_name, checked_scope = _check_name(name), _check_scope(scope)
        data = secret.encode("ascii")
        result: list[KeyRecord] = []

        def apply(entries: dict[str, _Entry]) -> None:
            if replace:
                for same_name in [k for k, e in entries.items() if e.record.name == checked_name]:
                    del entries[same_name]
            for entry in entries.values():
                if hmac.compare_digest(_digest(entry.salt, data), entry.digest):
                    raise KeyInputError(f"this API key is already installed as {entry.record.id}")
            key_id = parse_key_id(secret)
            if key_id is not None:
                # A generated-format secret (e.g. copied from another box) keeps its id, since verify() finds
                # records by the id inside the secret.
                if key_id in entries:
                    raise KeyInputError(
                        f"a different key already has id {key_id}; revoke it first, or install another key"
                    )
            else:
                key_id = _free_id(entries)
            record = KeyRecord(key_id, checked_name, checked_scope, "installed", self._now(), None)
            entries[key_id] = self._entry(record, secret)
            result.append(record)

        self._mutate(apply)
        return result[0]

    def revoke(self, key_id: str) -> KeyRecord:
        """Delete a key; it stops working in this process at once and in others at their next reload."""
        wanted = _normalize_id(key_id)
        result: list[KeyRecord] = []

        def apply(entries: dict[str, _Entry]) -> None:
            entry = entries.pop(wanted, None)
            if entry is None:
                raise self._not_found(key_id)
            result.append(entry.record)

        self._mutate(apply)
        with self._pending_lock:
            self._pending.pop(wanted, None)
        return result[0]

    def regenerate(self, key_id: str) -> tuple[KeyRecord, str]:
        """Give a key a new secret under the same id, name and scope; the old secret stops working at once."""
        wanted = _normalize_id(key_id)
        result: list[tuple[KeyRecord, str]] = []

        def apply(entries: dict[str, _Entry]) -> None:
            entry = entries.get(wanted)
            if entry is None:
                raise self._not_found(key_id)
            secret = _new_secret(wanted)
            record = dataclasses.replace(entry.record, source="generated", created=self._now(), last_used=None)
            entries[wanted] = self._entry(record, secret)
            result.append((record, secret))

        self._mutate(apply)
        with self._pending_lock:
            self._pending.pop(wanted, None)
        return result[0]

    def _now(self) -> str:
        return _format_time(self._wall_clock())

    @staticmethod
    def _entry(record: KeyRecord, secret: str) -> _Entry:
        salt = secrets.token_bytes(SALT_BYTES)
        return _Entry(record, salt, _digest(salt, secret.encode("ascii")))

    def _mutate(self, apply: Callable[[dict[str, _Entry]], bool | None]) -> bool:
        # Lock, re-read what is on disk now (another process may have written), change, write, and serve the
        # result. A corrupt file raises in _parse() before anything is written over it. `apply` returns False
        # when it changed nothing, which skips the write.
        try:
            with self._mutex, self._file_lock():
                fd, identity, raw = self._read_raw()
                try:
                    entries = {} if raw is None else _parse(self.path, raw)
                    written = apply(entries) is not False
                    if written:
                        self._write(entries)
                        new_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                        st = os.fstat(new_fd)
                        if fd is not None:
                            os.close(fd)
                        fd, identity = new_fd, _identity_of(st)
                except BaseException:
                    if fd is not None:
                        os.close(fd)
                    raise
                self._hold(fd)
                self._install_index(identity, entries)
                return written
        except OSError as exc:
            raise KeyStoreError(
                f"cannot update key store {self.path}: {exc.strerror or exc}; run this as the agent's user or root"
            ) from exc

    # ----- the file -----

    def _owner(self) -> tuple[int, int] | None:
        """(uid, gid) that new files should have: only root changes it, to keep the agent user's ownership."""
        if os.geteuid() != 0:
            return None
        for candidate in (self.path, self.path.parent):
            try:
                st = os.stat(candidate)
            except FileNotFoundError:
                continue
            return (st.st_uid, st.st_gid) if st.st_uid != 0 else None
        return None

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_path = self.path.parent / f".{self.path.name}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            owner = self._owner()
            if owner is not None:
                os.fchown(fd, *owner)
            # Released by the kernel when the descriptor closes, also when the process is killed.
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, entries: dict[str, _Entry]) -> None:
        # Not agent.atomic.atomic_write_bytes: when `thox api-key` runs as root the new file must keep the agent
        # user's ownership, or the agent could no longer read its own keys. The sequence is the same: temp file in
        # the same directory, fsync, rename over the old one, fsync the directory.
        data = _serialize(entries)
        parent = self.path.parent
        self._remove_stale_temps()
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), FILE_MODE)
                owner = self._owner()
                if owner is not None:
                    os.fchown(handle.fileno(), *owner)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(parent, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _remove_stale_temps(self) -> None:
        # Called under the file lock, so no other writer is mid-write: any temp file left is from a writer that was
        # killed before its rename.
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            stale.unlink(missing_ok=True)


def _serialize(entries: dict[str, _Entry]) -> bytes:
    keys = []
    for entry in sorted(entries.values(), key=lambda e: (e.record.created, e.record.id)):
        fields: dict[str, Any] = entry.record.as_dict()
        fields["hash"] = f"{HASH_ALGORITHM}${entry.salt.hex()}${entry.digest.hex()}"
        keys.append(fields)
    return (json.dumps({"version": FILE_VERSION, "keys": keys}, indent=2) + "\n").encode("utf-8")


def _parse(path: Path, raw: bytes) -> dict[str, _Entry]:
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
    entries: dict[str, _Entry] = {}
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


def _parse_entry(item: object) -> _Entry:
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
    return _Entry(record, salt, digest)


def _check_time(field: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise _BadRecord(f"{field} must be a time like 2025-01-31T12:00:00Z, found {value!r}")
    try:
        time.strptime(value, _TIME_FORMAT)
    except ValueError:
        raise _BadRecord(f"{field} {value!r} is not a time like 2025-01-31T12:00:00Z") from None
