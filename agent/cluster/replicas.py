"""On every box: carry out this box's assignments and pull requests from etcd, and report how they go.

Assignments and pulls are read every half second (a plain read survives etcd client switches and re-forms that
a watch would have to be rebuilt for, and half a second is nothing next to loading a model). Each model's work runs
as its own task, so a long copy never holds up another model; its state goes into this box's node record
(`replicas`, `pulls`), which is how the leader, the API and `thox` see progress and errors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import aetcd
import aiohttp
import structlog

from agent.cluster.membership import RPC_TIMEOUT_SECONDS
from agent.cluster.net import host_port
from agent.cluster.placement import NodeRecords, my_work, pull_key
from agent.errors import ClusterUnavailableError
from agent.models.loader import ModelLoader, ModelLoadError
from agent.models.oci import pull as oci_pull
from agent.models.oci.artifact import ArtifactError, Reference
from agent.models.oci.client import NotInRegistryError, OciRegistry, RegistryError
from agent.models.pull import PullError, pull
from agent.models.store import ModelStoreError
from common.aio import wait_for

log = structlog.get_logger("agent.cluster.replicas")

POLL_SECONDS = 0.5
# A finished pull's outcome stays in the node record this long, for whoever asked for it to read.
PULL_OUTCOME_SECONDS = 60.0
# How long a copy waits for a live box holding the model before it fails (a start, a lost view, a busy holder).
SOURCE_WAIT_SECONDS = 10.0

Spawn = Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]


class ReplicaKeeper:
    """Brings this box's assigned models up (copying them first when needed) and takes unassigned ones down."""

    def __init__(
        self,
        node_id: str,
        loader: ModelLoader,
        live_nodes: Callable[[], NodeRecords],
        leader: Callable[[], str | None],
        session: Callable[[], aiohttp.ClientSession],
        spawn: Spawn,
        remote: OciRegistry,
    ) -> None:
        self.node_id = node_id
        self._remote = remote
        self._loader = loader
        self._live_nodes = live_nodes
        self._leader = leader
        self._session = session
        self._spawn = spawn
        self.replicas: dict[str, dict[str, Any]] = {}
        self.pulls: dict[str, dict[str, Any]] = {}
        self._work: dict[str, asyncio.Task[None]] = {}
        self._pulling: dict[str, asyncio.Task[None]] = {}
        self._assigned_at: dict[str, Any] = {}
        # One copy of a model at a time: an assignment and a pull request for it must not share a staging file.
        self._copying: dict[str, asyncio.Lock] = {}

    def report(self) -> dict[str, Any]:
        """This box's part of its node record."""
        now = time.time()
        self.pulls = {
            m: s
            for m, s in self.pulls.items()
            if s["state"] not in ("done", "failed") or now - s.get("finished", now) < PULL_OUTCOME_SECONDS
        }
        return {"replicas": dict(self.replicas), "pulls": dict(self.pulls)}

    async def run(self, client: aetcd.Client) -> None:
        try:
            while True:
                try:
                    assignments, pulls = await my_work(client, self.node_id)
                except (aetcd.exceptions.ClientError, TimeoutError) as exc:
                    log.info("assignments_unreadable", error=str(exc))  # keep serving what is loaded
                else:
                    await self._follow(assignments)
                    self._start_pulls(client, pulls)
                await asyncio.sleep(POLL_SECONDS)
        finally:
            for task in [*self._work.values(), *self._pulling.values()]:
                task.cancel()
            await asyncio.gather(*self._work.values(), *self._pulling.values(), return_exceptions=True)

    async def _follow(self, assignments: Mapping[str, Mapping[str, Any]]) -> None:
        for model in [m for m in self.replicas if m not in assignments]:
            task = self._work.pop(model, None)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            # Reported as unloading until its host stopped: the unload API answers once no box reports it.
            self.replicas[model] = {"state": "unloading"}
            await self._loader.unload(model)
            del self.replicas[model]
            self._assigned_at.pop(model, None)
        for model in set(self._loader.placed()) - set(assignments) - set(self.replicas):
            await self._loader.unload(model)  # placed by a cluster this box has since left (a keeper starts empty)
        for model, record in assignments.items():
            fresh = self._assigned_at.get(model) != record.get("assigned_at")  # a new assignment retries a failure
            running = model in self._work and not self._work[model].done()
            if running or (not fresh and model in self.replicas):
                continue
            self._assigned_at[model] = record.get("assigned_at")
            self.replicas[model] = {"state": "assigned"}
            context = record.get("context_length")
            self._work[model] = self._spawn(
                self._bring_up(model, context if isinstance(context, int) else None), f"replica:{model}"
            )

    async def _bring_up(self, model: str, context_length: int | None) -> None:
        state = self.replicas[model]
        try:
            if await asyncio.to_thread(self._loader.store.get, model) is None:
                state.update(state="pulling", progress=0.0)
                await self._copy(model, state)
            state.clear()
            state.update(state="loading")
            context = await self._loader.load(model, context_length)
            state.clear()
            state.update(state="ready", context_length=context)
        except (PullError, ModelLoadError, ModelStoreError, ClusterUnavailableError) as exc:
            state.clear()
            state.update(state="failed", error=str(exc))
            log.warning("replica_failed", model=model, error=str(exc))

    async def _copy(self, model: str, state: dict[str, Any]) -> None:
        """Pull `model` from the leader's store, another live box that has it, or the model registry (unless a copy
        that ran meanwhile already brought it: two requests for one model share one download)."""
        async with self._copying.setdefault(model, asyncio.Lock()):
            if await asyncio.to_thread(self._loader.store.get, model) is None:
                await self._copy_now(model, state)

    async def _copy_now(self, model: str, state: dict[str, Any]) -> None:
        """From a box of the stack when one has it (the LAN, and no registry needed), else from the registry."""

        def progress(done: int, total: int) -> None:
            state.update(progress=round(done / total, 4) if total else 1.0, completed=done, total=total)

        source = self._source(model)
        published = None if source is not None else await self._in_registry(model)
        if published is not None:
            async with self._remote.session() as session:
                await oci_pull.pull(self._remote, session, published, self._loader.store, progress)
        else:
            source = source or await self._wait_for_source(model)
            await pull(self._session(), source, model, self._loader.store, progress)
        await self._loader.refresh_store_facts()  # the others learn at once that this box has it now

    async def _in_registry(self, model: str) -> oci_pull.RemoteModel | None:
        """The registry's description of `model`, or None when the registry does not have it (or is down: then a
        box of the stack may still have it, and the wait for one says so)."""
        try:
            reference = Reference.parse(model)
            async with self._remote.session() as session:
                return await oci_pull.describe(self._remote, session, reference)
        except NotInRegistryError:
            return None
        except (RegistryError, ArtifactError) as exc:
            log.info("registry_not_used", model=model, error=str(exc))
            return None

    async def _wait_for_source(self, model: str) -> str:
        """A live box to copy `model` from, waiting a little for one: right after this agent starts (a restarted box
        taking up the pull it was killed in) or loses its node view, it sees no box at all for a moment."""
        deadline = time.monotonic() + SOURCE_WAIT_SECONDS
        while (source := self._source(model)) is None:
            if time.monotonic() >= deadline:
                raise PullError(
                    f"neither the model registry at {self._remote.url} nor another live box has {model!r} to "
                    f"copy it from (waited {SOURCE_WAIT_SECONDS:.0f} s for a box)"
                )
            await asyncio.sleep(POLL_SECONDS)
        return source

    def _source(self, model: str) -> str | None:
        nodes = self._live_nodes()
        holders = [
            node_id
            for node_id, node in nodes.items()
            if node_id != self.node_id and model in (node.get("store") or {}) and node.get("peer_port")
        ]
        if not holders:
            return None
        leader = self._leader()
        chosen = nodes[leader if leader in holders else sorted(holders)[0]]
        return f"https://{host_port(str(chosen['address']), int(chosen['peer_port']))}"

    def _start_pulls(self, client: aetcd.Client, pulls: Mapping[str, Mapping[str, Any]]) -> None:
        for model, request in pulls.items():
            # When the latest request was made (on the clock of the box that took it): the API answers a request
            # with an outcome only if it comes from that request or a later one, so a retry is never told the
            # failure of the attempt before it.
            asked = request.get("at")
            requested_at = float(asked) if isinstance(asked, (int, float)) else None
            if model in self._pulling and not self._pulling[model].done():
                if requested_at is not None:
                    self.pulls[model]["requested_at"] = requested_at  # the running copy answers this one too
                continue
            self.pulls[model] = {
                "state": "pulling",
                "progress": 0.0,
                **({"requested_at": requested_at} if requested_at is not None else {}),
            }
            self._pulling[model] = self._spawn(self._pull(client, model), f"pull:{model}")

    async def _pull(self, client: aetcd.Client, model: str) -> None:
        state = self.pulls[model]
        try:
            await self._copy(model, state)
            state.update(state="done", progress=1.0)
        except (PullError, ModelStoreError, ClusterUnavailableError) as exc:
            state.update(state="failed", error=str(exc))
            log.warning("model_pull_failed", model=model, error=str(exc))
        state["finished"] = time.time()
        try:
            await wait_for(client.delete(pull_key(self.node_id, model)), RPC_TIMEOUT_SECONDS)
        except (aetcd.exceptions.ClientError, TimeoutError) as exc:
            log.info("pull_request_not_cleared", model=model, error=str(exc))
