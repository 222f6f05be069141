"""The placement rules on their own: memory estimates, the too-large refusal, and which boxes take a replica."""

from __future__ import annotations

from typing import Any

import pytest

from agent.cluster.placement import PlacementRefused, PlacementSpec, candidates, check_fits, view
from agent.models.residency import model_bytes

KV_BUDGET = 16384
SMALL = {"size": 100_000_000, "chat": True, "kv_bytes_per_token": 46080}  # about 0.855 GB with a full KV budget
NEEDED = model_bytes(SMALL, KV_BUDGET)


def box(memory_gb: float, *, store: dict[str, Any] | None = None, models: list[str] | None = None) -> dict[str, Any]:
    return {"model_memory_gb": memory_gb, "store": store or {}, "models": models or []}


def test_the_estimate_is_weights_plus_a_full_kv_budget() -> None:
    assert NEEDED == 100_000_000 + 46080 * KV_BUDGET


def test_a_model_larger_than_every_single_box_is_refused_with_the_figures() -> None:
    nodes = {"a": box(0.5, store={"m": SMALL}), "b": box(0.6)}
    with pytest.raises(PlacementRefused) as refused:
        check_fits(nodes, "m", KV_BUDGET)
    assert refused.value.code == "model_too_large" and "0.60 GB" in refused.value.message
    # Pooled, the two boxes would hold it: that is not how a model runs here, and the refusal says so.
    assert "pooling memory across boxes is not supported yet" in refused.value.message
    assert check_fits({"a": box(1.0, store={"m": SMALL})}, "m", KV_BUDGET) == NEEDED


def test_boxes_holding_the_file_come_first_then_the_least_loaded() -> None:
    nodes = {"a": box(8, models=["x", "y"]), "b": box(8, store={"m": SMALL}, models=["x", "y"]), "c": box(8)}
    assert candidates(PlacementSpec("m", 3), NEEDED, {}, nodes, KV_BUDGET) == ["b", "c", "a"]


def test_assignments_not_yet_loaded_count_against_a_box_and_pinned_nodes_are_respected() -> None:
    nodes = {"a": box(1.0, store={"m": SMALL, "n": SMALL}), "b": box(4.0, store={"m": SMALL, "n": SMALL})}
    # box a already has model n assigned: with about 0.86 GB each, it has no room for m.
    assert candidates(PlacementSpec("m", 1), NEEDED, {"n": {"a": {}}}, nodes, KV_BUDGET) == ["b"]
    assert candidates(PlacementSpec("m", 1, nodes=("a",)), NEEDED, {"n": {"a": {}}}, nodes, KV_BUDGET) == []


def test_the_view_says_why_replicas_are_missing() -> None:
    nodes = {"a": box(1.0, store={"m": SMALL}, models=["m"]), "b": box(0.9, models=["d"], store={"d": SMALL})}
    placed = view(PlacementSpec("m", 2), {"m": {"a": {}}}, nodes, KV_BUDGET)
    assert placed["status"] == "placing" and placed["replicas"] == [{"node": "a", "state": "ready"}]
    assert placed["waiting"] == "1 more replica(s) wanted, but no live box without one has 0.85 GB free for it"
