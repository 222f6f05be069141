"""Model placement: which boxes serve which model, decided by the leader, kept in etcd, carried out by each box.

Keys (all soft state: a re-formed cluster may lose the last writes and simply places again):

- `/thox/placement/<model>`: what an operator asked for (`PlacementSpec`: replicas, context length, pinned nodes).
- `/thox/assignments/<node>/<model>`: the leader's decision that `<node>` serves `<model>`.
- `/thox/pulls/<node>/<model>`: a request that `<node>` copies `<model>` into its store (POST /v1/models/pull).

Each box publishes in its node record what it has (`store`: model sizes and KV cost), what it offers
(`model_memory_gb`) and how its assignments and pulls are going (`replicas`, `pulls`: state, progress, error).

The leader reconciles once a second: assignments on boxes whose lease expired are dropped and given to other live
boxes (re-placement needs no operator), a failed replica does not count and another box is tried, surplus
replicas are removed, and assignments of models nobody asks for any more are deleted (the boxes unload them).
A box is a candidate when the model fits in what it offers beside what it already serves; boxes that already hold
the file come first (no copy), then the least loaded. The memory a model needs is estimated as its weights plus a
full KV budget; a model larger than every single box is refused up front (pooling memory is a later issue).
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import aetcd
import structlog

from agent.cluster.membership import RPC_TIMEOUT_SECONDS
from agent.errors import ThoxError
from agent.models.residency import model_bytes
from common.aio import wait_for

log = structlog.get_logger("agent.cluster.placement")

PLACEMENT_PREFIX = b"/thox/placement/"
ASSIGNMENTS_PREFIX = b"/thox/assignments/"
PULLS_PREFIX = b"/thox/pulls/"

NodeRecords = Mapping[str, Mapping[str, Any]]


class PlacementRefused(ThoxError):
    """A placement request that cannot be met (unknown model, too large for any box, ...)."""

    def __init__(self, message: str, *, code: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


@dataclass(frozen=True)
class PlacementSpec:
    """An operator's request: serve `model` on `replicas` boxes (only on `nodes` when given)."""

    model: str
    replicas: int = 1
    context_length: int | None = None
    nodes: tuple[str, ...] = ()
    requested_at: float = field(default_factory=time.time)
    # Size, chat or not, KV cost: from the model registry's card, for a model no box's store has yet.
    facts: Mapping[str, Any] | None = None

    def to_json(self) -> bytes:
        record = asdict(self)
        record["nodes"] = list(self.nodes)
        record["facts"] = dict(self.facts) if self.facts is not None else None
        return json.dumps(record).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> PlacementSpec:
        record = json.loads(raw)
        return cls(
            model=str(record["model"]),
            replicas=int(record["replicas"]),
            context_length=record.get("context_length"),
            nodes=tuple(record.get("nodes") or ()),
            requested_at=float(record.get("requested_at") or 0),
            facts=record.get("facts") if isinstance(record.get("facts"), dict) else None,
        )


def capacity_bytes(node: Mapping[str, Any]) -> int:
    return int(float(node.get("model_memory_gb") or 0) * 1e9)


def model_facts(nodes: NodeRecords, model: str) -> Mapping[str, Any] | None:
    """What the live boxes' stores say about `model` (size, KV cost, chat or not), from any box holding it."""
    for node in nodes.values():
        facts = (node.get("store") or {}).get(model)
        if isinstance(facts, Mapping):
            return facts
    return None


def used_bytes(node: Mapping[str, Any], kv_budget_tokens: int, extra: Collection[str] = ()) -> int:
    """What the models a box serves (and those assigned to it but not served yet) take of its memory."""
    store = node.get("store") or {}
    served = set(node.get("models") or []) | set(extra)
    return sum(model_bytes(store.get(m) or {}, kv_budget_tokens) for m in served)


def check_fits(
    nodes: NodeRecords, model: str, kv_budget_tokens: int, published: Mapping[str, Any] | None = None
) -> int:
    """The model's estimated memory (from a box's store, else from its `published` card); PlacementRefused when it
    is unknown, not a chat model, or too large."""
    facts = model_facts(nodes, model) or published
    if facts is None:
        raise PlacementRefused(
            f"no box of this cluster has {model!r} in its model store; install it on one box "
            "(its file is then copied to the others as needed)",
            code="model_not_found",
            status=404,
        )
    if not facts.get("chat"):
        raise PlacementRefused(
            f"{model!r} is not a chat model; embedding models are served where installed", code="model_not_supported"
        )
    needed = model_bytes(facts, kv_budget_tokens)
    largest = max((capacity_bytes(n) for n in nodes.values()), default=0)
    if needed > largest:
        raise PlacementRefused(
            f"{model!r} needs about {needed / 1e9:.2f} GB (weights plus KV cache) and the largest box offers "
            f"{largest / 1e9:.2f} GB; no single box can hold it (pooling memory across boxes is not supported yet)",
            code="model_too_large",
        )
    return needed


@dataclass
class ClusterPlacement:
    """The placement state read from etcd in one pass."""

    specs: dict[str, PlacementSpec]
    assignments: dict[str, dict[str, Mapping[str, Any]]]  # model -> node -> assignment record

    @classmethod
    async def read(cls, client: aetcd.Client) -> ClusterPlacement:
        specs: dict[str, PlacementSpec] = {}
        for kv in await wait_for(client.get_prefix(PLACEMENT_PREFIX), RPC_TIMEOUT_SECONDS):
            try:
                spec = PlacementSpec.from_json(kv.value)
            except (ValueError, KeyError, TypeError):
                log.warning("placement_record_unreadable", key=kv.key.decode(errors="replace"))
                continue
            specs[spec.model] = spec
        assignments: dict[str, dict[str, Mapping[str, Any]]] = {}
        for kv in await wait_for(client.get_prefix(ASSIGNMENTS_PREFIX), RPC_TIMEOUT_SECONDS):
            node, _, model = kv.key[len(ASSIGNMENTS_PREFIX) :].decode().partition("/")
            try:
                record = json.loads(kv.value)
            except ValueError:
                record = {}
            assignments.setdefault(model, {})[node] = record if isinstance(record, dict) else {}
        return cls(specs, assignments)


def replica_state(nodes: NodeRecords, node_id: str, model: str) -> Mapping[str, Any]:
    """How `node_id` reports its replica of `model` ("assigned" until it says more)."""
    node = nodes.get(node_id)
    if node is None:
        return {"state": "lost"}
    state = (node.get("replicas") or {}).get(model)
    if isinstance(state, Mapping):
        return state
    if model in (node.get("models") or []):
        return {"state": "ready"}
    return {"state": "assigned"}


def assignment_key(node: str, model: str) -> bytes:
    return ASSIGNMENTS_PREFIX + f"{node}/{model}".encode()


def candidates(
    spec: PlacementSpec,
    needed: int,
    everything: Mapping[str, Mapping[str, Any]],
    nodes: NodeRecords,
    kv_budget_tokens: int,
) -> list[str]:
    """Boxes that could take another replica of `spec.model`, best first: it fits beside what they serve and are
    assigned, boxes already holding the file first (no copy), then the least loaded, then the most free memory."""
    assigned = everything.get(spec.model, {})
    ranked = []
    for node_id, node in nodes.items():
        if node_id in assigned or (spec.nodes and node_id not in spec.nodes):
            continue
        pending = {model for model, on in everything.items() if node_id in on}
        free = capacity_bytes(node) - used_bytes(node, kv_budget_tokens, pending)
        if needed <= free:
            has_file = spec.model in (node.get("store") or {})
            ranked.append((not has_file, len(node.get("models") or []), -free, node_id))
    return [node_id for *_, node_id in sorted(ranked)]


class Placer:
    """On the leader: makes the assignments match the specs and the live boxes."""

    def __init__(self, client: aetcd.Client, kv_budget_tokens: int) -> None:
        self._client = client
        self._kv_budget_tokens = kv_budget_tokens

    async def reconcile(self, nodes: NodeRecords) -> None:
        state = await ClusterPlacement.read(self._client)
        for model, assigned in state.assignments.items():
            spec = state.specs.get(model)
            for node_id in list(assigned):
                if spec is None:
                    await self._delete(node_id, model, "unloaded")
                    del assigned[node_id]
                elif node_id not in nodes:
                    await self._delete(node_id, model, "node_lost")
                    del assigned[node_id]
        for model, spec in state.specs.items():
            # setdefault: assignments made for one model count against the boxes' memory for the next.
            await self._place(spec, state.assignments.setdefault(model, {}), state.assignments, nodes)

    async def _place(
        self,
        spec: PlacementSpec,
        assigned: dict[str, Mapping[str, Any]],
        everything: Mapping[str, Mapping[str, Mapping[str, Any]]],
        nodes: NodeRecords,
    ) -> None:
        working = [n for n in assigned if replica_state(nodes, n, spec.model).get("state") != "failed"]
        if len(working) > spec.replicas:  # fewer wanted now: drop the replicas furthest from ready first
            ready_last = sorted(working, key=lambda n: (replica_state(nodes, n, spec.model).get("state") == "ready", n))
            for node_id in ready_last[: len(working) - spec.replicas]:
                await self._delete(node_id, spec.model, "surplus")
            return
        need = spec.replicas - len(working)
        facts = model_facts(nodes, spec.model) or spec.facts
        if facts is None or need == 0:
            return
        for node_id in candidates(
            spec, model_bytes(facts, self._kv_budget_tokens), everything, nodes, self._kv_budget_tokens
        )[:need]:
            record = {"context_length": spec.context_length, "assigned_at": round(time.time(), 3)}
            await wait_for(
                self._client.put(assignment_key(node_id, spec.model), json.dumps(record).encode()), RPC_TIMEOUT_SECONDS
            )
            assigned[node_id] = record
            log.info("replica_assigned", model=spec.model, node=node_id)

    async def _delete(self, node_id: str, model: str, reason: str) -> None:
        await wait_for(self._client.delete(assignment_key(node_id, model)), RPC_TIMEOUT_SECONDS)
        log.info("replica_unassigned", model=model, node=node_id, reason=reason)


async def my_work(
    client: aetcd.Client, node_id: str
) -> tuple[dict[str, Mapping[str, Any]], dict[str, Mapping[str, Any]]]:
    """This box's assignments and requested pulls (model -> record: a pull's holds `at`, when it was asked)."""
    return await _records(client, ASSIGNMENTS_PREFIX, node_id), await _records(client, PULLS_PREFIX, node_id)


async def _records(client: aetcd.Client, prefix: bytes, node_id: str) -> dict[str, Mapping[str, Any]]:
    mine = prefix + f"{node_id}/".encode()
    records: dict[str, Mapping[str, Any]] = {}
    for kv in await wait_for(client.get_prefix(mine), RPC_TIMEOUT_SECONDS):
        try:
            record = json.loads(kv.value)
        except ValueError:
            record = {}
        records[kv.key[len(mine) :].decode()] = record if isinstance(record, dict) else {}
    return records


def pull_key(node: str, model: str) -> bytes:
    return PULLS_PREFIX + f"{node}/{model}".encode()


def view(
    spec: PlacementSpec,
    everything: Mapping[str, Mapping[str, Mapping[str, Any]]],
    nodes: NodeRecords,
    kv_budget_tokens: int,
) -> dict[str, Any]:
    """One model's placement as the API shows it: the request, each replica's state, an overall status, and why
    replicas are missing when no box can take them."""
    assigned = everything.get(spec.model, {})
    replicas = [{"node": node_id, **replica_state(nodes, node_id, spec.model)} for node_id in sorted(assigned)]
    ready = sum(r["state"] == "ready" for r in replicas)
    if ready >= spec.replicas:
        status = "ready"
    elif replicas and all(r["state"] == "failed" for r in replicas):
        status = "failed"
    else:
        status = "placing"
    placed = {
        "model": spec.model,
        "status": status,
        "replicas_wanted": spec.replicas,
        "replicas_ready": ready,
        "context_length": spec.context_length,
        "nodes": list(spec.nodes) or None,
        "replicas": replicas,
    }
    working = sum(r["state"] != "failed" for r in replicas)
    facts = model_facts(nodes, spec.model)
    if working < spec.replicas and facts is not None:
        needed = model_bytes(facts, kv_budget_tokens)
        if not candidates(spec, needed, everything, nodes, kv_budget_tokens):
            which = "named" if spec.nodes else "live"
            placed["waiting"] = (
                f"{spec.replicas - working} more replica(s) wanted, but no {which} box without one "
                f"has {needed / 1e9:.2f} GB free for it"
            )
    return placed
