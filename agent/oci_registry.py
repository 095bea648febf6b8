"""A small client of the OCI distribution API (what Docker's registry, distribution
2.8, Harbor, Zot, GHCR and ECR speak), for checkpoint images.

Only what pushing and pulling one image needs: blob existence, streamed blob upload
(POST, then PATCH with the bytes, then PUT with the digest, so a multi-GB layer is
hashed while it is sent and never staged on disk), manifest put and get, streamed
blob download with its digest and size checked. Anonymous access; TLS unless the
registry is named in `[oci] plain_http`.

References and everything a registry sends back (manifests, digests, sizes) are
validated before use; a blob whose bytes do not hash to its digest is DataLoss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import ssl
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from kybernate.agent import naming
from kybernate.errors import DataLoss, InvalidArgument, NotFound, PermissionDenied, Unavailable

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_MAX_BYTES = 4 << 20
_CHUNK = 1 << 20
_REDIRECTS = 3


@dataclasses.dataclass(frozen=True)
class Reference:
    """registry/repository[:tag][@sha256:digest], every part validated."""

    registry: str
    repository: str
    tag: str = ""
    digest: str = ""

    @classmethod
    def parse(cls, text: str) -> Reference:
        value = text.strip()
        if "://" in value or not value:
            raise InvalidArgument(f"{text[:120]!r} is not an OCI reference (registry/repository:tag)")
        registry, slash, rest = value.partition("/")
        if not slash or not rest:
            raise InvalidArgument(f"{text[:120]!r} names no registry: write registry[:port]/repository:tag")
        name, at, digest = rest.partition("@")
        repository, colon, tag = name.rpartition(":") if ":" in name else (name, "", "")
        if not colon:
            repository, tag = name, ""
        reference = cls(naming.registry_host(registry), naming.repository(repository),
                        naming.image_tag(tag) if tag else "", naming.digest(digest) if at else "")
        if not reference.tag and not reference.digest:
            reference = dataclasses.replace(reference, tag="latest")
        return reference

    @property
    def manifest_reference(self) -> str:
        return self.digest or self.tag

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        return text + (f"@{self.digest}" if self.digest else "")


class RegistryClient:
    """One registry host. Every method blocks; call it from a thread."""

    def __init__(self, registry: str, *, plain_http: bool, timeout_s: float = 60.0) -> None:
        self.registry = naming.registry_host(registry)
        self._plain_http = plain_http
        self._timeout_s = timeout_s

    @property
    def base_url(self) -> str:
        return f"{'http' if self._plain_http else 'https'}://{self.registry}"

    # -- HTTP -------------------------------------------------------------------

    def _connection(self, netloc: str, scheme: str) -> http.client.HTTPConnection:
        if scheme == "http":
            return http.client.HTTPConnection(netloc, timeout=self._timeout_s, blocksize=_CHUNK)
        return http.client.HTTPSConnection(netloc, timeout=self._timeout_s, blocksize=_CHUNK,
                                           context=ssl.create_default_context())

    def _request(self, method: str, url: str, *, body: bytes | Iterable[bytes] | None = None,
                 headers: dict[str, str] | None = None,
                 ok: tuple[int, ...] = (200,)) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a request (following redirects for GET and HEAD); the open connection and
        response, which the caller reads and closes."""
        target = urllib.parse.urljoin(self.base_url + "/", url)
        for _ in range(_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(target)
            if parts.scheme not in ("http", "https"):
                raise DataLoss(f"registry {self.registry}: refusing to follow a {parts.scheme!r} URL")
            conn = self._connection(parts.netloc, parts.scheme)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request(method, path, body=body, headers=headers or {})
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise Unavailable(f"registry {self.registry}: {method} {parts.path}: {exc}") from None
            if response.status in (301, 302, 303, 307, 308) and method in ("GET", "HEAD"):
                location = response.getheader("Location", "")
                response.read()
                conn.close()
                target = urllib.parse.urljoin(target, location)
                continue
            if response.status not in ok:
                detail = response.read(2048).decode(errors="replace").strip()
                conn.close()
                raise self._error(method, parts.path, response.status, detail)
            return conn, response
        raise Unavailable(f"registry {self.registry}: too many redirects for {url}")

    def _error(self, method: str, path: str, status: int, detail: str) -> Exception:
        what = f"registry {self.registry}: {method} {path}: HTTP {status}" + (f": {detail[:300]}" if detail else "")
        if status == 404:
            return NotFound(what)
        if status in (401, 403):
            return PermissionDenied(what + " (this client pulls and pushes anonymously)")
        if status in (400, 405, 413, 415):
            return InvalidArgument(what)
        return Unavailable(what)

    def _simple(self, method: str, url: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
        conn, response = self._request(method, url, **kwargs)
        try:
            data = response.read(MANIFEST_MAX_BYTES + 1) if method != "HEAD" else b""
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        finally:
            conn.close()

    # -- blobs ------------------------------------------------------------------

    def blob_exists(self, repository: str, digest: str) -> bool:
        try:
            self._simple("HEAD", f"/v2/{repository}/blobs/{digest}")
        except NotFound:
            return False
        return True

    def push_blob(self, repository: str, data: bytes) -> str:
        """Upload a small blob held in memory; its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.blob_exists(repository, digest):
            _, headers, _ = self._simple("POST", f"/v2/{repository}/blobs/uploads/", ok=(202,),
                                         headers={"Content-Length": "0"})
            location = self._upload_location(headers)
            self._simple("PUT", _with_query(location, digest=digest), body=data, ok=(201,),
                         headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
        return digest

    def push_stream(self, repository: str, chunks: Iterable[bytes], size: int,
                    progress: Callable[[int], None] | None = None) -> str:
        """Upload `size` bytes produced by `chunks`, hashing them on the way; the digest."""
        _, headers, _ = self._simple("POST", f"/v2/{repository}/blobs/uploads/", ok=(202,),
                                     headers={"Content-Length": "0"})
        location = self._upload_location(headers)
        digest = hashlib.sha256()
        sent = 0

        def body() -> Iterator[bytes]:
            nonlocal sent
            for chunk in chunks:
                digest.update(chunk)
                sent += len(chunk)
                if progress is not None:
                    progress(len(chunk))
                yield chunk

        _, headers, _ = self._simple("PATCH", location, body=body(), ok=(202,), headers={
            "Content-Type": "application/octet-stream", "Content-Length": str(size)})
        if sent != size:
            raise DataLoss(f"registry {self.registry}: sent {sent} bytes of a {size}-byte blob")
        location = self._upload_location(headers)
        final = "sha256:" + digest.hexdigest()
        self._simple("PUT", _with_query(location, digest=final), body=b"", ok=(201,),
                     headers={"Content-Length": "0"})
        return final

    def _upload_location(self, headers: dict[str, str]) -> str:
        location = headers.get("location", "")
        if not location:
            raise DataLoss(f"registry {self.registry}: an upload answer without a Location")
        return location

    def pull_blob(self, repository: str, digest: str, size: int, sink: Callable[[bytes], None],
                  progress: Callable[[int], None] | None = None) -> None:
        """Stream a blob into `sink`, checking its size and digest at the end (DataLoss
        if either differs: whatever `sink` did with the bytes must then be discarded)."""
        naming.digest(digest)
        conn, response = self._request("GET", f"/v2/{repository}/blobs/{digest}")
        hasher = hashlib.sha256()
        received = 0
        try:
            while chunk := response.read(_CHUNK):
                received += len(chunk)
                if received > size:
                    raise DataLoss(f"registry {self.registry}: blob {digest} is longer than its {size} bytes")
                hasher.update(chunk)
                sink(chunk)
                if progress is not None:
                    progress(len(chunk))
        except (OSError, http.client.HTTPException) as exc:
            raise Unavailable(f"registry {self.registry}: reading blob {digest}: {exc}") from None
        finally:
            conn.close()
        if received != size or "sha256:" + hasher.hexdigest() != digest:
            raise DataLoss(f"registry {self.registry}: blob {digest} arrived as {received} bytes that do not"
                           " hash to its digest")

    # -- manifests --------------------------------------------------------------

    def put_manifest(self, reference: Reference, manifest: dict[str, Any]) -> str:
        body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self._simple("PUT", f"/v2/{reference.repository}/manifests/{reference.tag or digest}", body=body,
                     ok=(201,), headers={"Content-Type": OCI_MANIFEST, "Content-Length": str(len(body))})
        return digest

    def get_manifest(self, reference: Reference) -> tuple[dict[str, Any], str]:
        """The image manifest `reference` names, and its digest (checked when the
        reference pins one)."""
        _, headers, body = self._simple(
            "GET", f"/v2/{reference.repository}/manifests/{reference.manifest_reference}",
            headers={"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"})
        if len(body) > MANIFEST_MAX_BYTES:
            raise DataLoss(f"registry {self.registry}: the manifest of {reference} is over {MANIFEST_MAX_BYTES} bytes")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.digest and digest != reference.digest:
            raise DataLoss(f"registry {self.registry}: the manifest of {reference} hashes to {digest}")
        try:
            manifest = json.loads(body)
        except ValueError as exc:
            raise DataLoss(f"registry {self.registry}: the manifest of {reference} is not JSON: {exc}") from None
        media_type = manifest.get("mediaType") if isinstance(manifest, dict) else None
        if not isinstance(manifest, dict) or media_type not in (OCI_MANIFEST, DOCKER_MANIFEST, None) \
                or manifest.get("schemaVersion") != 2:
            raise InvalidArgument(f"{reference} is not an image manifest (an index, or another artifact:"
                                  f" {str(media_type or headers.get('content-type'))[:80]})")
        return manifest, digest


def _with_query(location: str, **params: str) -> str:
    separator = "&" if "?" in location else "?"
    return location + separator + urllib.parse.urlencode(params)


def read_chunks(stream: IO[bytes], size: int = _CHUNK) -> Iterator[bytes]:
    while chunk := stream.read(size):
        yield chunk
