"""Model registry: pull throughput against curl of the same blob from the same registry, and the time from a
finished pull to the first token of the pulled model.

Usage:
  python -m bench.registry_pull [--repeats 5]

Needs docker-registry (scripts/system-deps.sh), curl and etcd. Writes bench/results/registry_pull.json and prints
it. Figures, [min, median, max] over `--repeats`, alternating the two clients on one loopback registry (started by
scripts/model-registry.sh) on this machine:
- for the bundled model and for a synthetic folder model of one `--synthetic-mb` file of random bytes (the size of
  the models boxes pull in the field): pull_mb_s, agent/models/oci/pull.py into a fresh store (download, sha256,
  fsync, install); curl_mb_s, `curl -o FILE` of the same (largest) blob; ratio = pull / curl medians (target >= 0.9);
  curl_sha256_mb_s, `curl | tee FILE | sha256sum` (curl checking the digest, as a pull does), and
  ratio_vs_verified_curl. On 2 cores the registry shares the machine: a pull's hashing competes with it;
- first_token_s: a one-box agent pulls the model (POST /v1/models/pull); from the end of the pull to the first
  token of a streamed chat completion with it, POST /v1/models/load included. The published model is the bundled
  file, so its ONNX conversion is the one the agent made at its start (cached by digest); a model new to the box
  adds its one-time conversion (`thox models prepare` shows that time).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from agent.atomic import content_sha256, file_sha256
from agent.models.oci import pull as oci_pull
from agent.models.oci.artifact import Reference, model_files
from agent.models.oci.client import OciRegistry
from agent.models.store import InstalledModel, ModelStore
from bench.cluster import save_report
from bench.executor_speed import spread
from tests.agent_process import RunningAgent, cluster_env, http_json, start_agent
from tests.model_registry import bundled_chat_model, model_registry, publish

REPO = Path(__file__).resolve().parents[1]
MODEL = "bench-chat:v1"


def pull_once(url: str, reference: str, store_dir: Path) -> float:
    async def run() -> None:
        registry = OciRegistry(url)
        async with registry.session() as session:
            found = await oci_pull.describe(registry, session, Reference.parse(reference))
            await oci_pull.pull(registry, session, found, ModelStore(store_dir))

    started = time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - started


def curl_once(blob_url: str, target: Path, verified: bool = False) -> float:
    """curl of the blob into a file; `verified`: piped through sha256sum as well, which a pull always does."""
    command = ["curl", "-sSf", "-o", str(target), blob_url]
    if verified:
        command = ["sh", "-c", 'curl -sSf "$1" | tee "$2" | sha256sum >/dev/null', "curl", blob_url, str(target)]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def first_token(agent: RunningAgent) -> float:
    """Seconds from a finished pull of MODEL to the first streamed token of a chat completion with it."""
    status, _, answer = http_json("POST", f"{agent.cluster_url}/models/pull", {"model": MODEL, "stream": False})
    assert status == 200, answer
    started = time.perf_counter()
    status, _, answer = http_json("POST", f"{agent.cluster_url}/models/load", {"model": MODEL, "timeout_seconds": 900})
    assert status == 200, answer
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True}
    request = urllib.request.Request(
        f"{agent.inference_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        for raw in response:
            if raw.startswith(b"data: {") and b'"content"' in raw:
                return time.perf_counter() - started
    raise AssertionError("the stream ended without a token")


def wait_for_leader(agent: RunningAgent) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, _, topology = http_json("GET", f"{agent.cluster_url}/topology")
        if (
            status == 200
            and topology.get("leader")
            and all(n.get("engine_state") == "ready" for n in topology["nodes"])
        ):
            return
        time.sleep(0.2)
    raise TimeoutError("the one-box cluster did not come up")


def synthetic_model(folder: Path, megabytes: int) -> InstalledModel:
    """A folder model of one file of random bytes: the size of the models boxes pull in the field (0.5-1.5B)."""
    weights = folder / "model" / "weights.bin"
    weights.parent.mkdir(parents=True)
    with weights.open("wb") as handle:
        for _ in range(megabytes):
            handle.write(os.urandom(1 << 20))
    return dataclasses.replace(
        bundled_chat_model(),
        id="synthetic",
        path=weights.parent,
        size=weights.stat().st_size,
        sha256=content_sha256(weights.parent),
        format="safetensors",
        capabilities=("embeddings",),
    )


def throughput(url: str, scratch: Path, name: str, model: InstalledModel, repeats: int) -> dict[str, Any]:
    """Pulls and curls of `model`'s largest file, alternating; MB/s each and the ratio of the medians."""
    publish(url, f"{name}:v1", model)
    _, largest = max(model_files(model), key=lambda item: item[1].stat().st_size)
    blob_url = f"{url}/v2/{name}/blobs/sha256:{file_sha256(largest)}"
    pulls, curls, verified = [], [], []
    blob_bytes = largest.stat().st_size
    for i in range(repeats):
        store = scratch / f"store-{i}"
        pulls.append(model.size / pull_once(url, f"{name}:v1", store) / 1e6)
        shutil.rmtree(store)
        target = scratch / "curl.bin"
        curls.append(blob_bytes / curl_once(blob_url, target) / 1e6)
        verified.append(blob_bytes / curl_once(blob_url, target, verified=True) / 1e6)
        target.unlink()
    pull_mb_s, curl_mb_s, verified_mb_s = spread(pulls), spread(curls), spread(verified)
    return {
        "bytes": model.size,
        "pull_mb_s": pull_mb_s,
        "curl_mb_s": curl_mb_s,
        "curl_sha256_mb_s": verified_mb_s,
        "ratio": round(pull_mb_s[1] / curl_mb_s[1], 3),
        "ratio_vs_verified_curl": round(pull_mb_s[1] / verified_mb_s[1], 3),
    }


def measure(repeats: int, synthetic_mb: int) -> dict[str, Any]:
    report: dict[str, Any] = {"repeats": repeats}
    with tempfile.TemporaryDirectory() as temporary, model_registry(Path(temporary) / "registry") as url:
        scratch = Path(temporary)
        report["bundled"] = throughput(url, scratch, "bench-chat", bundled_chat_model(), repeats)
        synthetic = synthetic_model(scratch / "synthetic", synthetic_mb)
        report[f"synthetic_{synthetic_mb}mb"] = throughput(url, scratch, "bench-synthetic", synthetic, repeats)
        home = scratch / "home"
        subprocess.run(
            [str(REPO / ".venv" / "bin" / "thox"), "config", "set", "registry.url", url, "--home", str(home)],
            check=True,
            capture_output=True,
        )
        agent = start_agent(home, env=cluster_env())
        try:
            wait_for_leader(agent)
            report["first_token_s"] = round(first_token(agent), 2)
        finally:
            agent.stop()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--synthetic-mb", type=int, default=1024)
    args = parser.parse_args()
    save_report(REPO / "bench" / "results" / "registry_pull.json", measure(args.repeats, args.synthetic_mb))


if __name__ == "__main__":
    main()
