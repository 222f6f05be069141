"""A network partition of the cluster leader: three real agents, each in a Linux network namespace of its own.

The boxes hang off one bridge in the root namespace (the switch); the leader is partitioned by setting the
root-side end of its cable (a veth pair) down, so its packets go nowhere, as when a cable is pulled. Each box is
watched by a poller running inside its own namespace (the partitioned one cannot be reached from outside), which
stamps every answer with CLOCK_MONOTONIC, the same clock in every namespace, so the timelines can be compared.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.agent.cluster.stack import call, eventually, join, needs_etcd, token_for, topology
from tests.agent_process import RunningAgent, start_agent

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (run the suite as root to include it)"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 (`ip`) is not installed"),
    needs_etcd,
]

LEASE_TTL = 1.0  # cluster.lease_ttl_seconds (default)
CLAIM_MARGIN = 0.3  # agent/cluster/membership.py: the holder stops claiming this long before TTL after a keepalive
ETCD_CLIENT_PORT = 5384  # the default: every box has a network of its own, so the default ports are free
POLL_SECONDS = 0.05

# Runs inside a box's namespace: polls the agent's health (is this box claiming leadership?), its etcd member's
# status (is it the raft leader?) and, where asked, its cluster views; prints one JSON line per answer.
POLLER = r"""
import http.client, json, ssl, sys, threading, time

lock = threading.Lock()

def fields(what, body):
    if what == "health":
        return {"claim": body["cluster"]["is_leader"]}
    if what == "raft":
        return {"raft_leader": body.get("leader") == body["header"]["member_id"], "term": body.get("raftTerm")}
    return {"leader": body.get("leader"), "state": body.get("status")}

def connect(host, port, tls):
    if tls is None:
        return http.client.HTTPConnection(host, port, timeout=10)
    # etcd's client port takes only clients with a cluster certificate: the box's own (the server is checked
    # against the cluster CA; its certificate names the node, not 127.0.0.1)
    context = ssl.create_default_context(cafile=tls["ca"])
    context.check_hostname = False
    context.load_cert_chain(tls["cert"], tls["key"])
    return http.client.HTTPSConnection(host, port, timeout=10, context=context)

def poll(what, method, host, port, path, every, tls=None):
    while True:
        sent = time.monotonic()
        record = {"what": what, "sent": sent}
        connection = connect(host, port, tls)
        try:
            connection.request(method, path, body=b"{}" if method == "POST" else None)
            reply = connection.getresponse()
            raw = reply.read()
            record["status"] = reply.status
            if reply.status == 200:
                record.update(fields(what, json.loads(raw)))
        except (OSError, ValueError, KeyError) as exc:
            record["error"] = repr(exc)
        finally:
            connection.close()
        record["recv"] = time.monotonic()
        with lock:
            print(json.dumps(record), flush=True)
        time.sleep(max(0.0, sent + every - time.monotonic()))  # the poller's period, not a wait

for plan in json.loads(sys.argv[1]):
    threading.Thread(target=poll, args=plan, daemon=True).start()
threading.Event().wait()
"""


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Box:
    """A box: its namespace, its address on the bridge and the root-side end of its cable."""

    name: str
    netns: str
    address: str
    cable: str
    agent: RunningAgent | None = None
    poller: subprocess.Popen[bytes] | None = None
    poll_log: Path | None = None

    @property
    def running(self) -> RunningAgent:
        assert self.agent is not None
        return self.agent

    @property
    def etcd_tls(self) -> dict[str, str]:
        """The box's own cluster certificate, which its etcd member's client port asks for."""
        folder = self.running.home / "cluster" / "tls"
        return {"ca": str(folder / "ca.pem"), "cert": str(folder / "node.pem"), "key": str(folder / "node-key.pem")}

    def samples(self, what: str) -> list[dict[str, Any]]:
        assert self.poll_log is not None
        found = []
        for line in self.poll_log.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line still being written
            if record["what"] == what:
                found.append(record)
        return sorted(found, key=lambda r: float(r["sent"]))


@dataclass
class Lab:
    """Three namespaces on one bridge; everything in them is killed and removed at the end."""

    bridge: str
    boxes: list[Box] = field(default_factory=list)

    def start_agents(self, tmp_path: Path) -> None:
        def start(box: Box) -> RunningAgent:
            env = {
                "THOX_CLUSTER_ENABLED": "true",
                "THOX_CLUSTER_NODE_ID": box.name,
                "THOX_CLUSTER_ADVERTISE": box.address,
                "THOX_CLUSTER_MDNS": "false",
                "THOX_ENGINE_THREADS": "1",
                # The APIs listen on the box's address, so the endpoints file names it and the test (in the root
                # namespace, a private address) reaches them without a key and without being rate limited.
                "THOX_API_BIND": box.address,
                "THOX_API_AUTH": "off",
                "THOX_API_CLUSTER_RATE_LIMIT": "1000000",
            }
            return start_agent(
                tmp_path / box.name, env=env, timeout=300, command_prefix=["ip", "netns", "exec", box.netns]
            )

        with ThreadPoolExecutor(len(self.boxes)) as pool:
            for box, agent in zip(self.boxes, pool.map(start, self.boxes), strict=True):
                box.agent = agent

    def start_poller(self, box: Box, tmp_path: Path, *, with_views: bool) -> None:
        cluster_port = urllib.parse.urlsplit(box.running.cluster_url).port
        plan: list[list[Any]] = [
            ["health", "GET", box.address, cluster_port, "/v1/health", POLL_SECONDS],
            ["raft", "POST", "127.0.0.1", ETCD_CLIENT_PORT, "/v3/maintenance/status", 0.1, box.etcd_tls],
        ]
        if with_views:
            plan += [
                ["topology", "GET", box.address, cluster_port, "/v1/topology", 0.25],
                ["cluster", "GET", box.address, cluster_port, "/v1/cluster", 0.25],
            ]
        tmp_path.mkdir(parents=True, exist_ok=True)
        box.poll_log = tmp_path / f"{box.name}.poll.jsonl"
        with box.poll_log.open("wb") as out:
            box.poller = subprocess.Popen(
                ["ip", "netns", "exec", box.netns, sys.executable, "-c", POLLER, json.dumps(plan)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def stop_pollers(self) -> None:
        for box in self.boxes:
            if box.poller is not None and box.poller.poll() is None:
                box.poller.kill()
                box.poller.wait(10)

    def close(self) -> None:
        self.stop_pollers()
        for box in self.boxes:
            if box.agent is not None and box.agent.process.poll() is None:
                box.agent.process.kill()  # its etcd dies with it (pdeathsig)
                box.agent.process.wait(30)
        for box in self.boxes:  # whatever else still runs there (an agent that failed to start, its children)
            listed = subprocess.run(["ip", "netns", "pids", box.netns], capture_output=True, text=True, check=False)
            for pid in listed.stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        for args in [
            *(("link", "del", box.cable) for box in self.boxes),
            *(("netns", "del", box.netns) for box in self.boxes),
            ("link", "del", self.bridge),
        ]:
            with contextlib.suppress(RuntimeError):  # never created, or already gone with its namespace
                ip(*args)


def _free_subnet() -> str:
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    for _ in range(100):
        subnet = f"10.231.{secrets.randbelow(256)}"
        if f" {subnet}." not in used:
            return subnet
    raise RuntimeError("no free 10.231.x.0/24 subnet")


@pytest.fixture
def lab() -> Iterator[Lab]:
    suffix = secrets.token_hex(3)  # interface names stay within 15 characters; parallel runs never collide
    subnet = _free_subnet()
    made = Lab(bridge=f"thxbr{suffix}")
    try:
        try:
            ip("link", "add", made.bridge, "type", "bridge")
        except RuntimeError as exc:
            pytest.skip(f"cannot create a bridge here: {exc}")
        ip("addr", "add", f"{subnet}.1/24", "dev", made.bridge)
        ip("link", "set", made.bridge, "up")
        for index, letter in enumerate("abc"):
            box = Box(
                name=f"box-{letter}",
                netns=f"thox-{suffix}-{letter}",
                address=f"{subnet}.{index + 2}",
                cable=f"thx{suffix}{letter}",
            )
            made.boxes.append(box)
            try:
                ip("netns", "add", box.netns)
            except RuntimeError as exc:
                pytest.skip(f"network namespaces are not available here: {exc}")
            inside = f"thy{suffix}{letter}"
            ip("link", "add", box.cable, "type", "veth", "peer", "name", inside, "netns", box.netns)
            ip("link", "set", box.cable, "master", made.bridge, "up")
            ip("-n", box.netns, "link", "set", "lo", "up")  # the agent reaches its etcd member over loopback
            ip("-n", box.netns, "addr", "add", f"{box.address}/24", "dev", inside)
            ip("-n", box.netns, "link", "set", inside, "up")
        yield made
    finally:
        made.close()


def _form_cluster(lab: Lab) -> str:
    first, *others = (box.running for box in lab.boxes)
    cluster_id = eventually(lambda: topology(first)["leader"] and topology(first)["cluster_id"], 30, "a leader")
    for joiner in others:
        status, answer = join(joiner, token_for(first))
        assert status == 200, answer
        assert answer["cluster_id"] == cluster_id
    _wait_healthy(lab, None, 90)
    leader: str = topology(first)["leader"]
    return leader


def _wait_healthy(lab: Lab, leader: str | None, timeout: float) -> None:
    """Until every box sees three live voters and the same leader (`leader`, when given)."""

    def agreed() -> bool:
        summaries = [call(box.running, "GET", "/cluster")[1] for box in lab.boxes]
        leaders = {summary.get("leader") for summary in summaries}
        return (
            all(s.get("status") == "healthy" and s["voters"]["alive"] == 3 for s in summaries)
            and len(leaders) == 1
            and None not in leaders
            and (leader is None or leaders == {leader})
        )

    eventually(agreed, timeout, f"three healthy voters agreeing on {leader or 'a leader'}")


def _claims(box: Box) -> list[dict[str, Any]]:
    return [r for r in box.samples("health") if r.get("status") == 200]


def etcd(box: Box, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """A call to the box's etcd member (its JSON gateway on the loopback client port), from inside its namespace."""
    script = (
        "import http.client, json, ssl, sys; tls = json.loads(sys.argv[4]); "
        "x = ssl.create_default_context(cafile=tls['ca']); x.check_hostname = False; "
        "x.load_cert_chain(tls['cert'], tls['key']); "
        "c = http.client.HTTPSConnection('127.0.0.1', int(sys.argv[1]), timeout=10, context=x); "
        "c.request('POST', sys.argv[2], body=sys.argv[3]); r = c.getresponse(); print(r.status); "
        "print(r.read().decode())"
    )
    done = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            box.netns,
            sys.executable,
            "-c",
            script,
            str(ETCD_CLIENT_PORT),
            path,
            json.dumps(body or {}),
            json.dumps(box.etcd_tls),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    status, _, answer = done.stdout.partition("\n")
    assert status == "200", (box.name, path, done.stdout, done.stderr)
    body = json.loads(answer)
    assert isinstance(body, dict), (box.name, path, answer)
    return body


def place_raft_leader(lab: Lab, target: Box) -> None:
    """Make `target`'s etcd member the raft leader (etcd's leadership transfer), unless it already is."""
    statuses = {box.name: etcd(box, "/v3/maintenance/status") for box in lab.boxes}
    target_id = statuses[target.name]["header"]["member_id"]
    leader_id = statuses[target.name]["leader"]
    if leader_id != target_id:
        current = next(box for box in lab.boxes if statuses[box.name]["header"]["member_id"] == leader_id)
        etcd(current, "/v3/maintenance/transfer-leadership", {"targetID": target_id})
    eventually(
        lambda: all(etcd(box, "/v3/maintenance/status")["leader"] == target_id for box in lab.boxes),
        15,
        f"{target.name}'s etcd member as raft leader",
    )


def partition_round(lab: Lab, tmp_path: Path, leader_name: str, *, raft_leader_too: bool) -> str:
    """Cut the leader off, measure, reconnect it; returns the leader elected meanwhile."""
    old = next(box for box in lab.boxes if box.name == leader_name)
    majority = [box for box in lab.boxes if box is not old]
    place_raft_leader(lab, old if raft_leader_too else majority[0])
    _wait_healthy(lab, leader_name, 30)
    for box in lab.boxes:
        lab.start_poller(
            box, tmp_path / ("raft-leader-too" if raft_leader_too else "raft-follower"), with_views=box is old
        )
    for box in lab.boxes:

        def polled(box: Box = box) -> bool:
            return len(_claims(box)) >= 5

        eventually(polled, 30, f"{box.name}'s poller")
    assert _claims(old)[-1]["claim"] is True and not any(_claims(box)[-1]["claim"] for box in majority)
    steady_from = time.monotonic()

    def steady() -> bool:  # a steady record before the cut: fresh claims and a fresh raft status
        claims = [r for r in _claims(old) if r["sent"] >= steady_from]
        return len(claims) >= 3 and any(r["sent"] >= steady_from for r in old.samples("raft"))

    eventually(steady, 30, f"a steady record of {old.name} before the cut")

    cut_at = time.monotonic()
    ip("link", "set", old.cable, "down")
    cut_took = time.monotonic() - cut_at

    def new_leader() -> tuple[str, float] | None:
        asked = time.monotonic()
        views = {topology(box.running)["leader"] for box in majority}
        found = views.pop() if len(views) == 1 else None
        return (found, asked) if found not in (None, leader_name) else None

    found: tuple[str, float] = eventually(new_leader, 30, "a new leader on the majority side")
    successor, reported_at = found
    # The partition outlasts every lease and election: its length is part of the scenario, not a wait.
    time.sleep(max(0.0, cut_at + 4.0 - time.monotonic()))
    heal_at = time.monotonic()
    ip("link", "set", old.cable, "up")
    _wait_healthy(lab, successor, 60)  # the old leader is back, as a follower of the new one
    healed_in = time.monotonic() - heal_at
    healed = time.monotonic()
    eventually(
        lambda: all(any(r["sent"] >= healed for r in box.samples("health")) for box in lab.boxes),
        30,
        "a health sample from every box after the heal",
    )
    lab.stop_pollers()

    # The old leader: claiming at the cut, then not any more (and never again: it rejoined as a follower).
    old_claims = _claims(old)
    before = [r for r in old_claims if r["recv"] < cut_at]
    assert before and before[-1]["claim"] is True, "the old leader was not claiming when it was cut off"
    after = [r for r in old_claims if r["sent"] >= cut_at]
    first_false = next(i for i, r in enumerate(after) if r["claim"] is False)
    assert not any(r["claim"] for r in after[first_false:]), "the old leader claimed leadership again"
    stopped_at = after[first_false]["recv"]  # it had stopped by then, at the latest
    still_at = max([r["sent"] - cut_at for r in after[:first_false]], default=0.0)  # it still claimed then
    partitioned = [r for r in old.samples("health") if cut_at <= r["sent"] < heal_at]
    assert all(r.get("status") == 200 for r in partitioned), "health must answer on a partitioned box"
    slowest_health = max(r["recv"] - r["sent"] for r in partitioned)

    # Its claim lasts until its last acknowledged keepalive (timed from when it was sent) plus TTL - margin. A raft
    # follower forwards keepalives to the raft leader, so none is acknowledged after the cut; a raft leader
    # acknowledges them by itself (etcd 3.4 asks no quorum to renew a lease) until it steps down for want of one
    # (CheckQuorum, within two election timeouts). etcd covers that: a new raft leader extends every lease by an
    # election timeout, so the lease cannot expire on the majority side before the old holder has stopped claiming.
    raft = old.samples("raft")
    raft_leader_at_cut = next((r.get("raft_leader") for r in reversed(raft) if r["recv"] < cut_at), None)
    assert raft_leader_at_cut is raft_leader_too
    stepped_down = next((r["recv"] - cut_at for r in raft if r["sent"] >= cut_at and not r.get("raft_leader")), None)
    assert stepped_down is not None, "the partitioned etcd member still says it is the raft leader"
    renewals_until = stepped_down if raft_leader_too else 0.0  # its etcd member acknowledged keepalives until then
    bound = renewals_until + LEASE_TTL - CLAIM_MARGIN
    slack = 0.25  # a poll, and scheduling on a loaded 2-core box

    # The new leader's claim began after its last sample that said "not leader"; the old one's had ended by then.
    starts = []
    for box in majority:
        claims = [r for r in _claims(box) if r["sent"] >= cut_at]
        first_true = next((i for i, r in enumerate(claims) if r["claim"]), None)
        if first_true is not None:
            assert first_true > 0, f"{box.name} claimed from its first sample after the cut"
            starts.append((claims[first_true - 1]["sent"], claims[first_true]["recv"], box.name))
    assert starts, "no box of the majority ever claimed leadership"
    new_not_before, new_by, new_name = min(starts)
    assert new_name == successor

    # Nor do the partitioned box's cluster views name any leader once it has stopped claiming.
    views = {
        what: [r for r in old.samples(what) if stopped_at <= r["sent"] < heal_at] for what in ("topology", "cluster")
    }
    assert views["topology"] and views["cluster"], views
    assert not any(r.get("leader") for answers in views.values() for r in answers), views
    answered = {
        what: sorted({(r.get("status"), r.get("state")) for r in answers}, key=str) for what, answers in views.items()
    }
    slowest_view = {what: max(r["recv"] - r["sent"] for r in answers) for what, answers in views.items()}
    placement = "also the raft leader" if raft_leader_too else "a raft follower"
    stepped = f"; its etcd member stepped down as raft leader by +{stepped_down:.3f} s" if raft_leader_too else ""
    print(f"""
{leader_name} ({placement}) cut off (took {cut_took * 1000:.0f} ms){stepped}
  old leader: still claimed at +{still_at:.3f} s, stopped by +{stopped_at - cut_at:.3f} s (bound {bound:.2f} s); \
slowest health answer {slowest_health * 1000:.0f} ms
  new leader {successor}: claiming not before +{new_not_before - cut_at:.3f} s, by +{new_by - cut_at:.3f} s; \
the majority's topology reported it at +{reported_at - cut_at:.3f} s
  partitioned box: /v1/topology answered {answered["topology"]} in up to {slowest_view["topology"]:.2f} s, \
/v1/cluster {answered["cluster"]} in up to {slowest_view["cluster"]:.2f} s
  reconnected: one leader, three healthy voters after {healed_in:.2f} s""")  # noqa: T201 - the measurements, for -s

    assert still_at < stopped_at - cut_at <= bound + slack, (
        f"the partitioned leader claimed until +{stopped_at - cut_at:.3f} s after the cut (bound {bound:.2f} s)"
    )
    assert stopped_at < new_not_before, "two boxes claimed leadership at the same time"
    assert stopped_at < reported_at, "the majority reported a new leader while the old one still claimed it"
    assert slowest_health < 0.5, f"health took {slowest_health:.3f} s on the partitioned box"
    return successor


def test_a_partitioned_leader_stops_claiming_before_another_box_can_lead_and_rejoins_as_a_follower(
    lab: Lab,
    tmp_path: Path,
) -> None:
    lab.start_agents(tmp_path)
    leader = _form_cluster(lab)
    # Both places the leader can be in etcd: a raft leader renews its lease by itself until it steps down; a raft
    # follower's last renewal went through the raft leader before the cut.
    successor = partition_round(lab, tmp_path, leader, raft_leader_too=True)
    partition_round(lab, tmp_path, successor, raft_leader_too=False)
