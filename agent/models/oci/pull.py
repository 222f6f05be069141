"""A model from an OCI registry into the store: resolve, check, download resumably, verify, install.

The bytes go through agent/models/pull.py's `assemble` (the same staging folder, Range resumption, disk check and
all-or-nothing install as a copy from another box). The digest the copy is checked against comes from the
manifest's layer digests, so a corrupted or substituted blob is refused however its card reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from agent.models.oci.artifact import (
    ArtifactError,
    Layer,
    Reference,
    config_descriptor,
    layers_of,
    store_digest,
)
from agent.models.oci.client import OciRegistry
from agent.models.pull import Progress, RemoteFile, assemble
from agent.models.registry import CHAT
from agent.models.store import InstalledModel, ModelStore

_FORMATS = ("gguf", "safetensors")


@dataclass(frozen=True)
class RemoteModel:
    """A model as the registry describes it: where, its card, its files and the store entry it would become."""

    reference: Reference
    manifest_digest: str
    card: dict[str, Any]
    layers: list[Layer]

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    def placement_facts(self) -> dict[str, Any]:
        """What the cluster's placement needs to know of a model before any box has it."""
        return {
            "size": self.size,
            "chat": CHAT in self.card.get("capabilities", []),
            "kv_bytes_per_token": self.card.get("kv_bytes_per_token"),
        }

    def entry(self) -> InstalledModel:
        """The store entry of this model once pulled (its path is rewritten by the store on install)."""
        card = self.card
        return InstalledModel(
            id=self.reference.model_id,
            path=Path(Path(self.layers[0].path).parts[0]),
            size=self.size,
            sha256=store_digest(self.layers),
            format=str(card["format"]),
            quantization=str(card.get("quantization") or "unknown"),
            capabilities=tuple(c for c in card.get("capabilities", []) if isinstance(c, str)),
            source=f"{card.get('source') or 'model registry'}; pulled as {self.reference}",
            license=str(card.get("license") or "unknown"),
            installed_at=int(time.time()),
            sampling_defaults={str(k): float(v) for k, v in (card.get("sampling_defaults") or {}).items()},
            chat_template=str(card.get("chat_template") or "gguf"),
        )


async def describe(registry: OciRegistry, session: aiohttp.ClientSession, reference: Reference) -> RemoteModel:
    """The model `reference` names; NotInRegistryError/RegistryError, or ArtifactError if it is not a model."""
    manifest, digest = await registry.manifest(session, reference)
    config = config_descriptor(manifest, reference)
    card = await registry.document(session, reference.name, config["digest"])
    layers = layers_of(manifest, reference)
    if card.get("format") not in _FORMATS:
        raise ArtifactError(f"{reference}: format {card.get('format')!r} is not one this agent serves ({_FORMATS})")
    try:
        found = RemoteModel(reference, digest, card, layers)
        found.entry()
    except (TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"{reference}: its card cannot be read: {exc}") from exc
    return found


async def pull(
    registry: OciRegistry,
    session: aiohttp.ClientSession,
    model: RemoteModel,
    store: ModelStore,
    on_progress: Progress | None = None,
) -> InstalledModel:
    """Download and install `model` (PullError on failure; a half-downloaded copy resumes next time)."""
    name = model.reference.name
    one_file = len(model.layers) == 1 and len(Path(model.layers[0].path).parts) == 1
    files = [
        RemoteFile(
            layer.path if one_file else Path(*Path(layer.path).parts[1:]).as_posix(),
            layer.size,
            registry.blob_url(name, layer.digest),
        )
        for layer in model.layers
    ]
    return await assemble(session, store, model.entry(), files, f"the model registry at {registry.url}", on_progress)


async def remote_catalog(registry: OciRegistry, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
    """Every model and tag of the registry with its size and card facts (a tag that is not a model says why)."""
    rows: list[dict[str, Any]] = []
    for name in await registry.catalog(session):
        for tag in await registry.tags(session, name):
            reference = Reference(name, tag)
            try:
                found = await describe(registry, session, reference)
            except ArtifactError as exc:
                rows.append({"model": str(reference), "id": reference.model_id, "error": str(exc)})
                continue
            card = found.card
            rows.append(
                {
                    "model": str(reference),
                    "id": reference.model_id,
                    "digest": found.manifest_digest,
                    "size": found.size,
                    **{
                        key: card.get(key)
                        for key in ("format", "family", "parameters", "quantization", "context_length", "license")
                    },
                    "capabilities": card.get("capabilities", []),
                }
            )
    return rows
