"""etcd as a supervised child of the agent: one member per box, peers and clients over mutual TLS.

Each agent runs its own etcd member (Debian `etcd-server`, 3.4) and talks to it through `aetcd` on 127.0.0.1.
Members talk to each other over HTTPS with client certificates from the cluster CA, so a box without a
certificate from that CA can neither join nor eavesdrop; every client listener (loopback included) requires a
cluster certificate too, so a local user without the node's key (0600, the agent's user) cannot read or write
cluster state. The agent decides membership (research/cluster.md, sections 2 and 6): a single box bootstraps a
one-voter cluster (`start_new`); a joining box is added as a learner by an existing member
(`etcd_members.add_learner`), starts with `start_joining`, and is promoted to voter (`etcd_members.promote`) when the
stack wants another voter (at most 3); the survivor of a 2-box stack re-forms a one-voter cluster from its own copy
of the data (`force_new_cluster`).

This module is the process control; `etcd_config` is how the member is configured (its flags), `etcd_members` the
membership RPCs.

The process is watched: if etcd exits on its own it is started again with backoff, and `stop()` (SIGTERM, then
SIGKILL after a bound) is the only way it ends. etcd runs in its own session, so a terminal's Ctrl-C reaches only
the agent, which stops it in order. `PR_SET_PDEATHSIG` would need a preexec hook, which is unsafe in a process with
threads, so instead: every start path kills the child if it is cancelled or fails, `stop()` runs from the owner's
`finally`, systemd's control-group kill covers a SIGKILLed agent, and a pid file lets the next start reap an etcd
left behind by an agent that died anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import aetcd
import structlog
from aetcd import rpc

from agent.cluster.etcd_client import ClientTls, TlsEtcdClient
from agent.cluster.etcd_config import EtcdConfig, PeerTls, child_env
from agent.cluster.etcd_members import EtcdError, EtcdStatus, call_rpc, status

log = structlog.get_logger("agent.cluster.etcd")
_SETPRIV = shutil.which("setpriv")  # looked up once at import, never on the event loop

NOT_INSTALLED = "etcd is not installed (Debian package etcd-server; scripts/system-deps.sh installs it)"

_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 10.0
# A process that stayed up this long crashed once; it is not crash-looping, so its restart starts from the floor.
_STABLE_AFTER_S = 30.0
_TAIL_LINES = 40
_ERROR_TAIL_LINES = 8
_REMOVED_MESSAGE = b"the member has been permanently removed from the cluster"
_READ_CHUNK = 64 * 1024

_Mode = Literal["new", "join", "existing", "force"]


class MemberRemoved(EtcdError):
    """This box's member was removed from its cluster (it was gone longer than cluster.remove_after_seconds)."""


class _BoundedLog:
    """etcd's stderr on disk, size-bounded: past `max_bytes` the file moves to `.1` and a new one starts."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.failed = False

    def append(self, data: bytes) -> None:
        """Blocking: runs in a worker thread."""
        try:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size and size + len(data) > self.max_bytes:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            with self.path.open("ab") as handle:
                handle.write(data)
            self.failed = False
        except OSError as exc:
            if not self.failed:  # once per outage, not per line
                log.warning("etcd_log_write_failed", path=str(self.path), error=str(exc))
            self.failed = True


class EtcdMember:
    """This box's etcd member as a supervised child process; use as `async with` or call `stop()` in a finally."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._restart_args: list[str] = []
        self._started_at = 0.0
        self._stopping = False
        self._tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._removed = False  # etcd said this member was removed from its cluster
        # Told when the running member is removed from its cluster: restarting it cannot help, its owner decides.
        self.on_removed: Callable[[], None] | None = None
        self._log = _BoundedLog(config.log_file, config.log_max_bytes)
        self._client: aetcd.Client | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> EtcdMember:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def pid(self) -> int | None:
        """The running etcd's process id, or None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def stderr_tail(self, lines: int = _TAIL_LINES) -> list[str]:
        """The last lines etcd wrote to stderr, made readable (level, message, error)."""
        return [_readable(line) for line in list(self._tail)[-lines:]]

    # ------------------------------------------------------------------ start paths

    async def start_new(self, cluster_id: str, *, timeout: float | None = None) -> EtcdStatus:
        """Bootstrap a new single-voter cluster with this member; return once it serves."""
        # The token makes etcd derive member and cluster ids from this cluster's id, so two stacks bootstrapped
        # with the same names and addresses still get different ids and refuse each other's raft traffic.
        token = "magstack-" + hashlib.sha256(cluster_id.encode()).hexdigest()[:32]
        flags = [
            "--initial-cluster-state",
            "new",
            "--initial-cluster",
            f"{self.config.name}={self.config.peer_url}",
            "--initial-cluster-token",
            token,
        ]
        status = await self._start("new", flags, timeout)
        assert status is not None
        return status

    async def start_joining(self, initial_cluster: str, *, timeout: float | None = None) -> EtcdStatus:
        """Join the cluster that already added this member (see `add_learner`); return once it serves."""
        own = f"{self.config.name}={self.config.peer_url}"
        if own not in initial_cluster.split(","):
            raise EtcdError(
                f"initial cluster {initial_cluster!r} does not list this member as {own!r}; pass the "
                "string add_learner() returned for this node"
            )
        flags = ["--initial-cluster-state", "existing", "--initial-cluster", initial_cluster]
        status = await self._start("join", flags, timeout)
        assert status is not None
        return status

    async def start_existing(self, *, timeout: float | None = None, wait_ready: bool = True) -> EtcdStatus | None:
        """Restart this member from its data dir (after an agent restart).

        etcd ignores every --initial-cluster flag once its data dir holds a member, so none are passed. A member
        of a multi-voter cluster serves only once a quorum is back; with `wait_ready=False` this returns as soon as
        the process runs (the watcher supervises it) and `wait_ready()` can be awaited later.
        """
        return await self._start("existing", [], timeout, wait=wait_ready)

    async def force_new_cluster(self, *, cluster_id: str | None = None, timeout: float | None = None) -> EtcdStatus:
        """Re-form a single-voter cluster from this member's own copy (the 2-box survivor); return once it serves.

        A voter restarts with `--force-new-cluster`: etcd rewrites the membership to this member alone and keeps
        data, revisions and leases. The flag is used for this one launch only: a later restart by the watcher is a
        plain restart, which must never rewrite membership again (the stack may have grown back in between).

        etcd 3.4 cannot do that from a learner's data (raft panics: "removed all voters"). A learner whose etcd
        still runs serves serializable reads from its copy even with the leader gone, so instead its keys are read
        out, its data dir is set aside (`<data_dir>.replaced`), a new cluster is bootstrapped with `cluster_id`, and
        the keys are written back. Keys bound to a lease are not copied: their leases belonged to the old cluster,
        and a copy would be a claim (the leader key) that never expires.
        """
        learner = False
        if self._proc is not None:
            with contextlib.suppress(EtcdError):
                learner = (await status(await self.client(), timeout=1.0)).is_learner
        if learner:
            if cluster_id is None:
                raise EtcdError(
                    f"etcd member {self.config.name} is a learner: etcd 3.4 cannot force a new cluster "
                    "from its data; pass cluster_id to re-form the cluster from a copy of its keys"
                )
            return await self._reform_from_learner(cluster_id, timeout)
        if self._proc is not None:
            await self.stop()
        try:
            status_ = await self._start("force", ["--force-new-cluster"], timeout)
        except EtcdError as exc:
            if "removed all voters" not in str(exc):
                raise
            raise EtcdError(
                f"etcd member {self.config.name} was a learner: etcd 3.4 cannot force a new cluster from "
                "a learner's data, and its copy can be read only while its etcd still runs; start a "
                "new cluster instead"
            ) from exc
        assert status_ is not None
        return status_

    async def _reform_from_learner(self, cluster_id: str, timeout: float | None) -> EtcdStatus:
        client = await self.client()
        answer = await call_rpc(
            client,
            "kvstub",
            "Range",
            rpc.RangeRequest(key=b"\0", range_end=b"\0", serializable=True),
            "reading the copy",
        )
        keep = [(kv.key, kv.value) for kv in answer.kvs if not kv.lease]
        await self.stop()
        aside = await asyncio.to_thread(_set_aside, self.config.data_dir)
        reformed = await self.start_new(cluster_id, timeout=timeout)
        client = await self.client()
        for start in range(0, len(keep), 100):  # etcd allows 128 operations per transaction
            puts = [rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=v)) for k, v in keep[start : start + 100]]
            await call_rpc(client, "kvstub", "Txn", rpc.TxnRequest(success=puts), "restoring the copy")
        log.warning(
            "etcd_reformed_from_learner",
            member=self.config.name,
            keys=len(keep),
            dropped_leased=len(answer.kvs) - len(keep),
            set_aside=str(aside),
        )
        return reformed

    async def wait_ready(self, timeout: float | None = None) -> EtcdStatus:
        """Wait until the member answers Status on its client port and follows a leader."""
        return await self._wait_ready(self.config.start_timeout_s if timeout is None else timeout)

    async def client(self) -> aetcd.Client:
        """This member's aetcd client, on loopback over mutual TLS (one per member, created on first use, closed
        by `stop()`)."""
        if self._client is None:
            tls = await asyncio.to_thread(_read_client_tls, self.config.tls)
            self._client = TlsEtcdClient(
                [self.config.client_url], tls, timeout=self.config.request_timeout_s, server_name=self.config.name
            )
        await self._client.connect()
        return self._client

    async def stop(self, *, graceful: bool = True) -> None:
        """Stop etcd and its supervision: SIGTERM, wait up to stop_timeout_s, then SIGKILL (at once if not graceful).

        A graceful stop of the raft leader hands leadership over first, so the others do not wait for an election.
        """
        self._stopping = True
        watcher, self._watcher = self._watcher, None
        try:
            if watcher is not None:
                watcher.cancel()
                await asyncio.wait({watcher})  # not `await watcher`: our own cancellation must still propagate
            await self._close_client()
        finally:  # even when stop() itself is cancelled, etcd goes
            await self._end_process(graceful)
        await asyncio.to_thread(_unlink, self.config.pid_file)

    # ------------------------------------------------------------------ internals

    async def _start(
        self, mode: _Mode, flags: list[str], timeout: float | None, *, wait: bool = True
    ) -> EtcdStatus | None:
        async with self._lock:
            if self._proc is not None:
                raise EtcdError(
                    f"etcd member {self.config.name} is already running (pid {self._proc.pid}); stop() it first"
                )
            binary = await asyncio.to_thread(_find_binary, self.config.etcd_binary)
            stale = await asyncio.to_thread(self._prepare, mode)
            if stale is not None:
                log.warning("etcd_stale_killed", member=self.config.name, pid=stale)
            self._stopping = False
            try:
                await self._launch([binary, *self.config.flags(), *flags])
                status = (
                    await self._wait_ready(self.config.start_timeout_s if timeout is None else timeout)
                    if wait
                    else None
                )
            except BaseException:
                await self._end_process(graceful=False)  # kills before its first await: never left behind
                await self._close_client()
                raise
            # Later restarts replay these flags: etcd ignores the bootstrap ones once the data dir holds a member,
            # and a bootstrap that crashed half way is retried as it was first asked for.
            self._restart_args = [binary, *self.config.flags(), *(flags if mode != "force" else [])]
            self._watcher = asyncio.create_task(self._watch(), name=f"etcd-watch-{self.config.name}")
            return status

    def _prepare(self, mode: _Mode) -> int | None:
        """Blocking (worker thread): check files and data dir; reap an etcd an earlier agent left behind."""
        cfg = self.config
        for label, path in (("CA", cfg.tls.ca), ("certificate", cfg.tls.cert), ("key", cfg.tls.key)):
            if not path.is_file():
                raise EtcdError(f"etcd peer TLS {label} file {path} does not exist")
        try:
            cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(cfg.data_dir, 0o700)  # etcd warns about (3.4) or refuses (3.5) wider permissions
            if not os.access(cfg.data_dir, os.R_OK | os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "not writable by this user")
            initialized = _member_initialized(cfg.data_dir)
        except OSError as exc:
            raise EtcdError(f"etcd data dir {cfg.data_dir} is unusable: {exc.strerror or exc}") from exc
        if mode in ("new", "join") and initialized:
            raise EtcdError(
                f"etcd data dir {cfg.data_dir} already holds a member; restart it with start_existing(), "
                "or remove the directory to start afresh"
            )
        if mode in ("existing", "force") and not initialized:
            raise EtcdError(f"etcd data dir {cfg.data_dir} holds no member; start a new cluster or join one")
        return _reap_stale(cfg.pid_file, cfg.data_dir)

    async def _launch(self, args: list[str]) -> None:
        self._tail.clear()
        self._removed = False
        # etcd must not outlive the agent, even one killed with SIGKILL (a box "yanked" in a test, an OOM kill):
        # an orphaned member would keep answering for a node that is gone. setpriv (util-linux, present on every
        # Debian/Ubuntu/JetPack image) asks the kernel to SIGKILL etcd when its parent dies, then execs etcd under
        # the same pid. The parent is the thread that forked: asyncio spawns from the loop thread, which lives as
        # long as the agent.
        proc = await asyncio.create_subprocess_exec(
            *([_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV else []),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=child_env(),
            start_new_session=True,
        )
        self._proc = proc
        self._started_at = time.monotonic()
        assert proc.stderr is not None
        self._drain = asyncio.create_task(self._drain_stderr(proc.stderr), name=f"etcd-stderr-{self.config.name}")
        log.info("etcd_started", member=self.config.name, pid=proc.pid, restarts=self.restarts)
        await asyncio.to_thread(_write_pid, self.config.pid_file, proc.pid)

    async def _drain_stderr(self, stream: asyncio.StreamReader) -> None:
        """Read etcd's stderr as fast as it comes (a full pipe would stall etcd) into the tail and etcd.log."""
        partial = b""
        while chunk := await stream.read(_READ_CHUNK):
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()[-4096:]
            self._tail.extend(line.decode("utf-8", "replace") for line in lines if line.strip())
            # Said once, then buried under tens of shutdown lines: remembered here, not looked for in the tail.
            self._removed = self._removed or any(_REMOVED_MESSAGE in line for line in lines)
            await asyncio.to_thread(self._log.append, chunk)
        if partial.strip():
            self._tail.append(partial.decode("utf-8", "replace"))

    async def _finish_drain(self) -> None:
        """After exit: let the drain read what etcd wrote last, so errors carry its final words."""
        drain = self._drain
        if drain is not None and not drain.done():
            await asyncio.wait({drain}, timeout=1.0)

    async def _wait_ready(self, timeout: float) -> EtcdStatus:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        client = await self.client()
        waiting_for = "no answer on its client port yet"
        while True:
            proc = self._proc
            if proc is None or proc.returncode is not None:
                await self._finish_drain()
                raise self._exit_error(None if proc is None else proc.returncode)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise EtcdError(
                    f"etcd member {self.config.name} did not become ready on {self.config.client_url} "
                    f"within {timeout:.0f}s ({waiting_for}; a member serves only once it follows a raft "
                    f"leader, which needs a quorum of voters up); etcd said: {self._said()}"
                )
            try:
                answer = await status(client, timeout=min(1.0, remaining))
            except EtcdError as exc:
                waiting_for = str(exc)
            else:
                if answer.leader_id:
                    return answer
                waiting_for = "it follows no raft leader yet"
            await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))

    def _said(self) -> str:
        """etcd's last words worth reading: its warnings and errors if any (not raft chatter or stack frames)."""
        lines = self.stderr_tail()
        worth = [line for line in lines if line.startswith(("warn", "error", "fatal", "panic", "dpanic"))]
        return " | ".join((worth or lines)[-_ERROR_TAIL_LINES:]) or "(nothing on stderr)"

    def _exit_error(self, code: int | None) -> EtcdError:
        text = "\n".join(self._tail)
        in_use = re.search(r"listen tcp ([^\s\"]+): bind: address already in use", text)
        if in_use:
            return EtcdError(
                f"etcd member {self.config.name} cannot listen on {in_use.group(1)}: the port is in use "
                "by another process; stop it or choose another port"
            )
        if self._removed:
            return MemberRemoved(
                f"etcd member {self.config.name} was removed from the cluster; clear "
                f"{self.config.data_dir} and join again"
            )
        if "data-dir" in text and ("permission denied" in text or "cannot access" in text):
            return EtcdError(f"etcd data dir {self.config.data_dir} is unusable; etcd said: {self._said()}")
        return EtcdError(
            f"etcd member {self.config.name} exited with code {code} while starting; etcd said: {self._said()}"
        )

    async def _watch(self) -> None:
        """Restart etcd whenever it exits on its own, with backoff (0.5 s doubling to 10 s)."""
        delay = _BACKOFF_MIN_S
        while True:
            proc = self._proc
            if proc is not None:
                code = await proc.wait()
                await self._finish_drain()
                if self._stopping:
                    return
                log.warning(
                    "etcd_exited",
                    member=self.config.name,
                    pid=proc.pid,
                    code=code,
                    stderr_tail=self.stderr_tail(_ERROR_TAIL_LINES),
                )
                self._proc = None
                if self._removed and self.on_removed is not None:
                    log.error("etcd_member_removed", member=self.config.name)
                    self.on_removed()
                    return
                if time.monotonic() - self._started_at >= _STABLE_AFTER_S:
                    delay = _BACKOFF_MIN_S
            log.warning("etcd_restarting", member=self.config.name, delay_s=delay, restarts=self.restarts + 1)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)
            self.restarts += 1
            try:
                await self._launch(self._restart_args)
            except OSError as exc:
                log.error("etcd_restart_failed", member=self.config.name, error=str(exc))

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await asyncio.wait_for(client.close(), 2.0)
            except (TimeoutError, asyncio.TimeoutError):
                log.warning("etcd_client_close_timeout", member=self.config.name)

    async def _end_process(self, graceful: bool) -> None:
        """Terminate etcd and wait for it; on cancellation it is still killed (never left running)."""
        proc = self._proc
        try:
            if proc is not None and proc.returncode is None:
                if graceful:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
                    try:
                        await asyncio.wait_for(asyncio.shield(proc.wait()), self.config.stop_timeout_s)
                    except (TimeoutError, asyncio.TimeoutError):
                        log.warning(
                            "etcd_stop_timeout",
                            member=self.config.name,
                            pid=proc.pid,
                            timeout_s=self.config.stop_timeout_s,
                        )
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
                log.info("etcd_stopped", member=self.config.name, pid=proc.pid, code=proc.returncode)
        finally:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            self._proc = None
            drain, self._drain = self._drain, None
            if drain is not None and not drain.done():
                drain.cancel()


# ---------------------------------------------------------------------- blocking helpers (worker threads)


def _find_binary(configured: str | None) -> str:
    binary = shutil.which(configured or "etcd")
    if binary is None:
        raise EtcdError(NOT_INSTALLED if configured is None else f"{NOT_INSTALLED}: no executable at {configured}")
    return binary


def _member_initialized(data_dir: Path) -> bool:
    """etcd's own test: a member exists once its WAL directory holds a WAL file."""
    wal = data_dir / "member" / "wal"
    return wal.is_dir() and any(p.suffix == ".wal" for p in wal.iterdir())


def _reap_stale(pid_file: Path, data_dir: Path) -> int | None:
    """Kill an etcd an earlier agent started on this data dir and never stopped (it died first); return its pid."""
    try:
        pid = int(pid_file.read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if pid == os.getpid() or str(data_dir).encode() not in argv or not any(a.endswith(b"etcd") for a in argv[:1]):
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for _ in range(100):  # SIGKILL is not instant: wait until it has let go of the ports and the data dir lock
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except (OSError, IndexError):
            break
        time.sleep(0.05)
    return pid


def _set_aside(data_dir: Path) -> Path:
    """Keep the data a re-formed cluster replaced (one generation) for inspection, instead of deleting it."""
    aside = data_dir.with_name(data_dir.name + ".replaced")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(data_dir, aside)
    return aside


def _read_client_tls(tls: PeerTls) -> ClientTls:
    try:
        return ClientTls(tls.ca.read_bytes(), tls.cert.read_bytes(), tls.key.read_bytes())
    except OSError as exc:
        raise EtcdError(f"the node's TLS files for etcd cannot be read: {exc}") from exc


def _write_pid(path: Path, pid: int) -> None:
    path.write_text(f"{pid}\n")


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _readable(line: str) -> str:
    """A zap JSON log line as `level: message key=value`, keeping what explains a failure; others as they are."""
    try:
        entry = json.loads(line)
    except ValueError:
        return line.strip()[:400]
    if not isinstance(entry, dict):
        return line.strip()[:400]
    keys = ("error", "address", "remote-peer-id", "data-dir", "path")
    extras = " ".join(f"{key}={entry[key]}" for key in keys if key in entry)
    return f"{entry.get('level', '?')}: {entry.get('msg', '')} {extras}".strip()[:400]
