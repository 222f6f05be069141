"""Copying a model into this box's store, resumably: from another box over the peer API (mutual TLS), or from an
OCI registry (agent/models/oci/pull.py, through `assemble`).

The source box serves `GET /cluster/models/<id>` (its manifest record and the model's files with their sizes) and
`GET /cluster/models/<id>/files/<path>` (one file; Range requests continue a partial download). The puller
assembles the model in the store's staging folder, continues partial files where they stopped (a pull cut by a
power loss or a restart resumes instead of starting over), checks the digest the source's manifest records, and
only then moves the model into the store and lists it. A model whose bytes do not match is never installed.

Disk space is checked before the copy starts (what is still missing, against what the store's disk has free). A
disk that fills up anyway (something else wrote to it meanwhile) fails the pull with that reason, and the partial
copy is removed: a full disk would stop every other write of the box (manifest, keys, the cluster's etcd data).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

import aiohttp
import structlog

from agent.atomic import folder_digest
from agent.errors import ThoxError
from agent.models.store import InstalledModel, ModelStore, ModelStoreError

log = structlog.get_logger("agent.models.pull")
_T = TypeVar("_T")

MODELS_PATH = "/cluster/models"
_CHUNK = 1 << 20
# Bytes handed to the writing thread at a time: fewer thread hops, and the network is read meanwhile.
_WRITE_BATCH = 4 << 20
# Left free beside a pulled model: the manifest and the box's other small files must still be writable afterwards.
DISK_RESERVE_BYTES = 16 << 20
# Errors of a disk that is full (or a quota that is used up).
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


class PullError(ThoxError):
    """A model could not be copied from its source (a box, a registry); the message says why."""


def listing(store: ModelStore, model: InstalledModel) -> dict[str, Any]:
    """Blocking: what a puller needs to copy `model`: its manifest record and its files (paths inside the model)."""
    if model.path.is_file():
        files = [{"path": model.path.name, "size": model.path.stat().st_size}]
    else:
        files = [
            {"path": p.relative_to(model.path).as_posix(), "size": p.stat().st_size}
            for p in sorted(model.path.rglob("*"))
            if p.is_file()
        ]
    return {"model": store.manifest_record(model), "files": files}


def served_file(model: InstalledModel, relative: str) -> Path | None:
    """Blocking: the model's file at `relative`, or None for anything outside the model (no path escapes)."""
    if model.path.is_file():
        return model.path if relative == model.path.name else None
    root = model.path.resolve()
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root) or not candidate.is_file():
        return None
    return candidate


def _staged_target(staging: Path, entry: InstalledModel, relative: str, single_file: bool) -> Path:
    # A single-file model is staged as the file itself; a folder model as a folder named like the model's.
    return staging / relative if single_file else staging / entry.path.name / relative


@dataclass(frozen=True)
class RemoteFile:
    """One file of a model being pulled: its path inside the model, its size and where to GET it."""

    path: str
    size: int
    url: str


async def pull(
    session: aiohttp.ClientSession, base_url: str, model_id: str, store: ModelStore, on_progress: Progress | None = None
) -> InstalledModel:
    """Copy `model_id` from the box at `base_url` (its peer API) into `store`; PullError on any failure."""
    try:
        async with session.get(f"{base_url}{MODELS_PATH}/{model_id}") as answer:
            if answer.status != 200:
                raise PullError(
                    f"the source box refused to list {model_id!r}: HTTP {answer.status} {(await answer.text())[:300]}"
                )
            described = await answer.json()
        entry = store.entry_from_record(described["model"])
        files = [(str(f["path"]), int(f["size"])) for f in described["files"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise PullError(f"the source box described {model_id!r} in a form this agent cannot read: {exc}") from exc
    except aiohttp.ClientError as exc:
        raise PullError(f"the source box did not answer: {exc}") from exc
    if entry.id != model_id or any(".." in Path(p).parts or Path(p).is_absolute() for p, _ in files):
        raise PullError(f"the source box's description of {model_id!r} names other files than the model's")
    remote = [RemoteFile(path, size, f"{base_url}{MODELS_PATH}/{model_id}/files/{path}") for path, size in files]
    entry = dataclasses.replace(entry, source=f"{entry.source} (pulled from the cluster)")
    return await assemble(session, store, entry, remote, "the source box", on_progress)


async def assemble(
    session: aiohttp.ClientSession,
    store: ModelStore,
    entry: InstalledModel,
    files: list[RemoteFile],
    source: str,
    on_progress: Progress | None = None,
) -> InstalledModel:
    """Download `files` into the staging folder of `entry.id` (continuing what an earlier try left), check the
    whole against `entry.sha256`, and install it under `entry`; PullError on any failure (`source` names where
    the bytes come from in its messages). A file's path is inside the model; a one-file model is that file."""
    model_id = entry.id
    single_file = len(files) == 1 and entry.path.name == files[0].path
    staging = store.staging_dir(model_id)
    sizes = [(f.path, f.size) for f in files]
    total = sum(f.size for f in files)
    started = time.monotonic()
    copied = 0

    def counted(done: int, of: int) -> None:
        nonlocal copied
        copied = done
        if on_progress is not None:
            on_progress(done, of)

    try:
        await asyncio.to_thread(_check_room, store, model_id, entry, sizes, single_file)
        done = 0
        digests = []
        for file in files:
            target = _staged_target(staging, entry, file.path, single_file)
            done, file_digest = await _fetch(session, file.url, target, file.size, done, total, source, counted)
            digests.append((file.path, file_digest))
        staged = staging / entry.path.name
        digest = digests[0][1] if single_file else folder_digest(digests)
        if digest != entry.sha256:
            await asyncio.to_thread(shutil.rmtree, staging, True)
            raise PullError(
                f"the copy of {model_id!r} does not match the source's sha256 ({digest[:12]}... instead "
                f"of {entry.sha256[:12]}...); it was discarded"
            )
        installed = await asyncio.to_thread(store.install_staged, entry, staged)
    except ModelStoreError as exc:
        await asyncio.to_thread(shutil.rmtree, staging, True)  # the store removed the copy it could not list
        raise PullError(f"the copy of {model_id!r} is complete but could not be installed: {exc}") from exc
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            raise PullError(
                f"the copy of {model_id!r} could not be written under {store.root}: {exc.strerror or exc}"
            ) from exc
        await asyncio.to_thread(shutil.rmtree, staging, True)  # give the space back: the box needs it
        free = await asyncio.to_thread(_free_bytes, store.root)
        raise PullError(
            f"the disk holding the model store {store.root} filled up while copying {model_id!r} "
            f"({_mb(copied)} of {_mb(total)} copied, {_mb(free)} free now); the partial copy was removed "
            f"to give the space back: free at least {_mb(total + DISK_RESERVE_BYTES)} there and pull "
            f"again"
        ) from exc
    await asyncio.to_thread(shutil.rmtree, staging, True)
    seconds = round(time.monotonic() - started, 2)
    log.info("model_pulled", model=model_id, bytes=total, seconds=seconds, source=source)
    return installed


def _check_room(
    store: ModelStore, model_id: str, entry: InstalledModel, files: list[tuple[str, int]], single_file: bool
) -> None:
    """Blocking: PullError unless the store's disk has room for the bytes still missing (a resumed copy counts
    what it already has); moving the finished copy into the store takes no more (same disk)."""
    staging = store.staging_dir(model_id)
    missing = sum(
        max(size - _size(_staged_target(staging, entry, relative, single_file)), 0) for relative, size in files
    )
    store.root.mkdir(parents=True, exist_ok=True)
    free = _free_bytes(store.root)
    if missing + DISK_RESERVE_BYTES > free:
        raise PullError(
            f"not enough disk space for {model_id!r} in the model store {store.root}: the copy needs "
            f"{_mb(missing)} more (and {_mb(DISK_RESERVE_BYTES)} kept free), {_mb(free)} free; free space "
            f"there and pull again"
        )


def _free_bytes(path: Path) -> int:
    """Blocking: bytes an unprivileged writer may still use on the disk holding `path`."""
    return shutil.disk_usage(path).free


def _mb(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


async def _fetch(
    session: aiohttp.ClientSession,
    url: str,
    target: Path,
    size: int,
    done: int,
    total: int,
    source: str,
    on_progress: Progress | None,
) -> tuple[int, str]:
    """Download one file into `target`, continuing a partial copy; returns the running byte count and the file's
    sha256 (hashed as it is written, so the copy is not read a second time to check it)."""
    await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
    have = await asyncio.to_thread(_size, target)
    if have > size:  # not a prefix of this file: start over
        await asyncio.to_thread(target.unlink)
        have = 0
    hasher = hashlib.sha256()
    if have:
        await _to_thread_to_the_end(_hash_into, hasher, target)
    done += have
    if have == size:
        return done, hasher.hexdigest()
    headers = {"Range": f"bytes={have}-"} if have else {}
    if have:
        log.info("model_pull_resumed", file=target.name, from_bytes=have, size=size)
    try:
        async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(sock_read=60)) as answer:
            if answer.status not in (200, 206):
                raise PullError(f"{source} refused {url}: HTTP {answer.status}")
            if answer.status == 200 and have:  # the source ignored the range: take the whole file again
                done -= have
                have = 0
                hasher = hashlib.sha256()
            handle = cast(BinaryIO, await _to_thread_to_the_end(target.open, "ab" if have else "wb"))
            done = await _write_stream(answer.content, handle, hasher, done, total, on_progress)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise PullError(f"the copy from {source} broke off ({exc}); pulling again continues from {done} bytes") from exc
    written = await asyncio.to_thread(_size, target)
    if written != size:
        raise PullError(f"{target.name}: {source} sent {written} of {size} bytes")
    return done, hasher.hexdigest()


async def _write_stream(
    content: aiohttp.StreamReader,
    handle: BinaryIO,
    hasher: Any,
    done: int,
    total: int,
    on_progress: Progress | None,
) -> int:
    """Write (and hash) what arrives, a few MiB at a time on a worker thread while the loop reads the next ones;
    the file is closed only after its last write finished, whatever happens."""

    def write(pieces: list[bytes]) -> None:
        for piece in pieces:  # as they came: no copy into one buffer
            handle.write(piece)
            hasher.update(piece)  # hashlib lets go of the GIL for large pieces: this overlaps the network

    pending: asyncio.Future[None] | None = None
    batch: list[bytes] = []
    batched = 0
    try:
        async for data in content.iter_any():
            batch.append(data)
            batched += len(data)
            if batched < _WRITE_BATCH:
                continue
            if pending is not None:
                await pending
            pending = asyncio.ensure_future(_to_thread_to_the_end(write, batch))
            done += batched
            batch, batched = [], 0
            if on_progress is not None:
                on_progress(done, total)
        if pending is not None:
            await pending
        if batch:
            await _to_thread_to_the_end(write, batch)
            done += batched
            if on_progress is not None:
                on_progress(done, total)
        await _to_thread_to_the_end(handle.flush)
        # On the disk before the store lists the model: after a power cut a listed model is a whole one.
        await _to_thread_to_the_end(os.fsync, handle.fileno())
    finally:
        if pending is not None and not pending.done():
            await asyncio.wait({pending})  # a cancelled pull must not close the file under a running write
        await _to_thread_to_the_end(handle.close)
    return done


def _hash_into(hasher: Any, path: Path) -> None:
    """Blocking: feed a partial copy already on disk to `hasher` (a resumed download continues the hash)."""
    with path.open("rb") as partial:
        while block := partial.read(_CHUNK):
            hasher.update(block)


async def _to_thread_to_the_end(fn: Callable[..., _T], *args: Any) -> _T:
    """asyncio.to_thread for a file operation, which a cancellation does not leave running behind the caller.

    A thread cannot be stopped: cancelled mid-write, to_thread returns while the write goes on, and a pull started
    again at once (the cluster tasks restart when a learner is promoted) would measure and append to a file still
    being written, and fail its digest check. So the operation is awaited to its end, then the cancellation goes on.
    """
    operation = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(operation)
    except asyncio.CancelledError:
        await asyncio.wait({operation})
        raise


def _size(path: Path) -> int:
    """Bytes in a (partial) file; 0 when there is none yet."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
