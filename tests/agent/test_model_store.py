"""The model store: bundled install, manifest, and crash safety."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.atomic import atomic_copy_with_sha256
from agent.models import BUNDLED_MODELS, ModelStore, ModelStoreError
from tests.bundled import smollm2_gguf

SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_bundled_model_installs_once_with_size_and_sha256(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    model, embeddings = store.ensure_bundled()
    assert model.id == "smollm2-135m-instruct"
    assert model.sha256 == SMOLLM2_SHA256
    assert model.size == smollm2_gguf().stat().st_size
    assert model.path.read_bytes()[:4] == b"GGUF"
    mtime = model.path.stat().st_mtime_ns
    assert store.ensure_bundled() == [model, embeddings]
    assert model.path.stat().st_mtime_ns == mtime  # not copied again
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["models"][0]["file"] == "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_truncated_model_file_is_copied_again(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    model, _ = store.ensure_bundled()
    with model.path.open("r+b") as handle:
        handle.truncate(1000)
    again, _ = store.ensure_bundled()
    assert again.path.stat().st_size == model.size
    assert again.sha256 == SMOLLM2_SHA256


def test_interrupted_copy_leaves_no_file_and_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        ModelStore(tmp_path).install_bundled(BUNDLED_MODELS[0])
    monkeypatch.undo()
    assert ModelStore(tmp_path).installed() == []
    assert list((tmp_path / "smollm2-135m-instruct").iterdir()) == []


def test_a_folder_model_is_copied_whole_and_atomically(tmp_path: Path) -> None:
    _, embeddings = ModelStore(tmp_path).ensure_bundled()
    assert embeddings.format == "safetensors" and embeddings.path.is_dir()
    assert (embeddings.path / "model.safetensors").stat().st_size > 90_000_000
    assert (embeddings.path / "tokenizer.json").is_file()
    assert [p.name for p in embeddings.path.parent.iterdir()] == ["model"]  # no temp folder left behind
    (embeddings.path / "tokenizer.json").unlink()  # a damaged folder is copied again
    _, again = ModelStore(tmp_path).ensure_bundled()
    assert (again.path / "tokenizer.json").is_file() and again.sha256 == embeddings.sha256


def test_unreadable_manifest_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"models": [{"id": ')
    with pytest.raises(ModelStoreError, match="unreadable"):
        ModelStore(tmp_path).installed()


def test_atomic_copy_reports_the_sha256_of_what_it_wrote(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.write_bytes(b"abc")
    digest = atomic_copy_with_sha256(source, tmp_path / "out" / "dst")
    assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert (tmp_path / "out" / "dst").read_bytes() == b"abc"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["dst"]
