"""Publishing a stored model to an OCI registry (`thox models push`; the factory and fleets fill registries so).

Blobs the registry already holds are not sent again, so publishing a new tag of a model costs a manifest.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp

from agent.atomic import file_sha256
from agent.models.oci.artifact import (
    CONFIG_MEDIA_TYPE,
    FILE_LAYER,
    GGUF_LAYER,
    Reference,
    descriptor,
    manifest,
    model_card,
    model_files,
    sha256_digest,
)
from agent.models.oci.client import OciRegistry
from agent.models.store import InstalledModel

_CHUNK = 1 << 20

Progress = Callable[[int, int], None]  # (bytes sent or found in the registry, bytes in all)


async def push(
    registry: OciRegistry,
    session: aiohttp.ClientSession,
    model: InstalledModel,
    reference: Reference,
    on_progress: Progress | None = None,
) -> str:
    """Upload `model` as `reference`; returns the manifest's digest. RegistryError when the registry refuses."""
    files = await asyncio.to_thread(model_files, model)
    card = await asyncio.to_thread(model_card, model)
    sizes = await asyncio.to_thread(lambda: [path.stat().st_size for _, path in files])
    total, done = sum(sizes), 0
    layers = []
    for (title, path), size in zip(files, sizes, strict=True):
        digest = f"sha256:{await asyncio.to_thread(file_sha256, path)}"
        if not await registry.has_blob(session, reference.name, digest):
            await registry.upload_blob(session, reference.name, digest, size, functools.partial(_chunks, path))
        done += size
        if on_progress is not None:
            on_progress(done, total)
        media = GGUF_LAYER if path.suffix == ".gguf" else FILE_LAYER
        layers.append(descriptor(media, digest, size, title))
    config = json.dumps(card, sort_keys=True).encode()
    config_digest = sha256_digest(config)
    if not await registry.has_blob(session, reference.name, config_digest):
        await registry.upload_blob(session, reference.name, config_digest, len(config), config)
    document = manifest(descriptor(CONFIG_MEDIA_TYPE, config_digest, len(config)), layers)
    raw = json.dumps(document, sort_keys=True).encode()
    await registry.put_manifest(session, reference, raw)
    return sha256_digest(raw)


async def _chunks(path: Path) -> AsyncIterator[bytes]:
    handle = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(handle.read, _CHUNK):
            yield chunk
    finally:
        await asyncio.to_thread(handle.close)
