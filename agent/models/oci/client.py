"""The OCI distribution API of one registry, over aiohttp.

Anonymous access (a registry on loopback or the fleet's LAN); every failure is a RegistryError whose message names
the registry and says what it answered, and whose `status`/`code` are what the APIs answer with.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from agent.errors import ThoxError
from agent.models.oci.artifact import MANIFEST_MEDIA_TYPE, ArtifactError, Reference, sha256_digest

_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
_SMALL_DOCUMENT = 4 << 20  # manifests and cards; anything bigger is not one


class RegistryError(ThoxError):
    """The registry refused or could not be reached; `status` and `code` are what the APIs answer with."""

    status = 502
    code = "registry_error"


class RegistryUnreachableError(RegistryError):
    status = 503
    code = "registry_unavailable"


class NotInRegistryError(RegistryError):
    status = 404
    code = "model_not_found"


class OciRegistry:
    """The registry at `url` (e.g. http://127.0.0.1:5390)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=_TIMEOUT)

    def blob_url(self, name: str, digest: str) -> str:
        return f"{self.url}/v2/{name}/blobs/{digest}"

    async def catalog(self, session: aiohttp.ClientSession) -> list[str]:
        """Every repository (model name) the registry holds."""
        names: list[str] = []
        path: str | None = "/v2/_catalog?n=1000"
        while path is not None:
            async with self._call(session, "GET", path) as answer:
                await self._expect(answer, 200, "list its models")
                names += (await answer.json())["repositories"] or []
                path = _next_page(answer)
        return sorted(names)

    async def tags(self, session: aiohttp.ClientSession, name: str) -> list[str]:
        """The tags of `name` ([] when the registry has no such model)."""
        async with self._call(session, "GET", f"/v2/{name}/tags/list") as answer:
            if answer.status == 404:
                return []
            await self._expect(answer, 200, f"list the tags of {name}")
            return sorted((await answer.json()).get("tags") or [])

    async def manifest(self, session: aiohttp.ClientSession, reference: Reference) -> tuple[dict[str, Any], str]:
        """The manifest `reference` names and its digest; NotInRegistryError names what exists instead."""
        headers = {"Accept": MANIFEST_MEDIA_TYPE}
        async with self._call(session, "GET", f"/v2/{reference.name}/manifests/{reference.tag}", headers) as answer:
            if answer.status == 404:
                raise await self._not_found(session, reference)
            await self._expect(answer, 200, f"give the manifest of {reference}")
            raw = await answer.content.read(_SMALL_DOCUMENT + 1)
        if len(raw) > _SMALL_DOCUMENT:
            raise RegistryError(f"the manifest of {reference} at {self.url} is too large to be a model's")
        try:
            return json.loads(raw), sha256_digest(raw)
        except ValueError as exc:
            raise RegistryError(f"the manifest of {reference} at {self.url} is not JSON: {exc}") from exc

    async def document(self, session: aiohttp.ClientSession, name: str, digest: str) -> dict[str, Any]:
        """A small JSON blob (a model's card), checked against its digest."""
        async with self._call(session, "GET", f"/v2/{name}/blobs/{digest}") as answer:
            await self._expect(answer, 200, f"give the blob {digest} of {name}")
            raw = await answer.content.read(_SMALL_DOCUMENT + 1)
        if len(raw) > _SMALL_DOCUMENT or sha256_digest(raw) != digest:
            raise RegistryError(f"the blob {digest} of {name} at {self.url} does not match its digest")
        try:
            found = json.loads(raw)
        except ValueError as exc:
            raise RegistryError(f"the blob {digest} of {name} at {self.url} is not JSON: {exc}") from exc
        if not isinstance(found, dict):
            raise RegistryError(f"the blob {digest} of {name} at {self.url} is not a JSON object")
        return found

    async def has_blob(self, session: aiohttp.ClientSession, name: str, digest: str) -> bool:
        async with self._call(session, "HEAD", f"/v2/{name}/blobs/{digest}") as answer:
            return answer.status == 200

    async def upload_blob(
        self,
        session: aiohttp.ClientSession,
        name: str,
        digest: str,
        size: int,
        body: Callable[[], AsyncIterator[bytes]] | bytes,
    ) -> None:
        """Upload one blob (monolithic: a POST opens the upload, a PUT with the digest sends and closes it)."""
        async with self._call(session, "POST", f"/v2/{name}/blobs/uploads/") as answer:
            await self._expect(answer, 202, f"start an upload to {name}")
            location = answer.headers.get("Location", "")
        url = location if location.startswith("http") else f"{self.url}{location}"
        separator = "&" if "?" in url else "?"
        data = body if isinstance(body, bytes) else body()
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        try:
            async with session.put(f"{url}{separator}digest={digest}", data=data, headers=headers) as answer:
                await self._expect(answer, 201, f"take the blob {digest} of {name}")
        except aiohttp.ClientConnectionError as exc:
            raise RegistryUnreachableError(f"the model registry at {self.url} broke off an upload: {exc}") from exc

    async def put_manifest(self, session: aiohttp.ClientSession, reference: Reference, raw: bytes) -> None:
        headers = {"Content-Type": MANIFEST_MEDIA_TYPE}
        path = f"/v2/{reference.name}/manifests/{reference.tag}"
        async with self._call(session, "PUT", path, headers, data=raw) as answer:
            await self._expect(answer, 201, f"take the manifest of {reference}")

    # ----------------------------------------------------------------- helpers

    def _call(
        self, session: aiohttp.ClientSession, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any
    ) -> _Call:
        return _Call(session.request(method, f"{self.url}{path}", headers=headers, **kw), self.url)

    async def _expect(self, answer: aiohttp.ClientResponse, status: int, what: str) -> None:
        if answer.status == status:
            return
        detail = (await answer.text())[:300].strip()
        raise RegistryError(f"the model registry at {self.url} did not {what}: HTTP {answer.status} {detail}")

    async def _not_found(self, session: aiohttp.ClientSession, reference: Reference) -> NotInRegistryError:
        tags = await self.tags(session, reference.name)
        if tags:
            return NotInRegistryError(
                f"the model registry at {self.url} has no tag {reference.tag!r} of {reference.name}; "
                f"its tags: {', '.join(tags)}"
            )
        names = await self.catalog(session)
        return NotInRegistryError(
            f"the model registry at {self.url} has no model {reference.name!r}; "
            f"its models: {', '.join(names) or 'none'}"
        )


class _Call:
    """A request whose connection failures become RegistryUnreachableError naming the registry."""

    def __init__(self, request: Any, url: str) -> None:
        self._request = request
        self._url = url

    async def __aenter__(self) -> aiohttp.ClientResponse:
        try:
            return await self._request.__aenter__()  # type: ignore[no-any-return]
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise RegistryUnreachableError(f"the model registry at {self._url} is unreachable: {exc}") from exc

    async def __aexit__(self, *exc: object) -> None:
        await self._request.__aexit__(*exc)


def _next_page(answer: aiohttp.ClientResponse) -> str | None:
    """The catalog's next page, from its `Link: </v2/_catalog?last=...&n=...>; rel="next"` header."""
    link = answer.headers.get("Link", "")
    if 'rel="next"' not in link:
        return None
    return link.split(";")[0].strip().strip("<>")


__all__ = ["ArtifactError", "NotInRegistryError", "OciRegistry", "RegistryError", "RegistryUnreachableError"]
