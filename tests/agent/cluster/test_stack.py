"""Stacks of real agents on loopback, each with its own etcd, formed through join tokens."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp import Client
from zeroconf import IPVersion, Zeroconf

from tests.agent.cluster.stack import (
    call,
    eventually,
    holds_ca_key,
    http_raw,
    join,
    needs_etcd,
    token_for,
    topology,
)
from tests.agent.test_websocket_stream import collect, ws_url
from tests.agent_process import RunningAgent, http_json
from tests.bundled import install_alias

pytestmark = needs_etcd


def leader_of(agent: RunningAgent) -> Callable[[], Any]:
    """A check for `eventually`: the leader in the agent's topology (None until there is one)."""
    return lambda: topology(agent)["leader"]


def test_three_boxes_form_one_cluster_agree_on_a_leader_and_survive_losing_it(
    boxes: Callable[[str], RunningAgent],
) -> None:
    first, second, third = boxes("box-a"), boxes("box-b"), boxes("box-c")
    cluster_id = eventually(lambda: topology(first)["leader"] and topology(first)["cluster_id"], 15, "a leader")
    for joiner in (second, third):
        status, answer = join(joiner, token_for(first))
        assert status == 200, answer
        assert answer["cluster_id"] == cluster_id

    def formed() -> bool:
        summary = call(first, "GET", "/cluster")[1]
        return bool(
            summary.get("status") == "healthy" and summary["node_count"] == 3 and summary["voters"]["alive"] == 3
        )

    eventually(formed, 60, "three boxes, three voters")
    views = [topology(agent) for agent in (first, second, third)]
    assert {view["cluster_id"] for view in views} == {cluster_id}
    assert len({view["leader"] for view in views}) == 1 and views[0]["leader"] is not None
    assert sorted(n["id"] for n in views[0]["nodes"]) == ["box-a", "box-b", "box-c"]
    assert {n["role"] for n in views[0]["nodes"]} == {"voter"}
    status_text = subprocess.run(
        [sys.executable, "-m", "agent.cli", "cluster", "status", "--home", str(first.home)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert status_text.returncode == 0 and "healthy" in status_text.stdout and "box-c" in status_text.stdout

    leader_name = views[0]["leader"]
    leader = {"box-a": first, "box-b": second, "box-c": third}[leader_name]
    survivors = [agent for agent in (first, second, third) if agent is not leader]
    killed = time.monotonic()
    leader.process.send_signal(signal.SIGKILL)
    leader.process.wait(10)

    def new_leader() -> str | None:
        found = topology(survivors[0])["leader"]
        return found if found not in (None, leader_name) else None

    successor = eventually(new_leader, 10, "a new leader")
    took = time.monotonic() - killed
    assert took < 3.0, f"new leader after {took:.2f}s"
    assert topology(survivors[1])["leader"] == successor

    def degraded() -> bool:
        summary = call(survivors[0], "GET", "/cluster")[1]
        return bool(summary.get("status") == "degraded" and summary["node_count"] == 2)

    eventually(degraded, 10, "degraded with two of three voters")


def test_bad_tokens_are_refused_and_change_nothing(boxes: Callable[[str], RunningAgent]) -> None:
    first, joiner, stranger = boxes("box-a"), boxes("box-b"), boxes("box-c")
    for agent in (first, joiner, stranger):
        eventually(leader_of(agent), 15, "a leader")
    own_cluster = topology(joiner)["cluster_id"]
    good = token_for(first)
    prefix, _, secret = good["token"].rpartition(".")
    wrong_secret = {**good, "token": f"{prefix}.{'a' * len(secret)}"}
    stranger_token = token_for(stranger)
    cases = [
        (wrong_secret, 403, "token_invalid"),
        ({**good, "server": stranger_token["server"]}, 403, "ca_mismatch"),  # a server of another cluster
        ({**good, "token": "K10nonsense"}, 400, "token_malformed"),
    ]
    for token, status, code in cases:
        answer = join(joiner, token)
        assert answer[0] == status and answer[1]["error"]["code"] == code, (token, answer)
    expiring = token_for(first, ttl=1)
    # Past its expiry (expires_at is in whole seconds, so one more), read from the token rather than guessed.
    eventually(lambda: time.time() >= expiring["expires_at"] + 1, 10, "the one-second token's expiry")
    answer = join(joiner, expiring)
    assert answer[0] == 403 and answer[1]["error"]["code"] == "token_expired", answer
    assert topology(joiner)["cluster_id"] == own_cluster  # still in its own cluster: nothing changed
    assert [n["id"] for n in topology(first)["nodes"]] == ["box-a"]

    assert join(joiner, good)[0] == 200  # the good token still works after all those refusals
    answer = join(stranger, good)
    assert answer[0] == 403 and answer[1]["error"]["code"] == "token_used", answer
    assert topology(stranger)["cluster_id"] != topology(first)["cluster_id"]


def test_docking_onto_a_box_joins_its_cluster_by_nfc(boxes: Callable[[str], RunningAgent]) -> None:
    base, docked = boxes("box-a"), boxes("box-b")
    for agent in (base, docked):
        eventually(leader_of(agent), 15, "a leader")
    # The box below presents its own join offer on its NFC antenna (a reader held to it reads a one-time token).
    status, offer = call(base, "POST", "/sim/nfc/tap")
    assert status == 200, offer
    assert offer["node_id"] == "box-a" and offer["token"].startswith("K10") and offer["expires_at"] > time.time()
    # Docking puts that offer under the docked box's antenna; its hardware layer reads it and the cluster joins.
    status, answer = call(docked, "POST", "/sim/modules", {"id": "box-a", "offer": offer})
    assert status == 201, answer

    def joined() -> bool:
        nodes = {n["id"]: n for n in topology(base)["nodes"]}
        return "box-b" in nodes and nodes["box-b"]["alive"]

    eventually(joined, 30, "the docked box in the base's topology")
    assert topology(docked)["cluster_id"] == topology(base)["cluster_id"]
    eventually(lambda: any(line.get("event") == "dock_joined" for line in docked.log_lines()), 10, "dock_joined")
    # Two boxes: one voter (the founder) and one learner, which reaches the cluster through the voter.
    roles = {n["id"]: n["role"] for n in topology(docked)["nodes"]}
    assert roles == {"box-a": "voter", "box-b": "learner"}
    assert call(base, "GET", "/cluster")[1]["status"] == "healthy"
    # The token that was read is spent: the base presents a new one for the next box.
    status, next_offer = call(base, "POST", "/sim/nfc/tap")
    assert status == 200 and next_offer["token"] != offer["token"]
    assert any(line.get("event") == "own_join_offer_read" for line in base.log_lines())


@pytest.mark.parametrize("lost", ["voter", "learner"])
def test_a_two_box_stack_survives_losing_either_box(boxes: Callable[[str], RunningAgent], lost: str) -> None:
    voter, learner = boxes("box-a"), boxes("box-b")
    eventually(lambda: topology(voter)["leader"], 15, "a leader")
    assert join(learner, token_for(voter))[0] == 200
    eventually(
        lambda: (
            {n["id"]: n["role"] for n in topology(voter)["nodes"] if n["alive"]}
            == {"box-a": "voter", "box-b": "learner"}
        ),
        30,
        "a voter and a learner",
    )
    # The standby of a two-box stack takes the CA key with it: it may have to admit boxes alone.
    assert holds_ca_key(voter) and holds_ca_key(learner)
    gone, survivor = (voter, learner) if lost == "voter" else (learner, voter)
    gone.process.send_signal(signal.SIGKILL)
    gone.process.wait(10)

    def carries_on() -> bool:
        view = topology(survivor)
        alive = [n["id"] for n in view["nodes"] if n["alive"]]
        return view["leader"] == survivor.home.name and alive == [survivor.home.name]

    eventually(carries_on, 20, f"{survivor.home.name} leading alone")
    token = token_for(survivor)  # the cluster state is writable again
    assert token["cluster_id"] == topology(survivor)["cluster_id"]
    if lost == "voter":  # the former standby admits the next box on its own
        assert join(boxes("box-c"), token)[0] == 200
        eventually(lambda: topology(survivor)["node_count"] == 2, 30, "box-c admitted by the survivor")


def test_requests_for_a_model_held_elsewhere_are_routed_and_streamed(
    tmp_path: Path,
    boxes: Callable[..., RunningAgent],
) -> None:
    install_alias(tmp_path / "box-b", "smollm2-alias")
    entry, replica = boxes("box-a"), boxes("box-b", {"THOX_DEFAULT_MODEL": "smollm2-alias"})
    eventually(lambda: topology(entry)["leader"], 15, "a leader")
    assert join(replica, token_for(entry))[0] == 200
    eventually(
        lambda: any("smollm2-alias" in n.get("models", []) for n in topology(entry)["nodes"] if n["alive"]),
        30,
        "the replica's record",
    )
    question = {
        "model": "smollm2-alias",
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 8,
        "temperature": 0,
    }
    status, headers, answer = http_json("POST", f"{entry.inference_url}/chat/completions", question)
    assert status == 200, answer
    assert headers["x-thox-node"] == "box-b" and answer["model"] == "smollm2-alias"
    direct = http_json("POST", f"{replica.inference_url}/chat/completions", question)[2]
    assert answer["choices"][0]["message"] == direct["choices"][0]["message"]  # the same greedy answer

    # Constrained decoding, tool calls, logprobs and n > 1 hold through the hop: the replica's own answers.
    weather = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    }
    features = {
        **question,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "max_tokens": 60,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": weather}}],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }
    routed = http_json("POST", f"{entry.inference_url}/chat/completions", features)
    direct = http_json("POST", f"{replica.inference_url}/chat/completions", features)
    assert routed[0] == direct[0] == 200 and routed[1]["x-thox-node"] == "box-b", routed

    def shape(body: dict[str, Any]) -> list[Any]:  # call ids are fresh per answer; the rest must match
        return [
            ([c["function"] for c in choice["message"]["tool_calls"]], choice["logprobs"], choice["finish_reason"])
            for choice in body["choices"]
        ]

    assert shape(routed[2]) == shape(direct[2]) and routed[2]["choices"][0]["finish_reason"] == "tool_calls"
    colour = {"type": "json_schema", "json_schema": {"name": "c", "schema": {"enum": ["red", "green", "blue"]}}}
    routed_json = http_json("POST", f"{entry.inference_url}/chat/completions", {**question, "response_format": colour})
    assert json.loads(routed_json[2]["choices"][0]["message"]["content"]) in ("red", "green", "blue"), routed_json

    # The WebSocket stream relays too: the replica's answer as the socket's events, errors included.
    exchanged = asyncio.run(socket_exchange(entry, [{**features, "id": "routed"}, {**question, "max_tokens": 100_000}]))
    answer_events, refusal = exchanged
    done = answer_events[-1]
    assert done["type"] == "done" and done["request"] == "routed", done
    assert done["choices"] == [{"index": i, "finish_reason": "tool_calls"} for i in range(2)]
    assert done["usage"] == direct[2]["usage"]
    calls: list[list[Any]] = [[], []]
    for chunk in answer_events[:-1]:
        for choice in chunk["choices"]:
            calls[choice["index"]] += choice["delta"].get("tool_calls", [])
    assert [c["function"]["name"] for c in calls[0] if "id" in c] == ["get_weather"]
    # Valid here, too long for the replica's context: its 400 comes back as the request's error event.
    assert refusal[-1]["type"] == "error" and refusal[-1]["error"]["code"] == "context_length_exceeded", refusal

    # The MCP tools answer with a model another box serves, through the same hop.
    explained = asyncio.run(
        mcp_call(entry, "thox_explain", {"code": "x = 1", "model": "smollm2-alias", "max_tokens": 8})
    )
    assert not explained.is_error, explained.content
    assert explained.structured_content is not None and explained.structured_content["model"] == "smollm2-alias"
    assert 0 < explained.structured_content["completion_tokens"] <= 8

    # Streaming through the hop: every chunk arrives, in order, ending with [DONE].
    streamed = http_raw(f"{entry.inference_url}/chat/completions", {**question, "stream": True})
    assert streamed.endswith(b"data: [DONE]\n\n") and streamed.count(b"data: ") >= 3

    # A model nobody serves is still this box's 404, not a routing error.
    missing = http_json("POST", f"{entry.inference_url}/chat/completions", {**question, "model": "nope"})
    assert missing[0] == 404 and missing[2]["error"]["code"] == "model_not_found"

    # A client that hangs up mid-stream cancels the generation on the replica, not only on the box it called.
    long_question = {
        **question,
        "max_tokens": 1500,
        "stream": True,
        "messages": [{"role": "user", "content": "Count from 1 to 2000, separated by commas."}],
    }
    with routed_stream(entry, long_question) as (_, first_events):
        assert first_events and b"[DONE]" not in first_events
        assert replica.health()["engine"]["active_streams"] == 1
    eventually(lambda: replica.health()["engine"]["active_streams"] == 0, 3, "the replica's generation cancelled")

    # The replica dies mid-stream: the client's stream ends with a clean error event, not a hang or a cut.
    with routed_stream(entry, long_question) as (response, first_events):
        replica.process.send_signal(signal.SIGKILL)
        replica.process.wait(10)
        rest = first_events + response.read()
    events = [line[len(b"data: ") :] for line in rest.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] != b"[DONE]"
    assert json.loads(events[-1])["error"]["code"] == "replica_lost"

    # The replica gone: its record expires with its lease, and nothing is routed to it any more.
    eventually(
        lambda: http_json("POST", f"{entry.inference_url}/chat/completions", question)[0] == 404,
        10,
        "no routing to the dead replica",
    )


async def socket_exchange(agent: RunningAgent, requests: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Each request's events on one WebSocket connection to `agent`."""
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(agent)) as ws:
        answers = []
        for request in requests:
            await ws.send_json(request)
            answers.append(await collect(ws))
        return answers


async def mcp_call(agent: RunningAgent, tool: str, arguments: dict[str, Any]) -> Any:
    """One tools/call on `agent`'s /mcp (2026-07-28 era)."""
    async with Client(agent.inference_url.removesuffix("/v1") + "/mcp", mode="2026-07-28") as client:
        return await client.call_tool(tool, arguments)


@contextlib.contextmanager
def routed_stream(agent: RunningAgent, body: dict[str, Any]) -> Iterator[tuple[http.client.HTTPResponse, bytes]]:
    """A streamed request, open, with its first few events read; closing the connection hangs up."""
    connection = http.client.HTTPConnection(
        "127.0.0.1", int(agent.inference_url.split(":")[2].split("/")[0]), timeout=60
    )
    try:
        connection.request(
            "POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("X-Thox-Node") == "box-b"
        first = b""
        while first.count(b"data: ") < 4:
            first += response.read1(65536)
        yield response, first
    finally:
        connection.close()


def test_mdns_advertises_the_box_and_finds_the_cluster_for_a_join(boxes: Callable[..., RunningAgent]) -> None:
    base, joiner = boxes("box-a"), boxes("box-b")
    for agent in (base, joiner):
        eventually(leader_of(agent), 15, "a leader")
    zeroconf = Zeroconf(ip_version=IPVersion.V4Only)
    try:
        info = zeroconf.get_service_info("_http._tcp.local.", "box-a._http._tcp.local.", timeout=5000)
        assert info is not None, "the OpenAI API is not advertised"
        assert info.server == "thox.local." and info.properties[b"path"] == b"/v1"
        assert info.port == int(base.inference_url.rsplit(":", 1)[1].split("/")[0])
    finally:
        zeroconf.close()
    token = token_for(base)
    status, answer = call(joiner, "POST", "/cluster/join", {"token": token["token"]})  # no server: found by mDNS
    assert status == 200, answer
    assert answer["cluster_id"] == topology(base)["cluster_id"]


def test_boxes_beyond_the_fourth_are_clients_and_a_box_gone_for_good_is_removed(
    boxes: Callable[..., RunningAgent],
) -> None:
    quick = {"THOX_CLUSTER_REMOVE_AFTER_SECONDS": "5"}
    first = boxes("box-a", quick)
    eventually(lambda: topology(first)["leader"] == "box-a", 15, "box-a leading")
    others = {name: boxes(name, quick) for name in ("box-b", "box-c", "box-d")}
    for name, joiner in others.items():
        assert join(joiner, token_for(first))[0] == 200, name
        if name == "box-c":  # the fourth box joins as the one learner once three boxes vote
            eventually(lambda: call(first, "GET", "/cluster")[1]["voters"]["alive"] == 3, 60, "three voters")
    cluster_id = topology(first)["cluster_id"]
    roles = eventually(
        lambda: {n["id"]: n["role"] for n in topology(first)["nodes"]} if topology(first)["node_count"] == 4 else None,
        60,
        "four live boxes",
    )
    assert roles == {"box-a": "voter", "box-b": "voter", "box-c": "voter", "box-d": "learner"}
    # The CA key lives on the voters only (the promoted ones fetched it); the standby of a bigger stack has none.
    eventually(
        lambda: all(holds_ca_key(b) for b in (first, others["box-b"], others["box-c"])),
        30,
        "the three voters holding the CA key",
    )
    assert not holds_ca_key(others["box-d"])
    # A fifth box: etcd takes one learner at a time, so it joins as a client of the voters (no etcd member). Its
    # token comes from the standby, which cannot sign: the standby relays the join to a box that can.
    fifth = boxes("box-e", quick)
    status, answer = join(fifth, token_for(others["box-d"]))
    assert status == 200 and answer["role"] == "client", answer
    assert any(line.get("event") == "join_forwarded" for line in others["box-d"].log_lines())
    assert not holds_ca_key(fifth)
    eventually(
        lambda: {n["id"]: n["role"] for n in topology(first)["nodes"] if n["alive"]}.get("box-e") == "client",
        30,
        "box-e live as a client",
    )
    assert topology(fifth)["cluster_id"] == cluster_id

    others["box-c"].process.send_signal(signal.SIGKILL)  # a voter pulled out and never brought back
    others["box-c"].process.wait(30)

    def taken_over() -> bool:
        nodes = {n["id"]: n for n in topology(first)["nodes"]}
        return "box-c" not in nodes and nodes["box-d"]["role"] == "voter"

    eventually(taken_over, 60, "box-c removed and box-d voting")
    eventually(lambda: holds_ca_key(others["box-d"]), 30, "the promoted voter holding the CA key")
    # The stack converges (box-d's new role and records propagate): healthy once it has, not at one instant.
    healthy = {"status": "healthy", "voters": {"alive": 3, "expected": 3}}
    eventually(
        lambda: {k: call(first, "GET", "/cluster")[1].get(k) for k in healthy} == healthy,
        30,
        "the stack healthy again with three live voters",
    )
    assert any(line.get("event") == "member_removed" and line.get("node") == "box-c" for line in first.log_lines())
    # The stack has had no standby since box-d took box-c's vote, so the client becomes the standby member (before
    # or after the restart below, whichever comes first); restarted, it comes back into the same cluster.
    fifth.process.send_signal(signal.SIGKILL)
    fifth.process.wait(30)
    before_restart = fifth.log_lines()
    fifth = boxes("box-e", quick)
    eventually(
        lambda: {n["id"]: n["role"] for n in topology(first)["nodes"] if n["alive"]}.get("box-e") == "learner",
        60,
        "box-e back, as the standby",
    )
    assert topology(fifth)["cluster_id"] == cluster_id
    eventually(
        lambda: any(line.get("event") == "client_became_member" for line in [*before_restart, *fifth.log_lines()]),
        10,
        "client_became_member logged",
    )

    # A box that is frozen (or cut off) longer than the stack waits is removed while its etcd still runs; when it
    # wakes up its member has been refused by the others, and it carries on as a cluster of its own.
    frozen = others["box-d"]
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        eventually(lambda: "box-d" not in {n["id"] for n in topology(first)["nodes"]}, 60, "box-d removed")
    finally:
        frozen.process.send_signal(signal.SIGCONT)
    woken = eventually(
        lambda: topology(frozen) if topology(frozen)["leader"] == "box-d" else None,
        60,
        "the woken box leading its own cluster",
    )
    assert woken["cluster_id"] != cluster_id and woken["node_count"] == 1
    assert any(line.get("event") == "etcd_member_removed" for line in frozen.log_lines())
    assert not list(frozen.home.glob("cluster/previous-*/tls/ca-key.pem"))  # the removed box keeps no key of ours
    # The standby (the former client) takes the free vote.
    eventually(
        lambda: {n["id"]: n["role"] for n in topology(first)["nodes"]}.get("box-e") == "voter", 60, "box-e voting"
    )
    eventually(lambda: call(first, "GET", "/cluster")[1]["status"] == "healthy", 30, "healthy again")
    assert call(first, "GET", "/cluster")[1]["voters"] == {"alive": 3, "expected": 3}

    # Brought back after all: its place was given away, so it carries on as a cluster of its own.
    returned = boxes("box-c", quick)
    alone = eventually(
        lambda: topology(returned) if topology(returned)["leader"] == "box-c" else None,
        30,
        "the returned box leading its own cluster",
    )
    assert alone["cluster_id"] != cluster_id and alone["node_count"] == 1
    assert any(line.get("event") == "cluster_member_removed" for line in returned.log_lines())
    assert sorted(n["id"] for n in topology(first)["nodes"]) == ["box-a", "box-b", "box-e"]
