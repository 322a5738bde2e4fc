"""Container image references and cosign's "simple signing" payload.

cosign signs, for an image, the JSON payload::

    {"critical": {"identity": {"docker-reference": "registry.example.com/app"},
                  "image": {"docker-manifest-digest": "sha256:<hex>"},
                  "type": "cosign container image signature"},
     "optional": {"annotation": "value"}}

and stores it with its signature in the registry under the tag ``sha256-<hex>.sig``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kms.errors import InvalidArgument
from signer.payloads import VerificationError

COSIGN_SIGNATURE_TYPE = "cosign container image signature"
DEFAULT_REGISTRY = "docker.io"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_REGISTRY = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?$")


@dataclass(frozen=True)
class ImageReference:
    """``[registry[:port]/]repository[:tag][@sha256:hex]``, parsed.

    ``registry`` is ``docker.io`` when the reference names none (Docker's rule: the first path
    component is a registry only if it has a dot or a port or is ``localhost``).
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``registry/repository``: what cosign puts in ``docker-reference``."""
        return f"{self.registry}/{self.repository}"

    @property
    def digest_hex(self) -> str:
        """The manifest digest's hex part. Raises ``InvalidArgument`` if not pinned."""
        return self.require_digest().digest.removeprefix("sha256:")  # type: ignore[union-attr]

    def require_digest(self) -> ImageReference:
        """Return self if pinned by digest; raises ``InvalidArgument`` otherwise."""
        if self.digest is None:
            shown = f"{self.name}:{self.tag}" if self.tag else self.name
            raise InvalidArgument(
                f"image {shown} is not pinned by digest; use {self.name}@sha256:<hex> "
                "(a tag can be moved to another image, a digest cannot)"
            )
        return self

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @classmethod
    def parse(cls, text: str, *, require_digest: bool = False) -> ImageReference:
        """Parse an image reference; raises ``InvalidArgument`` saying what is wrong."""
        if not text or text != text.strip():
            raise InvalidArgument(f"image reference {text!r} is empty or has spaces")
        rest, _, digest = text.partition("@")
        if digest and not _DIGEST.match(digest):
            raise InvalidArgument(
                f"image reference {text!r}: the digest must be sha256: and 64 lowercase hex "
                "characters"
            )
        first, slash, remainder = rest.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            if not _REGISTRY.match(first):
                raise InvalidArgument(f"image reference {text!r}: bad registry host {first!r}")
            registry, path = first, remainder
        else:
            registry, path = DEFAULT_REGISTRY, rest
        tag: str | None = None
        last_slash = path.rfind("/")
        colon = path.find(":", last_slash + 1)
        if colon != -1:
            path, tag = path[:colon], path[colon + 1 :]
            if not _TAG.match(tag):
                raise InvalidArgument(f"image reference {text!r}: bad tag {tag!r}")
        components = path.split("/")
        if not path or not all(_COMPONENT.match(c) for c in components):
            raise InvalidArgument(
                f"image reference {text!r}: the repository must be lowercase path components "
                "(letters, digits, '.', '_', '-')"
            )
        if registry == DEFAULT_REGISTRY and len(components) == 1:
            path = f"library/{path}"
        reference = cls(registry, path, tag, digest or None)
        return reference.require_digest() if require_digest else reference


@dataclass(frozen=True)
class SimpleSigningPayload:
    docker_reference: str
    manifest_digest: str
    optional: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _DIGEST.match(self.manifest_digest):
            raise InvalidArgument(
                f"manifest digest {self.manifest_digest!r} must be sha256: and 64 lowercase hex"
            )

    @classmethod
    def for_image(
        cls, image: ImageReference, annotations: Mapping[str, str] | None = None
    ) -> SimpleSigningPayload:
        """The payload for a digest-pinned image; raises ``InvalidArgument`` if not pinned."""
        image.require_digest()
        assert image.digest is not None  # noqa: S101 -- narrowed by require_digest
        return cls(image.name, image.digest, dict(annotations or {}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "critical": {
                "identity": {"docker-reference": self.docker_reference},
                "image": {"docker-manifest-digest": self.manifest_digest},
                "type": COSIGN_SIGNATURE_TYPE,
            },
            "optional": dict(self.optional) or None,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, text: bytes | str) -> SimpleSigningPayload:
        """Raises ``InvalidArgument`` naming the malformed field."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InvalidArgument(f"the signature payload is not valid JSON: {error}") from None
        critical = data.get("critical") if isinstance(data, Mapping) else None
        if not isinstance(critical, Mapping):
            raise InvalidArgument("signature payload field 'critical' must be an object")
        if critical.get("type") != COSIGN_SIGNATURE_TYPE:
            raise InvalidArgument(
                f"signature payload field 'critical.type' must be {COSIGN_SIGNATURE_TYPE!r}"
            )
        identity = critical.get("identity")
        reference = identity.get("docker-reference") if isinstance(identity, Mapping) else None
        if not isinstance(reference, str) or not reference:
            raise InvalidArgument(
                "signature payload field 'critical.identity.docker-reference' must be a string"
            )
        image = critical.get("image")
        digest = image.get("docker-manifest-digest") if isinstance(image, Mapping) else None
        if not isinstance(digest, str):
            raise InvalidArgument(
                "signature payload field 'critical.image.docker-manifest-digest' must be a string"
            )
        optional = data.get("optional") or {}
        if not isinstance(optional, Mapping):
            raise InvalidArgument("signature payload field 'optional' must be an object or null")
        return cls(reference, digest, {str(k): str(v) for k, v in optional.items()})

    def check_matches(self, image: ImageReference) -> None:
        """Raises ``VerificationError`` unless the payload names this image and digest."""
        if self.manifest_digest != image.digest:
            raise VerificationError(
                f"the signature is for digest {self.manifest_digest}, not {image.digest}"
            )
        if self.docker_reference != image.name:
            raise VerificationError(
                f"the signature is for repository {self.docker_reference}, not {image.name}"
            )
