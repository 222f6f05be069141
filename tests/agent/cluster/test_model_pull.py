"""Copying models between boxes' stores over the real peer API (mutual TLS): progress, resume, integrity."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from agent.cluster import pki
from agent.cluster.join import JoinGrant, JoinRequest
from agent.cluster.peer import build_peer_app, serve_peer_api
from agent.cluster.pki import ClusterCA, NodeKey, make_csr
from agent.models.bundled import BUNDLED_MODELS
from agent.models.pull import PullError, _to_thread_to_the_end, pull
from agent.models.store import ModelStore
from tests.bundled import smollm2_gguf

LOOPBACK = "127.0.0.1"
CHAT = "smollm2-135m-instruct"
EMBEDDING = "all-minilm-l6-v2"


class NoJoins:
    async def admit(self, request: JoinRequest) -> JoinGrant:
        raise AssertionError("not used here")


@pytest.fixture(scope="module")
def source_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("source") / "models")
    for bundled in BUNDLED_MODELS:
        store.install_bundled(bundled)
    return store


def _credentials(ca: ClusterCA, node_id: str) -> tuple[bytes, bytes]:
    key = NodeKey.create()
    return key, ca.issue(make_csr(key, node_id), node_id, [LOOPBACK], [])


@asynccontextmanager
async def source(store: ModelStore) -> AsyncIterator[tuple[str, aiohttp.ClientSession, list[str]]]:
    """The source box's peer API serving `store`, a member's session to it, and the Range headers it received."""
    ca = await asyncio.to_thread(ClusterCA.create, "stack-test")
    server_key, server_cert = await asyncio.to_thread(_credentials, ca, "box-a")
    client_key, client_cert = await asyncio.to_thread(_credentials, ca, "box-b")
    server = await asyncio.to_thread(
        pki.server_context_from_pem, ca.cert_pem, server_cert, server_key, require_client_cert=False
    )
    client = await asyncio.to_thread(pki.client_context_from_pem, ca.cert_pem, client_cert, client_key)
    app = build_peer_app(NoJoins(), ca.cert_pem, None, store)
    ranges: list[str] = []

    async def record(request: aiohttp.web.Request, response: aiohttp.web.StreamResponse) -> None:
        ranges.append(request.headers.get("Range", ""))

    app.on_response_prepare.append(record)
    async with (
        serve_peer_api(app, LOOPBACK, 0, server) as port,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client)) as session,
    ):
        yield f"https://{LOOPBACK}:{port}", session, ranges


@pytest.mark.allow_blocking("the test reads the stores (ModelStore.get) to check the copy; pull() stays checked")
async def test_a_model_is_copied_with_progress_and_listed_only_when_complete(
    source_store: ModelStore,
    tmp_path: Path,
) -> None:
    target = ModelStore(tmp_path / "models")
    seen: list[tuple[int, int]] = []
    async with source(source_store) as (url, session, _):
        installed = await pull(session, url, CHAT, target, lambda done, total: seen.append((done, total)))
    size = smollm2_gguf().stat().st_size
    assert seen[-1] == (size, size) and [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert installed.sha256 == hashlib.sha256(smollm2_gguf().read_bytes()).hexdigest()
    assert installed.path.read_bytes() == smollm2_gguf().read_bytes()
    assert target.get(CHAT) == installed
    assert not target.staging_dir(CHAT).exists()


@pytest.mark.allow_blocking("the test reads the stores (ModelStore.get) to check the copy; pull() stays checked")
async def test_a_folder_model_is_copied_and_verified(source_store: ModelStore, tmp_path: Path) -> None:
    target = ModelStore(tmp_path / "models")
    async with source(source_store) as (url, session, _):
        installed = await pull(session, url, EMBEDDING, target)
    original = source_store.get(EMBEDDING)
    assert original is not None and installed.sha256 == original.sha256
    assert sorted(p.name for p in installed.path.rglob("*")) == sorted(p.name for p in original.path.rglob("*"))


async def test_an_interrupted_copy_resumes_where_it_stopped(source_store: ModelStore, tmp_path: Path) -> None:
    target = ModelStore(tmp_path / "models")
    original = smollm2_gguf().read_bytes()
    staged = target.staging_dir(CHAT) / smollm2_gguf().name
    staged.parent.mkdir(parents=True)
    staged.write_bytes(original[:10_000_000])  # what a power cut left
    seen: list[int] = []
    async with source(source_store) as (url, session, ranges):
        installed = await pull(session, url, CHAT, target, lambda done, total: seen.append(done))
    assert "bytes=10000000-" in ranges  # only the rest was asked for
    assert seen[0] > 10_000_000
    assert installed.path.read_bytes() == original


@pytest.mark.allow_blocking("the test reads the stores (ModelStore.get) to check the copy; pull() stays checked")
async def test_a_copy_that_does_not_match_the_source_is_discarded(source_store: ModelStore, tmp_path: Path) -> None:
    target = ModelStore(tmp_path / "models")
    staged = target.staging_dir(CHAT) / smollm2_gguf().name
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"\0" * 1_000_000)  # a damaged partial copy: resuming it cannot give the right bytes
    async with source(source_store) as (url, session, _):
        with pytest.raises(PullError, match="does not match the source's sha256"):
            await pull(session, url, CHAT, target)
        assert target.get(CHAT) is None and not target.staging_dir(CHAT).exists()
        assert (await pull(session, url, CHAT, target)).path.read_bytes() == smollm2_gguf().read_bytes()


async def test_unknown_models_paths_outside_a_model_and_strangers_are_refused(source_store: ModelStore) -> None:
    async with source(source_store) as (url, session, _):
        with pytest.raises(PullError, match="refused to list 'nope'"):
            await pull(session, url, "nope", ModelStore(Path("/nonexistent")))
        async with session.get(f"{url}/cluster/models/{EMBEDDING}/files/../../manifest.json") as answer:
            assert answer.status == 404
        async with session.get(f"{url}/cluster/models/{EMBEDDING}/files/%2E%2E/%2E%2E/manifest.json") as answer:
            assert answer.status == 404
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as stranger,
            stranger.get(f"{url}/cluster/models/{CHAT}") as answer,
        ):
            assert answer.status == 401
            assert (await answer.json())["error"]["code"] == "client_certificate_required"


@pytest.mark.allow_blocking("the test's own threading.Event waits run in a thread")
async def test_a_cancelled_file_operation_of_a_pull_ends_before_the_cancellation_goes_on() -> None:
    """A pull cancelled mid-write (its cluster tasks restarting) must not leave a write running behind it: the
    pull started right after would append to a file still being written."""
    started, release, finished = threading.Event(), threading.Event(), []

    def slow_write() -> None:
        started.set()
        release.wait(30)
        finished.append(True)

    task = asyncio.ensure_future(_to_thread_to_the_end(slow_write))
    await asyncio.to_thread(started.wait, 30)
    task.cancel()
    await asyncio.sleep(0.1)  # a window in which the task must not end (nothing later could show that it did)
    assert not task.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished == [True]
