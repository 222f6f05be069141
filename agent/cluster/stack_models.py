"""Models across the stack, as the cluster API asks for them: placement requests (load, unload), their state, pulls
between boxes, and the loop by which the leader turns requests into assignments (agent/cluster/placement.py).

Requests are written to etcd and acted on by whichever box leads; each box's ReplicaKeeper (replicas.py) then
loads, unloads or pulls what is assigned to it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

import aetcd
import structlog

from agent.cluster.membership import RPC_TIMEOUT_SECONDS, LeaderElection
from agent.cluster.placement import (
    PLACEMENT_PREFIX,
    ClusterPlacement,
    PlacementRefused,
    PlacementSpec,
    Placer,
    assignment_key,
    check_fits,
    model_facts,
    pull_key,
    replica_state,
    view,
)
from agent.cluster.views import ClusterUnavailable, Connected
from agent.models.oci import pull as oci_pull
from agent.models.oci.artifact import ArtifactError, Reference
from agent.models.oci.client import OciRegistry, RegistryError
from common.aio import wait_for

log = structlog.get_logger("agent.cluster")

PLACEMENT_CHECK_SECONDS = 1.0


def _unwritable(what: str, exc: BaseException) -> ClusterUnavailable:
    return ClusterUnavailable(f"{what} (no quorum reachable?): {exc}")


class StackModels:
    """Placement requests and pulls for the whole stack; `connected()` raises ClusterUnavailable when not running."""

    def __init__(
        self, connected: Callable[[], Awaitable[Connected]], kv_budget_tokens: int, remote: OciRegistry
    ) -> None:
        self._connected = connected
        self._kv_budget = kv_budget_tokens
        self.remote = remote
        self.last_leader: str | None = None  # as last read by the placement loop (pull sources prefer it)

    async def load(self, spec: PlacementSpec) -> dict[str, Any]:
        """Ask for `spec` (replaces an earlier request for the model; failed replicas are tried again)."""
        connected = await self._connected()
        nodes = await connected.live_records()
        _check_targets(spec, nodes)
        if model_facts(nodes, spec.model) is None:  # no box has it: the registry must, and its card says the size
            published = await self._published(spec.model)
            spec = replace(spec, facts=published.placement_facts())
        check_fits(nodes, spec.model, self._kv_budget, spec.facts)
        client = connected.client
        try:
            current = await ClusterPlacement.read(client)
            for node_id in current.assignments.get(spec.model, {}):  # asking again retries failed replicas
                if replica_state(nodes, node_id, spec.model).get("state") == "failed":
                    await wait_for(client.delete(assignment_key(node_id, spec.model)), RPC_TIMEOUT_SECONDS)
            await wait_for(client.put(PLACEMENT_PREFIX + spec.model.encode(), spec.to_json()), RPC_TIMEOUT_SECONDS)
        except (aetcd.exceptions.ClientError, TimeoutError) as exc:
            raise _unwritable("the placement could not be written", exc) from exc
        log.info("model_placement_requested", model=spec.model, replicas=spec.replicas, nodes=list(spec.nodes))
        return await self.placement(spec.model)

    async def unload(self, model: str) -> dict[str, Any]:
        """Withdraw the request for `model`: the leader unassigns it and its boxes unload it."""
        client = (await self._connected()).client
        try:
            deleted = await wait_for(client.delete(PLACEMENT_PREFIX + model.encode()), RPC_TIMEOUT_SECONDS)
        except (aetcd.exceptions.ClientError, TimeoutError) as exc:
            raise _unwritable("the placement could not be removed", exc) from exc
        if not deleted:
            raise PlacementRefused(
                f"{model!r} is not placed in this cluster (a box's default model stays loaded there)",
                code="model_not_placed",
                status=404,
            )
        log.info("model_unload_requested", model=model)
        return {"model": model, "status": "unloading"}

    async def placement(self, model: str | None = None) -> dict[str, Any]:
        """Placement requests with each replica's state (all models, or one)."""
        connected = await self._connected()
        nodes = await connected.live_records()
        try:
            current = await ClusterPlacement.read(connected.client)
        except (aetcd.exceptions.ClientError, TimeoutError) as exc:
            raise ClusterUnavailable(f"cluster state cannot be read (no quorum reachable?): {exc}") from exc
        if model is not None:
            spec = current.specs.get(model)
            if spec is None:
                raise PlacementRefused(f"{model!r} is not placed in this cluster", code="model_not_placed", status=404)
            return view(spec, current.assignments, nodes, self._kv_budget)
        return {
            "object": "list",
            "data": [
                view(spec, current.assignments, nodes, self._kv_budget)
                for spec in sorted(current.specs.values(), key=lambda s: s.model)
            ],
        }

    async def _published(self, model: str) -> oci_pull.RemoteModel:
        """The registry's `model`; PlacementRefused when it lacks it (404 naming what it has, 503 naming its URL)."""
        try:
            reference = Reference.parse(model)
            async with self.remote.session() as session:
                return await oci_pull.describe(self.remote, session, reference)
        except ArtifactError as exc:
            raise PlacementRefused(exc.args[0], code="invalid_model", status=400) from exc
        except RegistryError as exc:
            raise PlacementRefused(
                f"no box of this cluster has {model!r} in its model store, and {exc}", code=exc.code, status=exc.status
            ) from exc

    async def remote_models(self) -> list[dict[str, Any]]:
        """The registry's models and tags with size and card facts; PlacementRefused when it cannot be read."""
        try:
            async with self.remote.session() as session:
                return await oci_pull.remote_catalog(self.remote, session)
        except RegistryError as exc:
            raise PlacementRefused(str(exc), code=exc.code, status=exc.status) from exc

    async def request_pull(self, model: str, targets: list[str] | None) -> list[str]:
        """Ask boxes (named, else every live box without it) to copy `model` into their stores; returns them.

        A box copies from another box that has the model, else from the model registry."""
        connected = await self._connected()
        nodes = await connected.live_records()
        if not any(model in (n.get("store") or {}) for n in nodes.values()):
            await self._published(model)  # no box has it: the registry must
        _check_live(targets or (), nodes)
        lacking = [node_id for node_id, record in nodes.items() if model not in (record.get("store") or {})]
        chosen = sorted(targets or lacking)
        try:
            for node_id in chosen:
                request = json.dumps({"at": time.time()}).encode()
                await wait_for(connected.client.put(pull_key(node_id, model), request), RPC_TIMEOUT_SECONDS)
        except (aetcd.exceptions.ClientError, TimeoutError) as exc:
            raise _unwritable("the pull could not be requested", exc) from exc
        log.info("model_pull_requested", model=model, nodes=chosen)
        return chosen

    async def place(
        self,
        client: aetcd.Client,
        election: Callable[[], LeaderElection | None],
        live_nodes: Callable[[], Mapping[str, dict[str, Any]]],
    ) -> None:
        """Every second: learn the leader; on the leader, make the assignments match the requests and live boxes."""
        placer = Placer(client, self._kv_budget)
        while True:
            await asyncio.sleep(PLACEMENT_CHECK_SECONDS)
            campaign = election()
            if campaign is None:
                continue
            try:
                self.last_leader = await campaign.current_leader()
                if campaign.is_leader:
                    await placer.reconcile(dict(live_nodes()))
            except (aetcd.exceptions.ClientError, TimeoutError) as exc:
                log.info("placement_check_failed", error=str(exc))


def _check_live(node_ids: tuple[str, ...] | list[str], nodes: Mapping[str, Any]) -> None:
    unknown = sorted(set(node_ids) - set(nodes))
    if unknown:
        raise PlacementRefused(
            f"not live boxes of this cluster: {', '.join(unknown)}", code="node_not_found", status=404
        )


def _check_targets(spec: PlacementSpec, nodes: Mapping[str, Any]) -> None:
    _check_live(spec.nodes, nodes)
    if spec.nodes and spec.replicas > len(spec.nodes):
        raise PlacementRefused(
            f"{spec.replicas} replicas cannot fit on the {len(spec.nodes)} box(es) named", code="invalid_value"
        )
    if spec.replicas > len(nodes):
        raise PlacementRefused(
            f"{spec.replicas} replicas need as many boxes; {len(nodes)} are live (one replica per box)",
            code="invalid_value",
        )
