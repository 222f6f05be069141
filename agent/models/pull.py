"""Copying a model from another box's store into this one over the peer API (mutual TLS), resumably.

The source box serves `GET /cluster/models/<id>` (its manifest record and the model's files with their sizes) and
`GET /cluster/models/<id>/files/<path>` (one file; Range requests continue a partial download). The puller
assembles the model in the store's staging folder, continues partial files where they stopped (a pull cut by a
power loss or a restart resumes instead of starting over), checks the digest the source's manifest records, and
only then moves the model into the store and lists it. A model whose bytes do not match is never installed.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from agent.atomic import content_sha256
from agent.errors import ThoxError
from agent.models.store import InstalledModel, ModelStore

log = structlog.get_logger("agent.models.pull")

MODELS_PATH = "/cluster/models"
_CHUNK = 1 << 20

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


class PullError(ThoxError):
    """A model could not be copied from the source box; the message says why."""


def listing(store: ModelStore, model: InstalledModel) -> dict[str, Any]:
    """Blocking: what a puller needs to copy `model`: its manifest record and its files (paths inside the model)."""
    if model.path.is_file():
        files = [{"path": model.path.name, "size": model.path.stat().st_size}]
    else:
        files = [{"path": p.relative_to(model.path).as_posix(), "size": p.stat().st_size}
                 for p in sorted(model.path.rglob("*")) if p.is_file()]
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


async def pull(session: aiohttp.ClientSession, base_url: str, model_id: str, store: ModelStore,
               on_progress: Progress | None = None) -> InstalledModel:
    """Copy `model_id` from the box at `base_url` (its peer API) into `store`; PullError on any failure."""
    try:
        async with session.get(f"{base_url}{MODELS_PATH}/{model_id}") as answer:
            if answer.status != 200:
                raise PullError(f"the source box refused to list {model_id!r}: HTTP {answer.status} "
                                f"{(await answer.text())[:300]}")
            described = await answer.json()
        entry = store.entry_from_record(described["model"])
        files = [(str(f["path"]), int(f["size"])) for f in described["files"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise PullError(f"the source box described {model_id!r} in a form this agent cannot read: {exc}") from exc
    except aiohttp.ClientError as exc:
        raise PullError(f"the source box did not answer: {exc}") from exc
    if entry.id != model_id or any(".." in Path(p).parts or Path(p).is_absolute() for p, _ in files):
        raise PullError(f"the source box's description of {model_id!r} names other files than the model's")
    single_file = len(files) == 1 and entry.path.name == files[0][0]
    staging = store.staging_dir(model_id)
    total = sum(size for _, size in files)
    done = 0
    started = time.monotonic()
    for relative, size in files:
        target = _staged_target(staging, entry, relative, single_file)
        done = await _fetch(session, f"{base_url}{MODELS_PATH}/{model_id}/files/{relative}", target, size,
                            done, total, on_progress)
    staged = staging / entry.path.name
    digest = await asyncio.to_thread(content_sha256, staged)
    if digest != entry.sha256:
        await asyncio.to_thread(shutil.rmtree, staging, True)
        raise PullError(f"the copy of {model_id!r} does not match the source's sha256 ({digest[:12]}... instead of "
                        f"{entry.sha256[:12]}...); it was discarded")
    installed = await asyncio.to_thread(store.install_staged, entry, staged)
    await asyncio.to_thread(shutil.rmtree, staging, True)
    log.info("model_pulled", model=model_id, bytes=total, seconds=round(time.monotonic() - started, 2),
             source=base_url)
    return installed


async def _fetch(session: aiohttp.ClientSession, url: str, target: Path, size: int, done: int, total: int,
                 on_progress: Progress | None) -> int:
    """Download one file into `target`, continuing a partial copy; returns the running byte count."""
    await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
    have = await asyncio.to_thread(_size, target)
    if have > size:  # not a prefix of this file: start over
        await asyncio.to_thread(target.unlink)
        have = 0
    done += have
    if have == size:
        return done
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(sock_read=60)) as answer:
            if answer.status not in (200, 206):
                raise PullError(f"the source box refused {url}: HTTP {answer.status}")
            if answer.status == 200 and have:  # the source ignored the range: take the whole file again
                done -= have
                have = 0
            handle = await asyncio.to_thread(target.open, "ab" if have else "wb")
            try:
                async for chunk in answer.content.iter_chunked(_CHUNK):
                    await asyncio.to_thread(handle.write, chunk)
                    done += len(chunk)
                    if on_progress is not None:
                        on_progress(done, total)
                await asyncio.to_thread(handle.flush)
            finally:
                await asyncio.to_thread(handle.close)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise PullError(f"the copy from the source box broke off ({exc}); pulling again continues from "
                        f"{done} bytes") from exc
    written = await asyncio.to_thread(_size, target)
    if written != size:
        raise PullError(f"{target.name}: the source box sent {written} of {size} bytes")
    return done


def _size(path: Path) -> int:
    """Bytes in a (partial) file; 0 when there is none yet."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
