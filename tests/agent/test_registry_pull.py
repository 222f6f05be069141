"""Pulling models from a real OCI registry (docker-registry) into a store, in process: verified by digest, resumed
after a cut, refused with the names that exist, and one download for two requests of the same model."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import structlog

from agent.cluster.replicas import ReplicaKeeper
from agent.models.loader import ModelLoader
from agent.models.oci import pull as oci_pull
from agent.models.oci.artifact import Reference
from agent.models.oci.client import NotInRegistryError, OciRegistry, RegistryUnreachableError
from agent.models.pull import PullError
from agent.models.store import ModelStore
from tests.agent_process import free_port
from tests.bundled import smollm2_gguf
from tests.model_registry import blob_file, model_registry, needs_registry, publish

pytestmark = needs_registry

MODEL = "tiny-chat:v1"


@pytest.fixture(scope="module")
def registry_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with model_registry(tmp_path_factory.mktemp("registry")) as url:
        publish(url, MODEL)
        yield url


def gguf_sha256() -> str:
    return hashlib.sha256(smollm2_gguf().read_bytes()).hexdigest()


async def pull_into(store: ModelStore, url: str, reference: str, progress: list[tuple[int, int]] | None = None) -> Any:
    registry = OciRegistry(url)
    async with registry.session() as session:
        found = await oci_pull.describe(registry, session, Reference.parse(reference))
        record = None if progress is None else (lambda done, total: progress.append((done, total)))
        return await oci_pull.pull(registry, session, found, store, record)


async def test_a_pulled_model_is_the_published_file_with_its_card(registry_url: str, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    progress: list[tuple[int, int]] = []
    installed = await pull_into(store, registry_url, MODEL, progress)
    size = smollm2_gguf().stat().st_size
    assert installed.id == MODEL and installed.sha256 == gguf_sha256() and installed.size == size
    assert installed.path.read_bytes() == smollm2_gguf().read_bytes()
    assert installed.quantization == "Q4_1" and {"chat.completions", "tools", "json"} <= set(installed.capabilities)
    assert installed.chat_template == "chatml" and installed.sampling_defaults == {"temperature": 0.2, "top_p": 0.9}
    assert progress[-1] == (size, size) and [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert (await asyncio.to_thread(store.get, MODEL)) == installed
    assert not store.staging_dir(MODEL).exists()


async def test_unknown_names_and_tags_are_refused_with_what_exists(registry_url: str, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    with pytest.raises(NotInRegistryError, match=r"no model 'nope'; its models: tiny-chat"):
        await pull_into(store, registry_url, "nope")
    with pytest.raises(NotInRegistryError, match=r"no tag 'v9' of tiny-chat; its tags: v1"):
        await pull_into(store, registry_url, "tiny-chat:v9")
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RegistryUnreachableError, match=f"the model registry at {down} is unreachable"):
        await pull_into(store, down, MODEL)
    assert await asyncio.to_thread(store.installed) == []


async def test_a_cut_pull_resumes_from_the_bytes_it_had(registry_url: str, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    size = smollm2_gguf().stat().st_size
    staged = store.staging_dir(MODEL) / smollm2_gguf().name
    cut = asyncio.Event()

    def progress(done: int, _: int) -> None:
        if done > size // 3:
            cut.set()

    registry = OciRegistry(registry_url)
    async with registry.session() as session:
        found = await oci_pull.describe(registry, session, Reference.parse(MODEL))
        first = asyncio.create_task(oci_pull.pull(registry, session, found, store, progress))
        await cut.wait()
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
    had = staged.stat().st_size
    assert 0 < had < size and await asyncio.to_thread(store.get, MODEL) is None  # a partial copy, not listed
    with structlog.testing.capture_logs() as logs:
        installed = await pull_into(store, registry_url, MODEL)
    assert [(e["from_bytes"], e["size"]) for e in logs if e["event"] == "model_pull_resumed"] == [(had, size)]
    assert installed.sha256 == gguf_sha256() and installed.path.read_bytes() == smollm2_gguf().read_bytes()


@pytest.fixture
def corrupted_registry(tmp_path: Path) -> Iterator[str]:
    """A registry of its own whose disk flipped bytes in the model's blob (it keeps its size)."""
    with model_registry(tmp_path / "registry") as url:
        publish(url, MODEL)
        blob = blob_file(tmp_path / "registry", f"sha256:{gguf_sha256()}")
        with blob.open("r+b") as handle:
            handle.seek(blob.stat().st_size // 2)
            handle.write(b"\x00corrupted\x00")
        yield url


async def test_a_corrupted_blob_is_refused_and_nothing_is_installed(corrupted_registry: str, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    with pytest.raises(PullError, match="does not match the source's sha256"):
        await pull_into(store, corrupted_registry, MODEL)
    assert await asyncio.to_thread(store.installed) == []
    assert not store.staging_dir(MODEL).exists() and not (store.root / MODEL).exists()


class StoreOnly:
    """The part of ModelLoader a copy uses."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store

    async def refresh_store_facts(self) -> None:
        return None


async def test_two_requests_for_one_model_share_one_download(registry_url: str, tmp_path: Path) -> None:
    loader = StoreOnly(ModelStore(tmp_path / "models"))
    keeper = ReplicaKeeper(
        "box-a",
        cast(ModelLoader, loader),
        dict,  # no other box: the registry is the only source
        lambda: None,
        lambda: pytest.fail("no box should be asked"),
        lambda work, name: asyncio.create_task(work, name=name),
        OciRegistry(registry_url),
    )
    states: list[dict[str, Any]] = [{}, {}]
    with structlog.testing.capture_logs() as logs:
        await asyncio.gather(*(keeper._copy(MODEL, state) for state in states))
    assert [e["model"] for e in logs if e["event"] == "model_pulled"] == [MODEL]
    installed = await asyncio.to_thread(loader.store.get, MODEL)
    assert installed is not None and installed.sha256 == gguf_sha256()
