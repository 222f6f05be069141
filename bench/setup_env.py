"""Benchmark set-up: a bench venv and both llama.cpp peers, built from one sdist and cached.

Run by `make bench` (standard library only, any Python >= 3.10):

  python3 -m bench.setup_env            # build what is missing, print what is cached
  python3 -m bench.setup_env --print    # only print the paths and flags (no building)

Everything lands under `.cache/bench/` in the repository (git-ignored):

  venv/                         llama-cpp-python[server], sentence-transformers, torch (CPU), matplotlib, aiohttp
  src/                          the llama-cpp-python sdist and its extracted tree (vendor/llama.cpp)
  wheels/<version>-<key>/       our own build of the llama-cpp-python wheel
  llama-server-<version>-<key>/ the `llama-server` binary built from the same vendored llama.cpp
  setup.json                    what was built, with which flags, how long it took

`<key>` is a hash of the GGML flags, so changing a flag rebuilds and an unchanged one reuses the build. Both peers
get the same GGML flags: no `-march=native` (GGML_NATIVE=OFF) and no AMX, because these VMs advertise AMX but
fault on `ldtilecfg` (see the engine research); the AVX-512 family the CPU reports is switched on explicitly, which
is what a native build would pick minus AMX, so the peers run at their best on this CPU. pip's own wheel cache is
not used for llama-cpp-python: it is keyed by the sdist only and would silently ignore changed CMAKE_ARGS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# 2.13.0 is pinned because it resolves to a CPU-only wheel here; an unpinned torch pulls GBs of CUDA packages.
BENCH_PACKAGES = ["sentence-transformers", "torch==2.13.0", "matplotlib", "aiohttp"]
# The CPU's AVX-512 features -> the GGML options that use them (what GGML_NATIVE=ON would enable, less AMX).
AVX512_FLAGS = {
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
    "avx_vnni": "GGML_AVX_VNNI",
}
# Options for the standalone llama-server build only: no network at build time (no prebuilt web UI download,
# no curl/openssl), one static binary, nothing but the server target.
SERVER_ONLY_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
]

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench"
VENV = CACHE / "venv"


class SetupError(RuntimeError):
    """A set-up step failed; the message says which and where its log is."""


def venv_python() -> Path:
    """The bench venv's interpreter."""
    return VENV / "bin" / "python"


def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def ggml_flags() -> list[str]:
    """The GGML options both peers are built with."""
    flags = ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    have = cpu_flags()
    flags += [f"-D{option}=ON" for feature, option in AVX512_FLAGS.items() if feature in have]
    return flags


def build_key(flags: list[str]) -> str:
    """A short stable hash of the build flags (and the machine architecture)."""
    text = "\n".join([platform.machine(), *sorted(flags)])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def paths() -> dict[str, Path]:
    """Where each cached artefact lives."""
    key = build_key(ggml_flags())
    version = LLAMA_CPP_PYTHON_VERSION
    return {
        "venv_python": venv_python(),
        "sdist_dir": CACHE / "src",
        "source": CACHE / "src" / f"llama_cpp_python-{version}",
        "wheel_dir": CACHE / "wheels" / f"{version}-{key}",
        "server_dir": CACHE / f"llama-server-{version}-{key}",
        "llama_server": CACHE / f"llama-server-{version}-{key}" / "bin" / "llama-server",
        "record": CACHE / "setup.json",
    }


def say(message: str) -> None:
    """One progress line."""
    print(f"[bench setup] {message}", flush=True)


def run_logged(
    cmd: list[str], log: Path, what: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> float:
    """Run a long step with its output in `log`, printing a heartbeat; raise SetupError on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    say(f"{what} (log: {log.relative_to(REPO)})")
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        next_beat = started + 30
        while proc.poll() is None:
            time.sleep(1)
            if time.monotonic() >= next_beat:
                next_beat += 30
                say(f"  ... {what}: {time.monotonic() - started:.0f} s, last: {last_line(log)}")
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SetupError(
            f"{what} failed (exit {proc.returncode}) after {elapsed:.0f} s; full log: {log}\n--- last lines ---\n{tail}"
        )
    say(f"{what}: done in {elapsed:.0f} s")
    return elapsed


def last_line(log: Path) -> str:
    """The last non-empty line of a log, shortened, for the heartbeat."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 2000))
            lines = [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:100] if lines else ""


def ensure_venv(record: dict[str, object]) -> None:
    """Create the bench venv and install the non-llama packages."""
    stamp = VENV / ".bench-stamp"
    wanted = json.dumps(BENCH_PACKAGES)
    if stamp.exists() and stamp.read_text() == wanted:
        say(f"bench venv: cached ({VENV.relative_to(REPO)})")
        return
    if not venv_python().exists():
        say("creating the bench venv")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(venv_python()), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    record["venv_install_s"] = run_logged(
        [str(venv_python()), "-m", "pip", "install", "--progress-bar", "off", *BENCH_PACKAGES],
        CACHE / "logs" / "venv-install.log",
        "installing " + " ".join(BENCH_PACKAGES),
    )
    stamp.write_text(wanted)


def ensure_sdist(p: dict[str, Path]) -> None:
    """Download the llama-cpp-python sdist (source only) and extract it."""
    version = LLAMA_CPP_PYTHON_VERSION
    tarball = p["sdist_dir"] / f"llama_cpp_python-{version}.tar.gz"
    if not tarball.exists():
        run_logged(
            [
                str(venv_python()),
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={version}",
                "-d",
                str(p["sdist_dir"]),
            ],
            CACHE / "logs" / "sdist-download.log",
            f"downloading the llama-cpp-python {version} sdist",
        )
    if not (p["source"] / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        say(f"extracting {tarball.name}")
        with tarfile.open(tarball) as tar:
            try:
                tar.extractall(p["sdist_dir"], filter="data")
            except TypeError:  # Python without extraction filters
                tar.extractall(p["sdist_dir"])


def ensure_wheel(p: dict[str, Path], flags: list[str], record: dict[str, object]) -> Path:
    """Build (once per flag set) and install llama-cpp-python[server] into the bench venv."""
    version = LLAMA_CPP_PYTHON_VERSION
    wheels = sorted(p["wheel_dir"].glob(f"llama_cpp_python-{version}-*.whl"))
    if wheels:
        say(f"llama-cpp-python wheel: cached ({wheels[0].relative_to(REPO)})")
    else:
        env = {**os.environ, "CMAKE_ARGS": " ".join(flags), "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
        tmp = p["wheel_dir"].with_name(p["wheel_dir"].name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        record["wheel_build_s"] = run_logged(
            [
                str(venv_python()),
                "-m",
                "pip",
                "wheel",
                "--no-cache-dir",
                "--no-deps",
                "-w",
                str(tmp),
                str(p["sdist_dir"] / f"llama_cpp_python-{version}.tar.gz"),
            ],
            CACHE / "logs" / "llama-cpp-python-build.log",
            f"building llama-cpp-python {version} from source (about 10 min on 2 cores)",
            env=env,
        )
        tmp.rename(p["wheel_dir"])
        wheels = sorted(p["wheel_dir"].glob("llama_cpp_python-*.whl"))
    probe = subprocess.run(
        [str(venv_python()), "-c", "import llama_cpp, sys; sys.stdout.write(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
    )
    installed_from = VENV / ".llama-cpp-python-wheel"
    if (
        probe.returncode == 0
        and probe.stdout == version
        and installed_from.exists()
        and installed_from.read_text() == wheels[0].name + p["wheel_dir"].name
    ):
        return wheels[0]
    if probe.returncode == 0:  # some other build of it: replace it with ours
        subprocess.run(
            [str(venv_python()), "-m", "pip", "uninstall", "--yes", "llama-cpp-python"], check=True, capture_output=True
        )
    # The wheel plus its [server] extra (FastAPI, uvicorn, ...), resolved normally.
    run_logged(
        [str(venv_python()), "-m", "pip", "install", "--progress-bar", "off", f"{wheels[0]}[server]"],
        CACHE / "logs" / "llama-cpp-python-install.log",
        "installing llama-cpp-python[server]",
    )
    installed_from.write_text(wheels[0].name + p["wheel_dir"].name)
    return wheels[0]


def ensure_llama_server(p: dict[str, Path], flags: list[str], record: dict[str, object]) -> Path:
    """Build `llama-server` (server target only) from the sdist's vendored llama.cpp, once per flag set."""
    binary = p["llama_server"]
    if binary.exists():
        say(f"llama-server: cached ({binary.relative_to(REPO)})")
        return binary
    source = p["source"] / "vendor" / "llama.cpp"
    build = CACHE / "build" / p["server_dir"].name
    cmake = shutil.which("cmake")
    if cmake is None:
        raise SetupError("cmake is not installed; install it (Debian: apt-get install cmake g++) and rerun")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [cmake, "-S", str(source), "-B", str(build), *generator, *flags, *SERVER_ONLY_FLAGS]
    record["server_configure_s"] = run_logged(
        configure, CACHE / "logs" / "llama-server-configure.log", "configuring llama-server"
    )
    record["server_build_s"] = run_logged(
        [cmake, "--build", str(build), "--target", "llama-server", "-j2"],
        CACHE / "logs" / "llama-server-build.log",
        "building llama-server (about 10 min on 2 cores)",
    )
    built = build / "bin" / "llama-server"
    if not built.exists():
        raise SetupError(f"the build finished but {built} is missing; see {CACHE / 'logs'}")
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(built, binary)
    shutil.rmtree(build, ignore_errors=True)
    return binary


def main() -> int:
    """Build or reuse everything; exit non-zero with a clear message when a step fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print paths and flags, build nothing")
    parser.add_argument(
        "--skip",
        choices=["wheel", "server"],
        action="append",
        default=[],
        help="skip one of the two builds (development)",
    )
    args = parser.parse_args()
    flags = ggml_flags()
    p = paths()
    if args.print:
        print(json.dumps({"flags": flags, **{k: str(v) for k, v in p.items()}}, indent=2))
        return 0
    say(f"GGML flags for both peers: {' '.join(flags)}")
    record: dict[str, object] = {
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "ggml_flags": flags,
        "server_flags": SERVER_ONLY_FLAGS,
        "key": build_key(flags),
    }
    started = time.monotonic()
    try:
        ensure_venv(record)
        ensure_sdist(p)
        if "server" not in args.skip:
            record["llama_server"] = str(ensure_llama_server(p, flags, record).relative_to(REPO))
        if "wheel" not in args.skip:
            record["wheel"] = str(ensure_wheel(p, flags, record).relative_to(REPO))
    except SetupError as exc:
        print(f"[bench setup] ERROR: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"[bench setup] ERROR: {' '.join(map(str, exc.cmd))} failed with exit {exc.returncode}", file=sys.stderr)
        return 1
    previous = json.loads(p["record"].read_text()) if p["record"].exists() else {}
    previous.update(record)
    previous["last_setup_s"] = round(time.monotonic() - started, 1)
    p["record"].write_text(json.dumps(previous, indent=2) + "\n")
    say(f"ready in {previous['last_setup_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
