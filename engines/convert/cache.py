"""Convert a GGUF into the on-disk ONNX cache, atomically, keyed by the GGUF's sha256 and graph flavour.

A conversion is assembled in a temp folder and renamed into place only when complete, so a crash, a kill or a
full disk never leaves an entry a later start would take for finished. A disk too small for the conversion is
reported as `CacheSpaceError`, naming the folder and what to do, before the conversion starts where that is
known up front, else as soon as a write fails.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from engines.base import EngineError, ModelFormatError, ProgressFn
from engines.convert.external import ExternalDataWriter
from engines.convert.fused import build_fused_graph
from engines.convert.gguf_model import GgufModel, LlamaConfig
from engines.convert.graph import OPSET, LogitsMode, build_graph

# "standard": opset-21 standard ops only (DequantizeLinear int4 + MatMul), for TensorRT and any ONNX runtime.
# "fused": ONNX Runtime CPU contrib ops (MatMulNBits, GroupQueryAttention, SkipSimplifiedLayerNormalization); the
# fast CPU graph, with a fixed-capacity KV cache the executor shares between past and present.
GraphFlavour = Literal["standard", "fused"]
FLAVOURS: tuple[GraphFlavour, ...] = ("standard", "fused")
DEFAULT_FLAVOUR: GraphFlavour = "fused"

# Bump whenever the emitted graph changes: entries written by another version are converted again.
CONVERTER_VERSION = "2"  # 2: graph flavours (fused contrib-op graph beside the standard one)
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
META_FILE = "meta.json"
_TMP_PREFIX = ".tmp-"
_HASH_CHUNK = 4 << 20
# Errors of a disk that is full (or a quota that is used up).
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# A decoder entry keeps every weight's bytes (GGUF blocks are repacked, never recompressed), so it needs at least
# about the GGUF's size; the tenth left out is the GGUF's own metadata (vocabulary, chat template), not converted.
_DECODER_MIN_FRACTION = 0.9
_WHAT_TO_DO = "free space there, or put the cache on a bigger disk (the agent's cache_dir, THOX_CACHE_DIR)"


class CacheSpaceError(EngineError):
    """The disk holding the converted-model cache has no room for a conversion; the message says where and what
    to do."""


T = TypeVar("T")


@dataclass(frozen=True)
class ConvertedModel:
    """A finished cache entry: the ONNX files and the config they were built from."""

    directory: Path
    config: LlamaConfig
    flavour: str
    logits: LogitsMode
    gguf_sha256: str

    @property
    def graph(self) -> GraphFlavour:
        """Which graph this entry holds: "standard" or "fused" (the first part of `flavour`)."""
        return cast(GraphFlavour, self.flavour.split("-", 1)[0])

    @property
    def model_path(self) -> Path:
        """The graph file (weights live in `data_path`, found by ONNX Runtime relative to it)."""
        return self.directory / MODEL_FILE

    @property
    def data_path(self) -> Path:
        """The external-data file holding every weight."""
        return self.directory / DATA_FILE

    @property
    def meta_path(self) -> Path:
        """meta.json: config, converter version, flavour, GGUF hash."""
        return self.directory / META_FILE

    @classmethod
    def load(cls, directory: Path) -> ConvertedModel:
        """Open an entry; ModelFormatError if it is incomplete or from another converter version."""
        try:
            meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"{directory}: no readable {META_FILE} ({exc})") from exc
        if meta.get("converter_version") != CONVERTER_VERSION:
            raise ModelFormatError(
                f"{directory}: converted by converter version {meta.get('converter_version')!r}, "
                f"this is {CONVERTER_VERSION!r}"
            )
        for name in (MODEL_FILE, DATA_FILE):
            if not (directory / name).is_file():
                raise ModelFormatError(f"{directory}: {name} is missing")
        try:
            return cls(
                directory=directory,
                config=LlamaConfig.from_json(meta["config"]),
                flavour=meta["flavour"],
                logits=meta["logits"],
                gguf_sha256=meta["gguf_sha256"],
            )
        except (KeyError, TypeError) as exc:
            raise ModelFormatError(f"{directory}: {META_FILE} lacks or mistypes {exc}") from exc


def flavour_name(logits: LogitsMode, flavour: GraphFlavour = DEFAULT_FLAVOUR) -> str:
    """Cache sub-directory name of a graph variant: "<graph flavour>-<logits for the last or every position>"."""
    if logits not in ("last", "all"):
        raise ValueError(f"logits must be 'last' or 'all', not {logits!r}")
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, not {flavour!r}")
    return f"{flavour}-{logits}"


def sha256_file(path: Path, progress: ProgressFn | None = None) -> str:
    """Hex sha256 of a file, read in chunks (reports stage "hash" in bytes)."""
    total = path.stat().st_size
    digest = hashlib.sha256()
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress("hash", done, total)
    return digest.hexdigest()


def write_durably(path: Path, data: bytes) -> None:
    """Write a new file and fsync it (cache entries are renamed into place only once durable)."""
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    logits: LogitsMode = "last",
    flavour: GraphFlavour = DEFAULT_FLAVOUR,
    sha256: str = "",
    progress: ProgressFn | None = None,
) -> LlamaConfig:
    """Write model.onnx, model.onnx.data and meta.json into the existing directory `out_dir`, fsynced."""
    name = flavour_name(logits, flavour)
    build = build_fused_graph if flavour == "fused" else build_graph
    if progress is not None:
        progress("read", 0, 1)
    model = GgufModel(gguf_path)
    if progress is not None:
        progress("read", 1, 1)
    with (out_dir / DATA_FILE).open("wb") as data:
        writer = ExternalDataWriter(data, DATA_FILE)
        proto = build(model, writer, logits=logits, progress=progress)
        if progress is not None:
            progress("write", 0, 2)
        writer.sync()
    if progress is not None:
        progress("write", 1, 2)
    with (out_dir / MODEL_FILE).open("wb") as f:
        f.write(proto.SerializeToString())
        f.flush()
        os.fsync(f.fileno())
    meta: dict[str, Any] = {
        "converter_version": CONVERTER_VERSION,
        "flavour": name,
        "logits": logits,
        "opset": OPSET,
        "domains": sorted({o.domain or "ai.onnx" for o in proto.opset_import}),
        "gguf_sha256": sha256,
        "gguf_name": gguf_path.name,
        "bos_token_id": model.config.bos_token_id,
        "eos_token_id": model.config.eos_token_id,
        "config": model.config.to_json(),
    }
    with (out_dir / META_FILE).open("w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    if progress is not None:
        progress("write", 2, 2)
    return model.config


def _remove_stale_temps(parent: Path) -> None:
    # Temp dirs carry their creator's pid; one whose process is gone was left by a crash and is only garbage.
    for entry in parent.glob(_TMP_PREFIX + "*"):
        try:
            pid = int(entry.name[len(_TMP_PREFIX) :].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def ensure_entry(
    cache_root: Path,
    digest: str,
    flavour: str,
    build: Callable[[Path], object],
    load: Callable[[Path], T],
    *,
    label: str = "the model",
    min_bytes: int = 0,
) -> T:
    """Return `load(cache_root/onnx/<digest>/<flavour>)`, running `build(temp dir)` first if that fails.

    `build` fills an empty temp dir under `cache_root/onnx`, which is renamed into place only when complete, so a
    crash or an exception never leaves a half-written entry; `load` raises ModelFormatError for a missing,
    incomplete or outdated entry. CacheSpaceError, before building, when the disk has less than `min_bytes` free
    (the least the entry can take), and when it fills up during the build (`label` names what was converted).
    """
    final = cache_root / "onnx" / digest / flavour
    with contextlib.suppress(ModelFormatError):
        return load(final)

    work = cache_root / "onnx"
    try:
        return _build_entry(work, final, build, load, label, min_bytes)
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            raise
        # The unfinished conversion is gone by now, so what is free is what it had, and it needed more.
        raise CacheSpaceError(
            f"no space left in the model cache {cache_root} while converting {label}: the conversion needs more "
            f"than the {_mb(_free_bytes(work))} that disk has free; {_WHAT_TO_DO}"
        ) from exc


def _build_entry(
    work: Path, final: Path, build: Callable[[Path], object], load: Callable[[Path], T], label: str, min_bytes: int
) -> T:
    work.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(work)  # what a killed conversion left: free it before counting what is free
    free = _free_bytes(work)
    if free < min_bytes:
        raise CacheSpaceError(
            f"not enough space in the model cache {work.parent} to convert {label}: it needs at least "
            f"{_mb(min_bytes)}, {_mb(free)} free; {_WHAT_TO_DO}"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-", dir=work))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished entry should be readable like any cache file
        build(tmp)
        _fsync_path(tmp)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            # An outdated or broken entry: move it aside first, since rename cannot replace a non-empty dir.
            aside = final.rename(work / f"{_TMP_PREFIX}{os.getpid()}-old-{os.urandom(4).hex()}")
            shutil.rmtree(aside, ignore_errors=True)
        try:
            tmp.rename(final)
        except OSError:
            # Another process finished the same conversion first; its entry is as good as ours.
            with contextlib.suppress(ModelFormatError):
                return load(final)
            raise
        _fsync_path(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load(final)


def _free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the disk holding `path` (0 when it cannot be read)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _mb(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def ensure_converted(
    gguf_path: Path,
    cache_root: Path,
    *,
    sha256: str | None = None,
    progress: ProgressFn | None = None,
    logits: LogitsMode = "last",
    flavour: GraphFlavour = DEFAULT_FLAVOUR,
) -> ConvertedModel:
    """Return the cached conversion of `gguf_path`, converting it first if needed.

    The entry lives in `cache_root/onnx/<sha256>/<flavour>-<logits>` (see `flavour_name`, `ensure_entry`).
    """
    name = flavour_name(logits, flavour)  # validates before the (slow) hash
    digest = sha256 or sha256_file(gguf_path, progress)
    return ensure_entry(
        cache_root,
        digest,
        name,
        lambda tmp: convert_gguf(gguf_path, tmp, logits=logits, flavour=flavour, sha256=digest, progress=progress),
        ConvertedModel.load,
        label=gguf_path.name,
        min_bytes=int(gguf_path.stat().st_size * _DECODER_MIN_FRACTION),
    )
