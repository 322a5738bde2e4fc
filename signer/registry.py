"""Image signatures and attestations in an OCI registry, where cosign keeps them.

For an image ``REG/REPO@sha256:HEX`` cosign stores, in the same repository:

- at tag ``sha256-HEX.sig`` an OCI image manifest whose layers are simple-signing payloads
  (media type ``application/vnd.dev.cosign.simplesigning.v1+json``), each layer's signature
  base64 in the annotation ``dev.cosignproject.cosign/signature``;
- at tag ``sha256-HEX.att`` one whose layers are DSSE envelopes
  (``application/vnd.dsse.envelope.v1+json``) with an empty signature annotation and the
  statement's ``predicateType`` annotation.

The config blob of both is an image config whose ``rootfs.diff_ids`` list the layer digests.
Attaching appends a layer to what is already there (several signatures per image), as cosign
does. :class:`RegistryClient` speaks the OCI distribution API over ``urllib`` (no new
dependency, no credentials: anonymous access only). Plain HTTP is used only for loopback
registries unless asked for explicitly.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kms.errors import InvalidArgument, Unavailable
from signer.payloads.dsse import Envelope
from signer.payloads.intoto import Statement
from signer.payloads.simplesigning import ImageReference
from signer.signature_store import StoredSignature

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
SIMPLESIGNING_LAYER = "application/vnd.dev.cosign.simplesigning.v1+json"
DSSE_LAYER = "application/vnd.dsse.envelope.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PREDICATE_TYPE_ANNOTATION = "predicateType"
# Signet's own hints; cosign ignores unknown annotations. They only pick the key to try
# first: the signature is still verified against the verifier's own keys.
KEY_ID_ANNOTATION = "dev.signet/key-id"
KEY_ANNOTATION = "dev.signet/key"
KEY_VERSION_ANNOTATION = "dev.signet/key-version"
_ACCEPT = ", ".join((OCI_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json",
                     "application/vnd.oci.image.index.v1+json"))
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_LAYER_BYTES = 16 * 1024 * 1024


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _is_loopback(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def signature_tag(digest: str, suffix: str) -> str:
    """cosign's tag for an image digest: ``sha256:HEX`` → ``sha256-HEX.<suffix>``."""
    return digest.replace(":", "-") + f".{suffix}"


@dataclass(frozen=True)
class Manifest:
    body: bytes
    media_type: str
    digest: str

    def json(self) -> dict[str, Any]:
        """The manifest as a mapping; raises ``InvalidArgument`` if it is not one."""
        try:
            data = json.loads(self.body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InvalidArgument(f"manifest {self.digest} is not JSON: {error}") from None
        if not isinstance(data, dict):
            raise InvalidArgument(f"manifest {self.digest} is not a JSON object")
        return data


class RegistryClient:
    """Anonymous OCI distribution API client for one registry host.

    Raises ``Unavailable`` when the registry cannot be reached or answers an error, and
    ``InvalidArgument`` when content does not match its digest or is malformed.
    """

    def __init__(self, registry: str, *, plain_http: bool | None = None,
                 timeout: float = 10.0) -> None:
        if plain_http is None:
            plain_http = _is_loopback(registry)
        self.registry = registry
        self._base = f"{'http' if plain_http else 'https'}://{registry}/v2/"
        self._timeout = timeout

    def _request(self, method: str, url: str, *, data: bytes | None = None,
                 headers: Mapping[str, str] | None = None,
                 limit: int = MAX_MANIFEST_BYTES) -> tuple[int, Mapping[str, str], bytes]:
        request = urllib.request.Request(  # noqa: S310 -- http(s) URL built from a parsed ref
            url, data=data, method=method, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:  # noqa: S310
                body = response.read(limit + 1)
                status, answer_headers = response.status, response.headers
        except urllib.error.HTTPError as error:
            status, answer_headers, body = error.code, error.headers, error.read(4096)
        except (urllib.error.URLError, OSError) as error:
            raise Unavailable(f"registry {self.registry} is unreachable: {error}") from None
        if len(body) > limit:
            raise InvalidArgument(f"registry {self.registry}: {url} is larger than {limit} bytes")
        return status, answer_headers, body

    def _fail(self, what: str, status: int, body: bytes) -> Unavailable:
        detail = body.decode(errors="replace").strip()[:300]
        return Unavailable(f"registry {self.registry}: {what} answered HTTP {status}: {detail}")

    def get_manifest(self, repository: str, reference: str) -> Manifest | None:
        """The manifest at a tag or digest, or None if there is none. A manifest fetched by
        digest must hash to it (raises ``InvalidArgument`` otherwise)."""
        status, headers, body = self._request(
            "GET", f"{self._base}{repository}/manifests/{reference}", headers={"Accept": _ACCEPT})
        if status == 404:
            return None
        if status != 200:
            raise self._fail(f"GET manifest {repository}:{reference}", status, body)
        digest = _digest(body)
        if reference.startswith("sha256:") and digest != reference:
            raise InvalidArgument(
                f"registry {self.registry} served manifest {digest} for {reference}")
        media_type = headers.get("Content-Type", OCI_MANIFEST).split(";")[0].strip()
        return Manifest(body, media_type, digest)

    def put_manifest(self, repository: str, tag: str, body: bytes,
                     media_type: str = OCI_MANIFEST) -> str:
        """Store a manifest under a tag; returns its digest."""
        status, _, answer = self._request(
            "PUT", f"{self._base}{repository}/manifests/{tag}", data=body,
            headers={"Content-Type": media_type})
        if status not in (200, 201):
            raise self._fail(f"PUT manifest {repository}:{tag}", status, answer)
        return _digest(body)

    def get_blob(self, repository: str, digest: str, *, limit: int = MAX_LAYER_BYTES) -> bytes:
        """A blob, checked against its digest (raises ``InvalidArgument`` on mismatch)."""
        status, _, body = self._request(
            "GET", f"{self._base}{repository}/blobs/{digest}", limit=limit)
        if status != 200:
            raise self._fail(f"GET blob {repository}@{digest}", status, body)
        if _digest(body) != digest:
            raise InvalidArgument(f"registry {self.registry} served a blob that is not {digest}")
        return body

    def put_blob(self, repository: str, data: bytes) -> str:
        """Upload a blob (monolithic POST then PUT) unless it is already there; returns its
        digest."""
        digest = _digest(data)
        status, _, _ = self._request("HEAD", f"{self._base}{repository}/blobs/{digest}")
        if status == 200:
            return digest
        status, headers, body = self._request(
            "POST", f"{self._base}{repository}/blobs/uploads/", data=b"")
        location = headers.get("Location") if status == 202 else None
        if not location:
            raise self._fail(f"start upload to {repository}", status, body)
        upload = urllib.parse.urljoin(self._base, location)
        parts = urllib.parse.urlsplit(upload)
        query = urllib.parse.urlencode([*urllib.parse.parse_qsl(parts.query),
                                        ("digest", digest)])
        status, _, body = self._request(
            "PUT", urllib.parse.urlunsplit(parts._replace(query=query)), data=data,
            headers={"Content-Type": "application/octet-stream"})
        if status != 201:
            raise self._fail(f"finish upload of {digest} to {repository}", status, body)
        return digest


def _config_for(layers: list[dict[str, Any]]) -> bytes:
    # The same shape cosign writes (go-containerregistry's empty image plus layers).
    return json.dumps({
        "architecture": "", "os": "", "config": {},
        "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"} for _ in layers],
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]},
    }, separators=(",", ":")).encode()


class CosignRegistry:
    """Attach and read cosign ``.sig`` and ``.att`` objects next to images.

    ``plain_http`` None: plain HTTP for loopback registries, HTTPS otherwise. Raises what
    :class:`RegistryClient` raises.
    """

    def __init__(self, *, plain_http: bool | None = None, timeout: float = 10.0) -> None:
        self._plain_http = plain_http
        self._timeout = timeout

    def client(self, image: ImageReference) -> RegistryClient:
        return RegistryClient(image.registry, plain_http=self._plain_http,
                              timeout=self._timeout)

    def _layers(self, image: ImageReference, suffix: str
                ) -> tuple[RegistryClient, list[dict[str, Any]]]:
        image.require_digest()
        assert image.digest is not None  # noqa: S101 -- narrowed by require_digest
        client = self.client(image)
        manifest = client.get_manifest(image.repository, signature_tag(image.digest, suffix))
        if manifest is None:
            return client, []
        layers = manifest.json().get("layers", [])
        if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
            raise InvalidArgument(f"{image.name} {suffix} manifest has malformed layers")
        return client, layers

    def _attach(self, image: ImageReference, suffix: str, layer: dict[str, Any],
                blob: bytes) -> str:
        client, layers = self._layers(image, suffix)
        assert image.digest is not None  # noqa: S101 -- checked by _layers
        client.put_blob(image.repository, blob)
        # Re-signing the same payload with the same signature is idempotent.
        layers = [x for x in layers if (x.get("digest"), x.get("annotations"))
                  != (layer["digest"], layer["annotations"])]
        layers.append(layer)
        config = _config_for(layers)
        client.put_blob(image.repository, config)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "size": len(config), "digest": _digest(config)},
            "layers": layers,
        }, separators=(",", ":")).encode()
        tag = signature_tag(image.digest, suffix)
        client.put_manifest(image.repository, tag, manifest)
        return f"{image.name}:{tag}"

    def attach_signature(self, image: ImageReference, signed: StoredSignature) -> str:
        """Add a simple-signing signature to the image's ``.sig`` manifest; returns the
        reference written (``REG/REPO:sha256-HEX.sig``)."""
        annotations = {SIGNATURE_ANNOTATION: base64.b64encode(signed.signature).decode(),
                       KEY_ID_ANNOTATION: signed.key_id, KEY_ANNOTATION: signed.key,
                       KEY_VERSION_ANNOTATION: str(signed.key_version)}
        layer = {"mediaType": SIMPLESIGNING_LAYER, "size": len(signed.payload),
                 "digest": _digest(signed.payload), "annotations": annotations}
        return self._attach(image, "sig", layer, signed.payload)

    def attach_attestation(self, image: ImageReference, envelope_json: bytes) -> str:
        """Add a DSSE envelope to the image's ``.att`` manifest; returns the reference written.
        Raises ``InvalidArgument`` if the envelope or its statement does not parse."""
        statement = Statement.from_json(Envelope.from_json(envelope_json).payload)
        annotations = {SIGNATURE_ANNOTATION: "",
                       PREDICATE_TYPE_ANNOTATION: statement.predicate_type}
        layer = {"mediaType": DSSE_LAYER, "size": len(envelope_json),
                 "digest": _digest(envelope_json), "annotations": annotations}
        return self._attach(image, "att", layer, envelope_json)

    def signatures_for(self, image: ImageReference) -> list[StoredSignature]:
        """Every simple-signing signature attached to the image (none: an empty list)."""
        client, layers = self._layers(image, "sig")
        found = []
        for layer in layers:
            if layer.get("mediaType") != SIMPLESIGNING_LAYER:
                continue
            annotations = layer.get("annotations") or {}
            try:
                signature = base64.b64decode(annotations.get(SIGNATURE_ANNOTATION, ""),
                                             validate=True)
                version = int(annotations.get(KEY_VERSION_ANNOTATION) or 0)
            except (ValueError, TypeError):
                continue  # a malformed layer is not a signature; others may still verify
            payload = client.get_blob(image.repository, str(layer.get("digest")))
            found.append(StoredSignature(
                str(image), payload, signature, str(annotations.get(KEY_ANNOTATION, "")),
                version, str(annotations.get(KEY_ID_ANNOTATION, ""))))
        return found

    def attestations_for(self, image: ImageReference) -> list[bytes]:
        """Every DSSE envelope attached to the image (none: an empty list)."""
        client, layers = self._layers(image, "att")
        return [client.get_blob(image.repository, str(layer.get("digest")))
                for layer in layers if layer.get("mediaType") == DSSE_LAYER]
