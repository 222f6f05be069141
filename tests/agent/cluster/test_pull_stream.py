"""The pull stream's per-box lines (agent/api/cluster/models.py), from node records as boxes publish them."""

from __future__ import annotations

from typing import Any

from agent.api.cluster.models import pull_lines

MODEL = "coder"
SIZE = 94_000_000
SINCE = 1000.0


def record(store: bool, pull: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "store": {MODEL: {"size": SIZE, "chat": True}} if store else {},
        "pulls": {MODEL: pull} if pull is not None else {},
    }


def lines(
    nodes: dict[str, dict[str, Any]], earlier: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    return pull_lines({"source": record(store=True), **nodes}, MODEL, sorted(nodes), SINCE, earlier or {})


def test_every_line_carries_the_byte_counts() -> None:
    found = lines(
        {
            "queued": record(False),
            "starting": record(False, {"state": "pulling", "progress": 0.0}),
            "half": record(False, {"state": "pulling", "completed": SIZE // 2, "total": SIZE}),
            "failed": record(
                False, {"state": "failed", "error": "disk full", "finished": SINCE + 5, "completed": 10, "total": SIZE}
            ),
        }
    )
    assert found["queued"] == {
        "status": "queued",
        "model": MODEL,
        "node": "queued",
        "completed": 0,
        "total": SIZE,
        "progress": 0.0,
    }
    assert found["starting"]["completed"] == 0 and found["starting"]["total"] == SIZE
    assert found["half"]["completed"] == SIZE // 2 and found["half"]["progress"] == 0.5
    assert found["failed"] == {
        "status": "failed",
        "model": MODEL,
        "node": "failed",
        "completed": 10,
        "total": SIZE,
        "progress": 0.0,
        "error": "disk full",
    }


def test_a_box_whose_pull_record_is_gone_but_holds_the_model_is_done_with_every_byte() -> None:
    # The flaky case: the box's published pull state had been pruned (or its copy had been made by an assignment
    # meanwhile) while its store lists the model; the done line lacked "completed".
    found = lines({"box-c": record(True)})
    assert found["box-c"] == {
        "status": "done",
        "model": MODEL,
        "node": "box-c",
        "completed": SIZE,
        "total": SIZE,
        "progress": 1.0,
    }
    done_earlier = record(True, {"state": "done", "progress": 1.0, "finished": SINCE - 30})
    assert lines({"box-c": done_earlier})["box-c"]["completed"] == SIZE


def test_a_done_state_without_counts_still_says_every_byte() -> None:
    # A copy skipped because another one had just brought the model reports done without ever counting bytes.
    found = lines({"box-c": record(True, {"state": "done", "progress": 1.0, "finished": SINCE + 1})})
    assert found["box-c"]["status"] == "done" and found["box-c"]["completed"] == SIZE == found["box-c"]["total"]


def test_counts_never_go_back_and_a_box_that_left_fails_with_what_it_had() -> None:
    earlier = lines({"box-c": record(False, {"state": "pulling", "completed": 60_000_000, "total": SIZE})})
    older_record = record(False, {"state": "pulling", "completed": 20_000_000, "total": SIZE})
    assert lines({"box-c": older_record}, earlier)["box-c"]["completed"] == 60_000_000
    gone = pull_lines({"source": record(True)}, MODEL, ["box-c"], SINCE, earlier)
    assert gone["box-c"]["status"] == "failed" and gone["box-c"]["completed"] == 60_000_000
    assert gone["box-c"]["error"] == "box-c left the cluster"


def test_a_retry_is_not_answered_with_the_outcome_of_the_request_before_it() -> None:
    # The box has not picked the retry up yet: its record still shows the failure of the request made a moment
    # before (finished within the second's allowance of the old rule), which is not this request's answer.
    stale = record(False, {"state": "failed", "error": "no space", "requested_at": SINCE - 0.5, "finished": SINCE})
    assert lines({"box-c": stale})["box-c"]["status"] == "queued"
    answered = record(
        False, {"state": "failed", "error": "no space", "requested_at": SINCE + 0.01, "finished": SINCE + 2}
    )
    assert lines({"box-c": answered})["box-c"]["error"] == "no space"
