"""Crash-safe file writes: temp file in the same directory, fsync, rename, fsync the directory.

A power cut at any point leaves either the old file or the new one, never a torn mix.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace `path` with `data` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_copy_with_sha256(source: Path, target: Path) -> str:
    """Copy `source` to `target` atomically; return the sha256 of the bytes written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return digest.hexdigest()


def atomic_copy_tree_with_sha256(source: Path, target: Path) -> str:
    """Copy folder `source` to `target` atomically; return a digest over every file's path and sha256.

    The copy is assembled in a temp folder beside `target` and renamed into place only when complete.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        digests = []
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            relative = file.relative_to(source)
            digests.append((relative.as_posix(), atomic_copy_with_sha256(file, tmp / relative)))
        os.chmod(tmp, 0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    return folder_digest(digests)


def folder_digest(files: Iterable[tuple[str, str]]) -> str:
    """The store's digest of a folder from its files' (posix path inside it, sha256 hex): over the lines
    "path NUL sha256 LF" in pathlib's order of the paths (by their parts, not as strings)."""
    ordered = sorted(files, key=lambda item: PurePosixPath(item[0]).parts)
    return hashlib.sha256("".join(f"{path}\0{digest}\n" for path, digest in ordered).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def content_sha256(path: Path) -> str:
    """The digest the model store records: a file's sha256, or for a folder the digest over every file's path and
    sha256 (what atomic_copy_tree_with_sha256 returns for the same folder)."""
    if path.is_file():
        return file_sha256(path)
    files = [p for p in path.rglob("*") if p.is_file()]
    return folder_digest((file.relative_to(path).as_posix(), file_sha256(file)) for file in files)


def tree_size(path: Path) -> int:
    """Bytes in a file, or in every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
