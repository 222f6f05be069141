"""Model placement through real agents: load, pull with progress, re-placement after a box dies, unload, refusals,
and routing away from a saturated box."""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.agent.cluster.stack import call, eventually, join, needs_etcd, token_for, topology
from tests.agent_process import RunningAgent, http_json
from tests.bundled import install_alias, smollm2_gguf

pytestmark = needs_etcd

ALIAS = "smollm2-alias"
DEFAULT = "smollm2-135m-instruct"


def thox(agent: RunningAgent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args, "--home", str(agent.home)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ndjson_post(url: str, body: dict[str, Any]) -> tuple[int, str, list[dict[str, Any]]]:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=120)
    try:
        connection.request("POST", parts.path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        lines = [json.loads(line) for line in response.read().splitlines() if line.strip()]
        return response.status, response.getheader("Content-Type") or "", lines
    finally:
        connection.close()


def manifest_entry(agent: RunningAgent, model: str) -> dict[str, Any] | None:
    manifest = json.loads((agent.home / "models" / "manifest.json").read_text())
    return next((m for m in manifest["models"] if m["id"] == model), None)


def served_models(agent: RunningAgent) -> list[str]:
    status, _, listing = http_json("GET", f"{agent.inference_url}/models")
    assert status == 200, listing
    return [m["id"] for m in listing["data"] if m["loaded"]]  # /v1/models lists installed models too


def ask(agent: RunningAgent, model: str) -> tuple[int, dict[str, str], Any]:
    return http_json(
        "POST",
        f"{agent.inference_url}/chat/completions",
        {
            "model": model,
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 4,
            "temperature": 0,
        },
    )


def placement(agent: RunningAgent, model: str) -> dict[str, Any]:
    status, answer = call(agent, "GET", f"/models/placement/{model}")
    assert status == 200, answer
    assert isinstance(answer, dict), answer
    return answer


def test_models_are_pulled_placed_replaced_after_a_box_dies_and_unloaded(
    tmp_path: Path,
    boxes: Callable[..., RunningAgent],
) -> None:
    install_alias(tmp_path / "box-a", ALIAS)  # only box-a has this model; the others get it from the cluster
    first = boxes("box-a", {"THOX_DEFAULT_MODEL": DEFAULT})
    second, third = boxes("box-b"), boxes("box-c")
    eventually(lambda: topology(first)["leader"] == "box-a", 15, "box-a leading")
    for joiner in (second, third):
        assert join(joiner, token_for(first))[0] == 200
    eventually(lambda: topology(first)["node_count"] == 3, 60, "three live boxes")

    # Pull, streamed: box-c copies the model from the leader's store, with progress, and verifies it.
    status, content_type, lines = ndjson_post(f"{second.cluster_url}/models/pull", {"model": ALIAS, "nodes": ["box-c"]})
    assert status == 200 and content_type.startswith("application/x-ndjson")
    assert lines[0] == {"status": "started", "model": ALIAS, "nodes": ["box-c"]}
    # Progress lines come as the box reports them (a fast copy may go from queued to done between two reports);
    # every one counts bytes of the same total, and the box's last word is done with every byte copied.
    size = smollm2_gguf().stat().st_size
    progress = lines[1:-1]
    assert progress and all(line["total"] == size and line["node"] == "box-c" for line in progress)
    assert [line["completed"] for line in progress] == sorted(line["completed"] for line in progress)
    assert lines[-2]["status"] == "done" and lines[-2]["node"] == "box-c" and lines[-2]["completed"] == size
    assert lines[-1] == {"status": "success", "model": ALIAS, "nodes": ["box-c"]}
    copied = manifest_entry(third, ALIAS)
    assert copied is not None and copied["sha256"] == hashlib.sha256(smollm2_gguf().read_bytes()).hexdigest()
    assert not (third.home / "models" / ".partial" / ALIAS).exists()  # staging cleared once installed

    unknown_node = call(second, "POST", "/models/load", {"model": ALIAS, "nodes": ["box-z"]})
    assert unknown_node[0] == 404 and unknown_node[1]["error"]["code"] == "node_not_found"

    # Load two replicas, asked on a box that holds neither: the boxes with the file are chosen (no copy needed).
    status, placed = call(
        second, "POST", "/models/load", {"model": ALIAS, "replicas": 2, "options": {"context_length": 512}}
    )
    assert status == 200, placed
    assert placed["status"] == "ready" and sorted(r["node"] for r in placed["replicas"]) == ["box-a", "box-c"]
    assert all(r["state"] == "ready" and r["context_length"] == 512 for r in placed["replicas"])
    assert ALIAS in served_models(third) and ALIAS not in served_models(second)
    placed = third.health()["more_models"]
    assert [(e["model"], e["state"], e["max_context"]) for e in placed] == [(ALIAS, "ready", 512)]
    listing = thox(second, "models", "placement")
    assert listing.returncode == 0 and ALIAS in listing.stdout and "2/2" in listing.stdout, listing
    status, headers, answer = ask(third, ALIAS)
    assert status == 200 and "x-thox-node" not in headers, answer  # served where it is placed
    eventually(
        lambda: ALIAS in next(n for n in topology(second)["nodes"] if n["id"] == "box-c").get("models", []),
        10,
        "box-c's record listing the model",
    )
    status, headers, answer = ask(second, ALIAS)
    assert status == 200 and headers["x-thox-node"] in ("box-a", "box-c"), answer  # routed from a box without it

    # box-c dies: its replica goes to box-b, which copies the model first, with no operator involved.
    third.process.send_signal(signal.SIGKILL)
    third.process.wait(30)

    def replaced() -> bool:
        view = placement(first, ALIAS)
        return view["status"] == "ready" and sorted(r["node"] for r in view["replicas"]) == ["box-a", "box-b"]

    eventually(replaced, 90, "the lost replica placed again on box-b")
    assert manifest_entry(second, ALIAS) is not None
    assert ALIAS in served_models(second)
    status, headers, _ = ask(second, ALIAS)
    assert status == 200 and "x-thox-node" not in headers

    # Unload: no box serves it any more; box-a still serves its default model.
    status, answer = call(second, "POST", "/models/unload", {"model": ALIAS})
    assert status == 200 and answer == {"model": ALIAS, "status": "unloaded"}
    assert ALIAS not in served_models(first) and ALIAS not in served_models(second)
    assert DEFAULT in served_models(first)
    assert call(first, "GET", f"/models/placement/{ALIAS}")[0] == 404
    assert call(first, "POST", "/models/unload", {"model": ALIAS})[1]["error"]["code"] == "model_not_placed"


def test_a_model_no_single_box_can_hold_is_refused_and_nothing_is_placed(
    boxes: Callable[..., RunningAgent],
) -> None:
    box = boxes("box-a", {"THOX_CLUSTER_MODEL_MEMORY_GB": "0.5"})
    eventually(lambda: topology(box)["leader"], 15, "a leader")
    eventually(lambda: any(n.get("store") for n in topology(box)["nodes"]), 10, "the box's record")
    status, answer = call(box, "POST", "/models/load", {"model": DEFAULT})
    assert status == 400, answer
    error = answer["error"]
    assert error["code"] == "model_too_large" and "no single box can hold it" in error["message"]
    assert "0.50 GB" in error["message"]
    refused = thox(box, "models", "load", DEFAULT)
    assert refused.returncode == 1 and "no single box can hold it" in refused.stderr
    assert call(box, "GET", "/models/placement")[1]["data"] == []
    # The pooled figure stays honest: the box's real RAM, not what it offers to models.
    summary = call(box, "GET", "/cluster")[1]
    assert summary["total_ram_gb"] > 0.5

    # Other refusals, each specific: unknown model, embedding model, malformed body.
    # (no box has "nope", so the model registry is asked; none runs at registry.url here)
    unknown = call(box, "POST", "/models/load", {"model": "nope"})
    assert unknown[0] == 503 and unknown[1]["error"]["code"] == "registry_unavailable", unknown
    assert "no box of this cluster has 'nope'" in unknown[1]["error"]["message"], unknown
    assert call(box, "POST", "/models/load", {"model": "all-minilm-l6-v2"})[1]["error"]["code"] == "model_not_supported"
    too_many = call(box, "POST", "/models/load", {"model": DEFAULT, "replicas": 2})
    assert too_many[0] == 400 and "1 are live" in too_many[1]["error"]["message"]
    bad = call(box, "POST", "/models/load", {"model": DEFAULT, "replicas": 0})
    assert bad[0] == 400 and bad[1]["error"]["param"] == "replicas"


def test_a_saturated_box_hands_requests_to_a_less_busy_replica(boxes: Callable[..., RunningAgent]) -> None:
    busy = boxes("box-a", {"THOX_ENGINE_MAX_BATCH": "1"})
    spare = boxes("box-b", {"THOX_CLUSTER_MODEL_MEMORY_GB": "1.0"})  # room for its default model only
    eventually(lambda: topology(busy)["leader"], 15, "a leader")
    assert join(spare, token_for(busy))[0] == 200
    eventually(lambda: topology(busy)["node_count"] == 2, 60, "two live boxes")

    # A long stream takes box-a's only decode slot.
    long_answer: dict[str, Any] = {}

    def occupy() -> None:
        long_answer["result"] = http_json(
            "POST",
            f"{busy.inference_url}/chat/completions",
            {
                "model": DEFAULT,
                "messages": [{"role": "user", "content": "Count from one to one hundred."}],
                "max_tokens": 400,
                "temperature": 0,
            },
        )

    worker = threading.Thread(target=occupy)
    worker.start()
    try:
        eventually(lambda: busy.health()["engine"]["admitted"] >= 1, 30, "box-a busy")
        status, headers, answer = ask(busy, DEFAULT)
        assert status == 200, answer
        assert headers.get("x-thox-node") == "box-b"  # box-a could only have queued it
    finally:
        worker.join(120)
    assert long_answer["result"][0] == 200
    # Idle again, box-a serves its own requests.
    status, headers, _ = ask(busy, DEFAULT)
    assert status == 200 and "x-thox-node" not in headers

    # Two replicas wanted, room for one: the answer says which is missing and why, instead of waiting silently.
    status, placed = call(busy, "POST", "/models/load", {"model": DEFAULT, "replicas": 2, "timeout_seconds": 3})
    assert status == 202 and placed["status"] == "placing", placed
    assert [(r["node"], r["state"]) for r in placed["replicas"]] == [("box-a", "ready")]
    assert "1 more replica(s) wanted" in placed["waiting"] and "GB free" in placed["waiting"]
