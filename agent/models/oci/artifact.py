"""A model as an OCI artifact, and the `name:tag` references that address one.

Manifest (`application/vnd.oci.image.manifest.v1+json`, `artifactType` `application/vnd.thox.model.v1`):
- `config`: the model's card (`application/vnd.thox.model.config.v1+json`): id, format, family, parameters,
  quantization, context length, capabilities, license, chat template, sampling defaults;
- `layers`: one per file of the model, each with its path as `org.opencontainers.image.title`: the file's name for
  a one-file model (a GGUF), `<folder>/<path>` for a folder model (safetensors, tokenizer and configs).

A layer's digest is the sha256 of its file, so the store's digest of the whole model (agent/atomic.py
content_sha256) follows from the layers' digests alone: a pulled copy is checked against what the manifest names,
not against what the card claims.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from agent.atomic import folder_digest
from agent.errors import ThoxError
from agent.models.registry import CHAT
from agent.models.residency import kv_bytes_per_token
from agent.models.store import InstalledModel
from engines.base import EngineError
from engines.gguf_file import GgufFile

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.thox.model.v1"
CONFIG_MEDIA_TYPE = "application/vnd.thox.model.config.v1+json"
GGUF_LAYER = "application/vnd.thox.model.gguf.v1"
FILE_LAYER = "application/vnd.thox.model.file.v1"
TITLE = "org.opencontainers.image.title"
CARD_VERSION = 1

# The distribution spec's grammar for repository names (one path component: a model's name is its store folder's)
# and tags.
_NAME = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class ArtifactError(ThoxError):
    """A reference is malformed, or a manifest or card is not a model this agent can install."""


@dataclass(frozen=True)
class Reference:
    """`name[:tag]` in a registry; the tag defaults to `latest`."""

    name: str
    tag: str = "latest"

    @classmethod
    def parse(cls, text: str) -> Reference:
        name, _, tag = text.strip().partition(":")
        tag = tag or "latest"
        if not _NAME.fullmatch(name):
            raise ArtifactError(
                f"{text!r} is not a model name: lowercase letters and digits, separated by '.', '_' or '-'"
            )
        if not _TAG.fullmatch(tag):
            raise ArtifactError(f"{tag!r} is not a tag: up to 128 letters, digits, '_', '.' or '-'")
        return cls(name, tag)

    @property
    def model_id(self) -> str:
        """The id the model gets in a store (and in `/v1/models`): the name alone for `latest`."""
        return self.name if self.tag == "latest" else f"{self.name}:{self.tag}"

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


def store_id(text: str) -> str:
    """The store id a request's `model` means: `name:latest` is `name`; an id that is no reference is itself."""
    try:
        return Reference.parse(text).model_id
    except ArtifactError:
        return text


@dataclass(frozen=True)
class Layer:
    """One file of a model in the registry: its path inside the model, size and digest."""

    path: str
    size: int
    digest: str


def model_files(model: InstalledModel) -> list[tuple[str, Path]]:
    """Blocking: (title, file) for each file of a stored model, in a stable order."""
    if model.path.is_file():
        return [(model.path.name, model.path)]
    return [
        (f"{model.path.name}/{file.relative_to(model.path).as_posix()}", file)
        for file in sorted(model.path.rglob("*"))
        if file.is_file()
    ]


def model_card(model: InstalledModel) -> dict[str, Any]:
    """Blocking: the card of a stored model (facts of a GGUF read from its header)."""
    card: dict[str, Any] = {
        "version": CARD_VERSION,
        "id": model.id,
        "format": model.format,
        "quantization": model.quantization,
        "capabilities": list(model.capabilities),
        "license": model.license,
        "source": model.source,
        "sampling_defaults": dict(model.sampling_defaults),
        "chat_template": model.chat_template,
        "size": model.size,
    }
    if model.format == "gguf" and model.path.is_file():
        try:
            gguf = GgufFile(model.path)
        except EngineError as exc:
            raise ArtifactError(f"{model.id!r} cannot be published: {exc}") from exc
        family = str(gguf.get("general.architecture", "unknown"))
        card.update(
            family=family,
            parameters=gguf.get("general.size_label"),
            context_length=gguf.get(f"{family}.context_length"),
            template=gguf.get("tokenizer.chat_template"),
        )
    if CHAT in model.capabilities:
        try:
            card["kv_bytes_per_token"] = kv_bytes_per_token(model)  # the placement's memory estimate needs it
        except EngineError as exc:
            raise ArtifactError(f"{model.id!r} cannot be published: {exc}") from exc
        # Every chat model here gets grammar-constrained JSON and function calls (engines/runtime/grammar.py).
        card["capabilities"] = sorted({*card["capabilities"], "json", "tools"})
    return card


def descriptor(media_type: str, digest: str, size: int, title: str | None = None) -> dict[str, Any]:
    found: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    if title is not None:
        found["annotations"] = {TITLE: title}
    return found


def manifest(config: dict[str, Any], layers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": config,
        "layers": layers,
    }


def config_descriptor(manifest_doc: dict[str, Any], reference: Reference) -> dict[str, Any]:
    """The card's descriptor; ArtifactError when the manifest is not a Thox model's."""
    config = manifest_doc.get("config")
    if not isinstance(config, dict) or config.get("mediaType") != CONFIG_MEDIA_TYPE:
        raise ArtifactError(f"{reference} in the registry is not a Thox model (its config is not a model card)")
    if not isinstance(config.get("digest"), str) or not _DIGEST.fullmatch(config["digest"]):
        raise ArtifactError(f"{reference}: the manifest names its card with an unusable digest")
    return config


def layers_of(manifest_doc: dict[str, Any], reference: Reference) -> list[Layer]:
    """The model's files as the manifest lists them; ArtifactError for paths that would leave the model."""
    found: list[Layer] = []
    for raw in manifest_doc.get("layers") or []:
        try:
            title = str(raw["annotations"][TITLE])
            digest, size = str(raw["digest"]), int(raw["size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{reference}: a layer has no path, digest or size ({exc})") from exc
        path = PurePosixPath(title)
        if path.is_absolute() or ".." in path.parts or not path.parts or not _DIGEST.fullmatch(digest) or size < 0:
            raise ArtifactError(f"{reference}: the layer {title!r} would be written outside the model")
        found.append(Layer(title, size, digest))
    if not found:
        raise ArtifactError(f"{reference}: the manifest lists no files")
    roots = {PurePosixPath(layer.path).parts[0] for layer in found}
    one_file = len(found) == 1 and len(PurePosixPath(found[0].path).parts) == 1
    if not one_file and (len(roots) != 1 or any(len(PurePosixPath(x.path).parts) < 2 for x in found)):
        raise ArtifactError(f"{reference}: the files are neither one file nor one folder")
    return found


def store_digest(layers: list[Layer]) -> str:
    """The digest the store records for the model these layers make (agent/atomic.py content_sha256)."""
    hexes = [(PurePosixPath(layer.path), layer.digest.removeprefix("sha256:")) for layer in layers]
    if len(hexes) == 1 and len(hexes[0][0].parts) == 1:
        return hexes[0][1]
    return folder_digest(("/".join(path.parts[1:]), digest) for path, digest in hexes)


def sha256_digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"
