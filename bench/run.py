"""Benchmark Thox against llama.cpp's `llama-server` and llama-cpp-python's server, all through HTTP, in one run.

  make bench                                      # set-up (venvs, both peer builds, cached) + full run + README
  .cache/bench/venv/bin/python -m bench.run       # the run alone (after `python3 -m bench.setup_env`)
  .cache/bench/venv/bin/python -m bench.run --quick              # smoke run, writes bench/results/quick.*
  .cache/bench/venv/bin/python -m bench.run --update-readme --no-run   # README from the latest results

Runs in the bench venv (aiohttp, matplotlib, sentence-transformers, llama-cpp-python); our agent runs from the
product venv as `thox serve`. The servers run one after another on the same GGUF with the same thread count; each
is started, warmed up, measured and stopped. Results: bench/results/latest.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import report, servers, setup_env, workload
from bench.st_embed import TEXTS

RESULTS = servers.REPO / "bench" / "results"
ORDER = ("thox", "llama_server", "llama_cpp_python")


def sizes(quick: bool) -> dict[str, Any]:
    """How much each measurement does; --quick keeps the shape and cuts the counts."""
    if quick:
        return {
            "decode_runs": 2,
            "decode_tokens": 128,
            "ttft_runs": 5,
            "long_runs": 2,
            "streams": [1, 4, 16],
            "per_stream": 1,
            "stream_tokens": 32,
            "emb_single_runs": 5,
            "emb_batch_runs": 2,
        }
    return {
        "decode_runs": 5,
        "decode_tokens": 128,
        "ttft_runs": 20,
        "long_runs": 5,
        "streams": [1, 4, 16],
        "per_stream": 2,
        "stream_tokens": 128,
        "emb_single_runs": 20,
        "emb_batch_runs": 5,
    }


def log(message: str) -> None:
    """One progress line with a timestamp."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


async def _no_eos_fields(peer: workload.Peer, name: str, session: aiohttp.ClientSession) -> None:
    """Fields that make a peer generate past EOS, so that every request produces exactly max_tokens."""
    if name == "llama_server":
        peer.no_eos = {"ignore_eos": True}
    elif name == "llama_cpp_python":
        # No ignore_eos there: a -100 logit bias on the end-of-generation tokens does the same.
        bias: dict[str, float] = {}
        for special in ("<|im_end|>", "<|endoftext|>"):
            root = peer.base_url.removesuffix("/v1")
            async with session.post(f"{root}/extras/tokenize", json={"input": special}) as response:
                tokens = (await response.json())["tokens"]
            if len(tokens) == 1:
                bias[str(tokens[0])] = -100.0
        peer.no_eos = {"logit_bias": bias}


async def _probe_prompt_tokens(session: aiohttp.ClientSession, peer: workload.Peer) -> None:
    """Prompt token counts from a non-streamed request, for servers whose streams carry no usage."""
    for kind, user in (("prefill_short", workload.SHORT_USER), ("prefill_long", workload.LONG_USER)):
        body = {"messages": workload.messages(9999, user), "max_tokens": 1, "temperature": 0}
        async with session.post(f"{peer.base_url}/chat/completions", json=body) as response:
            usage = (await response.json()).get("usage") or {}
        if usage.get("prompt_tokens"):
            peer.prompt_tokens[kind] = int(usage["prompt_tokens"])


async def measure(server: servers.Server, size: dict[str, Any], embeddings: bool) -> dict[str, Any]:
    """Everything one server is measured on, in a fixed order; 16 streams last for the event-loop reading."""
    out: dict[str, Any] = {"label": server.label, "info": server.info}
    timeout = aiohttp.ClientTimeout(total=1800, sock_read=600)
    # A fresh connection per request for every server: llama-server closes a connection after a stream, and a
    # reused one then fails to send the next request.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    assert server.memory is not None
    cpu = servers.CpuWatch(server.proc.pid)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        peer = workload.Peer(server.name, server.base_url)
        await _no_eos_fields(peer, server.name, session)
        await _probe_prompt_tokens(session, peer)
        log(f"  {server.label}: warm-up")
        await workload.stream_chat(session, peer, workload.SHORT_USER, 16)
        await workload.stream_chat(session, peer, workload.LONG_USER, 4)
        out["request_fields"] = {"no_eos": peer.no_eos}
        log(f"  {server.label}: single-stream decode, {size['decode_runs']} x {size['decode_tokens']} tokens")
        out["single_stream"] = await workload.single_stream(session, peer, size["decode_runs"], size["decode_tokens"])
        log(
            f"  {server.label}: decode {out['single_stream']['decode_tok_s_median']} tok/s "
            f"(tokens {out['single_stream']['completion_tokens']})"
        )
        out["prefill_short"] = await workload.prefill(
            session, peer, workload.SHORT_USER, "prefill_short", size["ttft_runs"]
        )
        out["prefill_long"] = await workload.prefill(
            session, peer, workload.LONG_USER, "prefill_long", size["long_runs"]
        )
        log(
            f"  {server.label}: prefill {out['prefill_short'].get('prefill_tok_s_median')} tok/s "
            f"({out['prefill_short']['prompt_tokens']} tokens), {out['prefill_long'].get('prefill_tok_s_median')} "
            f"tok/s ({out['prefill_long']['prompt_tokens']} tokens); TTFT p50 {out['prefill_short']['ttft_ms_p50']} ms"
        )
        if embeddings:
            out["embeddings"] = await _our_embeddings(session, server, size)
        server.memory.sample()
        out["concurrency"] = {}
        for n in size["streams"]:
            per_stream = size["per_stream"] if n > 1 else max(2, size["per_stream"] * 2)
            log(
                f"  {server.label}: {n} concurrent stream(s) x {per_stream} request(s) x {size['stream_tokens']} tokens"
            )
            out["concurrency"][str(n)] = await workload.concurrent(session, peer, n, per_stream, size["stream_tokens"])
            server.memory.sample()
            log(
                f"  {server.label}: {n} streams -> {out['concurrency'][str(n)]['aggregate_tok_s']} tok/s, "
                f"TTFT p95 {out['concurrency'][str(n)]['ttft_ms_p95']} ms"
            )
        if server.cluster_url:
            async with session.get(f"{server.cluster_url}/health") as response:
                health = await response.json()
            loop = health.get("event_loop")
            out["event_loop"] = loop or {"missing": "the agent's /v1/health has no event_loop field"}
            out["health_after"] = health
    server.check_alive()
    server.memory.sample()
    out["memory"] = server.memory.report()
    out["cpu"] = cpu.report()
    return out


async def _our_embeddings(
    session: aiohttp.ClientSession, server: servers.Server, size: dict[str, Any]
) -> dict[str, Any]:
    """Our /v1/embeddings, if the agent serves an embedding model; a note otherwise."""
    async with session.get(f"{server.base_url}/models") as response:
        models = (await response.json()).get("data", [])
    chosen = [m["id"] for m in models if "embeddings" in (m.get("capabilities") or [])]
    if not chosen:
        return {"skipped": "GET /v1/models lists no model with the 'embeddings' capability"}
    log(f"  {server.label}: embeddings ({chosen[0]})")
    try:
        return {
            "model": chosen[0],
            **await workload.embeddings(
                session, server.base_url, chosen[0], TEXTS, size["emb_single_runs"], size["emb_batch_runs"]
            ),
        }
    except RuntimeError as exc:
        return {"skipped": f"POST /v1/embeddings failed: {exc}"}


def run_server(name: str, size: dict[str, Any], logs: Path, threads: int) -> dict[str, Any]:
    """Start one server, measure it, stop it; a failure is recorded, never fatal to the whole run."""
    p = setup_env.paths()
    gguf = servers.chat_gguf()
    log(f"starting {name}")
    started = time.monotonic()
    server: servers.Server | None = None
    try:
        if name == "thox":
            server = servers.start_thox(threads, logs)
        elif name == "llama_server":
            if not p["llama_server"].exists():
                return {"skipped": "llama-server is not built; run `python3 -m bench.setup_env`"}
            server = servers.start_llama_server(
                p["llama_server"], gguf, threads, parallel=16, ctx_per_slot=1024, logs=logs
            )
        else:
            server = servers.start_llama_cpp_python(Path(sys.executable), gguf, threads, n_ctx=2048, logs=logs)
        log(f"  {server.label} ready in {time.monotonic() - started:.1f} s at {server.base_url}")
        result = asyncio.run(measure(server, size, embeddings=name == "thox"))
    except (servers.ServerError, RuntimeError, aiohttp.ClientError, OSError, KeyError, ValueError) as exc:
        log(f"  {name} FAILED: {exc!r}")
        return {"failed": repr(exc), "log": str(server.log_path if server else logs)}
    finally:
        if server is not None:
            server.stop()
    result["session_s"] = round(time.monotonic() - started, 1)  # start, measure, stop
    return result


def sentence_transformers_peer(size: dict[str, Any], threads: int) -> dict[str, Any]:
    """sentence-transformers on the same CPU, in a subprocess of the bench venv."""
    log("sentence-transformers embeddings")
    cmd = [
        sys.executable,
        "-m",
        "bench.st_embed",
        str(servers.embedding_model_dir()),
        "--threads",
        str(threads),
        "--single-runs",
        str(size["emb_single_runs"]),
        "--batch-runs",
        str(size["emb_batch_runs"]),
    ]
    cpu = servers.CpuWatch(os.getpid())
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=servers.REPO)
    if out.returncode != 0:
        return {"failed": out.stderr.strip()[-2000:]}
    return {**json.loads(out.stdout), "cpu": cpu.report()}


def agreement(logs: Path, served: dict[str, Any]) -> dict[str, Any]:
    """Teacher-forced top-1 agreement from bench/agreement.py (product venv, llama_cpp from the bench venv).

    It reports every graph flavour and accuracy level; the headline is the one the agent serves (`served`: the
    engine info from /v1/health), else the default (fused graph, accuracy level 4).
    """
    if not (servers.REPO / "bench" / "agreement.py").exists():
        return {"skipped": "bench/agreement.py is not there"}
    try:
        import llama_cpp
    except ImportError:
        return {"skipped": "llama_cpp is not installed in this interpreter; run from the bench venv"}
    site = Path(llama_cpp.__file__).resolve().parent.parent
    cmd = [str(servers.product_python()), "-m", "bench.agreement", "--llama-cpp", str(site)]
    log("top-1 agreement (bench.agreement)")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=servers.REPO, timeout=900)
    except subprocess.TimeoutExpired:
        return {"failed": "bench.agreement ran longer than 900 s"}
    (logs / "agreement.log").write_text(out.stdout + "\n--- stderr ---\n" + out.stderr)
    if out.returncode != 0:
        return {"failed": f"exit {out.returncode}: {out.stderr.strip()[-1500:]}"}
    data = _last_json(out.stdout)
    if data is None:
        return {"failed": "bench.agreement printed no JSON object"}
    if "skipped" in data:
        return data
    # The served flavour may carry a logits suffix ("fused-last"); agreement.py names flavours without it.
    flavour = str(served.get("flavour") or "fused").split("-")[0]
    key = f"{flavour}_acc{served.get('accuracy_level', 4)}"
    if not isinstance(data.get(key), dict):
        key = "fused_acc4"
    headline = data.get(key) if isinstance(data.get(key), dict) else None
    return {"top1_agreement": headline.get("top1") if headline else None, "headline": key, **data}


def _get_path(d: Any, *keys: str) -> Any:
    for key in keys:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _last_json(text: str) -> dict[str, Any] | None:
    with contextlib.suppress(ValueError):
        data = json.loads(text)
        return data if isinstance(data, dict) else None
    for line in reversed(text.strip().splitlines()):
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict):
                return data
    return None


def cosines(ours: list[list[float]], theirs: list[list[float]]) -> list[float]:
    """Cosine similarity of matching vectors."""
    out = []
    for a, b in zip(ours, theirs, strict=True):
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        out.append(dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))))
    return out


def machine_info() -> dict[str, Any]:
    """CPU, memory, kernel, load and the repository state."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=servers.REPO)
        return out.stdout.strip()

    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain")),
    }


def versions() -> dict[str, Any]:
    """Versions of what is compared."""
    code = (
        "import importlib.metadata as m, json\nv = {}\nfor p in ('thox-agent', 'onnxruntime', 'numpy'):\n"
        "    try: v[p] = m.version(p)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(v))"
    )
    out = subprocess.run([str(servers.product_python()), "-c", code], capture_output=True, text=True)
    ours = _last_json(out.stdout) or {}
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "product": ours,
        "llama_cpp_python": version("llama-cpp-python"),
        "aiohttp": version("aiohttp"),
        "build": _setup_record(),
    }


def _setup_record() -> dict[str, Any]:
    record = setup_env.paths()["record"]
    return json.loads(record.read_text()) if record.exists() else {}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the result document."""
    size = sizes(args.quick)
    logs = servers.CACHE / "logs" / "run"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    gguf = servers.chat_gguf()
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "config": {
            **size,
            "threads": args.threads,
            "quick": args.quick,
            "gguf": gguf.name,
            "llama_server_args": "--parallel 16, 1024 context tokens per slot",
            "llama_cpp_python_args": "n_ctx 2048, interrupt_requests False",
        },
        "servers": {},
        "notes": [],
    }
    for name in ORDER:
        if name in args.only:
            result["servers"][name] = run_server(name, size, logs, args.threads)
    emb: dict[str, Any] = {}
    ours = (result["servers"].get("thox") or {}).get("embeddings") or {}
    if "skipped" in ours:
        result["notes"].append(f"Thox embeddings not measured: {ours['skipped']}.")
    elif ours:
        emb["thox"] = {k: v for k, v in ours.items() if k != "vectors"}
    if not args.no_embeddings:
        st = sentence_transformers_peer(size, args.threads)
        emb["sentence_transformers"] = {k: v for k, v in st.items() if k != "vectors"}
        if ours.get("vectors") and st.get("vectors"):
            cos = cosines(ours["vectors"], st["vectors"])
            emb["cosine_min"] = round(min(cos), 6)
            emb["cosine_mean"] = round(sum(cos) / len(cos), 6)
    result["embeddings"] = emb
    served = _get_path(result, "servers", "thox", "info", "health_at_start", "engine", "info") or {}
    result["agreement"] = agreement(logs, served) if not args.no_agreement else {"skipped": "--no-agreement"}
    if "skipped" in result["agreement"] or "failed" in result["agreement"]:
        result["notes"].append(
            f"Top-1 agreement not measured: {result['agreement'].get('skipped') or result['agreement'].get('failed')}."
        )
    _add_notes(result)
    result["machine"]["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    result["duration_s"] = round(time.monotonic() - started, 1)
    result["targets"] = report.evaluate(result)
    return result


def _add_notes(result: dict[str, Any]) -> None:
    notes = result["notes"]
    s = result["servers"]
    for name, data in s.items():
        if "failed" in data:
            notes.append(f"{name} failed: {data['failed']} (log: {data.get('log')}).")
    if (s.get("llama_cpp_python") or {}).get("single_stream", {}).get("counted_from_stream"):
        notes.append(
            "llama-cpp-python's server ignores stream_options.include_usage: its completion tokens are "
            "counted as content chunks of the stream (one per token) and its prompt tokens come from a "
            "non-streamed request."
        )
    st = (result.get("embeddings") or {}).get("sentence_transformers") or {}
    for name, data in [*s.items(), ("sentence-transformers", st)]:
        other = (data.get("cpu") or {}).get("other_processes_percent")
        if other is not None and other > 5:
            notes.append(
                f"Not a quiet machine: other processes used {other}% of the CPU while {name} was measured; "
                "its numbers are not comparable."
            )
    thox = s.get("thox") or {}
    counts = thox.get("single_stream", {}).get("completion_tokens")
    if counts and min(counts) < thox["single_stream"]["max_tokens"]:
        notes.append(
            f"Thox has no ignore_eos; its single-stream runs produced {counts} tokens (rates use the actual counts)."
        )
    short = [
        f"{n} streams: min {c['completion_tokens_min']}"
        for n, c in (thox.get("concurrency") or {}).items()
        if c["completion_tokens_min"] < c["max_tokens"]
    ]
    if short:
        notes.append(
            "Some Thox requests in the concurrent runs stopped at EOS before max_tokens "
            f"({'; '.join(short)}); aggregate rates count the tokens actually produced."
        )
    notes.append(
        "The peers generate past EOS (llama-server: ignore_eos; llama-cpp-python: logit bias -100 on "
        "<|im_end|> and <|endoftext|>), so their requests produce exactly max_tokens."
    )
    lag = thox.get("event_loop") or {}
    if "missing" in lag:
        notes.append("Event-loop lag not measured: " + lag["missing"] + ".")
    elif lag:
        notes.append(
            f"Event-loop lag is the agent's own figure over its last {lag.get('window_s')} s window, read "
            "right after the 16-stream run (which took "
            f"{(thox.get('concurrency') or {}).get('16', {}).get('wall_s')} s)."
        )


def scrub(text: str) -> str:
    """No machine paths in the committed results: the repository becomes ".", temporary folders "<tmp>"."""
    text = text.replace(str(servers.REPO), ".")
    text = re.sub(re.escape(tempfile.gettempdir()) + r"/[^\s\"/]+", "<tmp>", text)
    return text.replace(str(Path.home()), "~")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    """Run the benchmark (or only re-render), write bench/results/, optionally update README.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer and shorter requests; quick.*")
    parser.add_argument("--threads", type=int, default=2, help="threads for every server (default 2)")
    parser.add_argument("--only", default=",".join(ORDER), help=f"servers to run, comma separated ({','.join(ORDER)})")
    parser.add_argument("--no-embeddings", action="store_true", help="skip the sentence-transformers peer")
    parser.add_argument("--no-agreement", action="store_true", help="skip the top-1 agreement")
    parser.add_argument("--update-readme", action="store_true", help="put the table into README.md")
    parser.add_argument("--no-run", action="store_true", help="re-render from bench/results/<output>.json")
    parser.add_argument("--output", help="result file stem in bench/results (default: latest, or quick with --quick)")
    args = parser.parse_args()
    # SIGTERM (a CI timeout, a kill) unwinds like Ctrl-C, so that every server started is stopped again.
    signal.signal(signal.SIGTERM, _interrupt)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(args.only) - set(ORDER)
    if unknown:
        parser.error(f"unknown server(s) {sorted(unknown)}; choose from {', '.join(ORDER)}")
    stem = args.output or ("quick" if args.quick else "latest")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.no_run:
        result = json.loads((RESULTS / f"{stem}.json").read_text())
    else:
        if not setup_env.venv_python().exists() or Path(sys.prefix).resolve() != setup_env.VENV.resolve():
            log("note: not running in the bench venv (.cache/bench/venv); run `python3 -m bench.setup_env` first")
        result = run(args)
        (RESULTS / f"{stem}.json").write_text(scrub(json.dumps(result, indent=2)) + "\n")
    table = report.markdown(result)
    (RESULTS / f"{stem}.md").write_text(f"# Benchmark results\n\n{table}")
    report.chart(result, RESULTS / f"{stem}.png")
    print(table)
    took = "" if args.no_run else f" in {result.get('duration_s')} s"
    log(f"wrote bench/results/{stem}.json, .md, .png{took}")
    if args.update_readme:
        if args.quick or stem != "latest":
            log("README.md is updated only from a full run written to bench/results/latest.*")
        else:
            report.update_readme(servers.REPO / "README.md", table)
            log("updated the Benchmarks section of README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
