"""API keys' storage: one JSON file of salted hashes (agent.security.key_rules says what a key is), verified from
memory.

`verify()` finds the one record to check from the id a generated secret carries, without trying them all; the few
installed keys (any shape) are each checked.

Threads and the event loop: `verify()` and `touch_last_used()` only read and write memory (no file I/O, no lock held
across I/O) and are called on the event loop. Every other public method may touch the file (stat, read, fsync,
rename) and is blocking: the agent calls it through `asyncio.to_thread`. Writers in several processes (the agent,
`thox api-key ...`) take an exclusive `flock` on a lock file beside the store and re-read the file before changing
it, so no writer undoes another's change.

How the running agent sees changes made by another process: `reload_if_changed()` costs one `stat` when nothing
changed (every write renames a new file into place, so the inode changes). The agent calls it via
`asyncio.to_thread` before verifying each request's key, so that a revoke or regenerate by `thox api-key` takes
effect at the very next request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hmac
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from agent.security.key_file import Entry, Index, parse, serialize
from agent.security.key_rules import (
    ID_PREFIX,
    SALT_BYTES,
    KeyInputError,
    KeyNotFoundError,
    KeyRecord,
    KeyStoreCorruptError,
    KeyStoreError,
    check_installed_secret,
    check_name,
    check_scope,
    digest,
    format_time,
    new_secret,
    normalize_id,
    parse_key_id,
)

FILE_MODE = 0o600
DEFAULT_FLUSH_INTERVAL = 60.0
# Bearer secrets longer than this are not ours; refusing them before hashing keeps verify() cheap for any input.
_MAX_SECRET_LENGTH = 4096
# Hashed when a well-formed secret names an id we do not have, so hits and misses cost the same work.
_DUMMY_SALT = bytes(SALT_BYTES)


_EMPTY_INDEX = Index({}, ())
# (st_dev, st_ino, st_size, st_mtime_ns): every write renames a new file into place, so the inode changes (see
# KeyStore._hold for why the inode number cannot come back).
_Identity = tuple[int, int, int, int]


def _identity_of(st: os.stat_result) -> _Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _free_id(entries: dict[str, Entry]) -> str:
    # 32 random bits: collisions are rare among a handful of keys, and retried.
    while (key_id := f"{ID_PREFIX}{secrets.token_hex(4)}") in entries:
        pass
    return key_id


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
                entries = {} if raw is None else parse(self.path, raw)
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

    def _install_index(self, identity: _Identity | None, entries: dict[str, Entry]) -> None:
        installed = tuple(e for e in entries.values() if e.record.source == "installed")
        self._index = Index(dict(entries), installed)
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
                touched = format_time(pending[record.id])
                if record.last_used is None or touched > record.last_used:
                    record = dataclasses.replace(record, last_used=touched)
            records.append(record)
        return sorted(records, key=lambda r: (r.created, r.id))

    def get(self, key_id: str) -> KeyRecord:
        """One key by id (`key_ab12cd34` or `ab12cd34`); raises KeyNotFoundError."""
        wanted = normalize_id(key_id)
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
                digest(_DUMMY_SALT, data)
                return None
            return entry.record if hmac.compare_digest(digest(entry.salt, data), entry.digest) else None
        found: Entry | None = None
        for entry in index.installed:
            # No early exit: the time taken does not depend on which installed key (if any) matched.
            if hmac.compare_digest(digest(entry.salt, data), entry.digest):
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

        def apply(entries: dict[str, Entry]) -> bool:
            changed = False
            for key_id, when in pending.items():
                entry = entries.get(key_id)
                if entry is None:
                    continue  # revoked meanwhile (perhaps by another process): never bring it back
                touched = format_time(when)
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
        checked_name, checked_scope = check_name(name), check_scope(scope)
        result: list[tuple[KeyRecord, str]] = []

        def apply(entries: dict[str, Entry]) -> None:
            record = KeyRecord(_free_id(entries), checked_name, checked_scope, "generated", self._now(), None)
            secret = new_secret(record.id)
            entries[record.id] = self._entry(record, secret)
            result.append((record, secret))

        self._mutate(apply)
        return result[0]

    def install(self, secret: str, name: str = "", scope: str = "inference", *, replace: bool = False) -> KeyRecord:
        """Store a key of the user's choosing (`thox config set api.key`); `replace` drops other keys of that name."""
        check_installed_secret(secret)
        checked_name, checked_scope = check_name(name), check_scope(scope)
        data = secret.encode("ascii")
        result: list[KeyRecord] = []

        def apply(entries: dict[str, Entry]) -> None:
            if replace:
                for same_name in [k for k, e in entries.items() if e.record.name == checked_name]:
                    del entries[same_name]
            for entry in entries.values():
                if hmac.compare_digest(digest(entry.salt, data), entry.digest):
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
        wanted = normalize_id(key_id)
        result: list[KeyRecord] = []

        def apply(entries: dict[str, Entry]) -> None:
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
        wanted = normalize_id(key_id)
        result: list[tuple[KeyRecord, str]] = []

        def apply(entries: dict[str, Entry]) -> None:
            entry = entries.get(wanted)
            if entry is None:
                raise self._not_found(key_id)
            secret = new_secret(wanted)
            record = dataclasses.replace(entry.record, source="generated", created=self._now(), last_used=None)
            entries[wanted] = self._entry(record, secret)
            result.append((record, secret))

        self._mutate(apply)
        with self._pending_lock:
            self._pending.pop(wanted, None)
        return result[0]

    def _now(self) -> str:
        return format_time(self._wall_clock())

    @staticmethod
    def _entry(record: KeyRecord, secret: str) -> Entry:
        salt = secrets.token_bytes(SALT_BYTES)
        return Entry(record, salt, digest(salt, secret.encode("ascii")))

    def _mutate(self, apply: Callable[[dict[str, Entry]], bool | None]) -> bool:
        # Lock, re-read what is on disk now (another process may have written), change, write, and serve the
        # result. A corrupt file raises in parse() before anything is written over it. `apply` returns False
        # when it changed nothing, which skips the write.
        try:
            with self._mutex, self._file_lock():
                fd, identity, raw = self._read_raw()
                try:
                    entries = {} if raw is None else parse(self.path, raw)
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

    def _write(self, entries: dict[str, Entry]) -> None:
        # Not agent.atomic.atomic_write_bytes: when `thox api-key` runs as root the new file must keep the agent
        # user's ownership, or the agent could no longer read its own keys. The sequence is the same: temp file in
        # the same directory, fsync, rename over the old one, fsync the directory.
        data = serialize(entries)
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
