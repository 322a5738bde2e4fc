"""A local directory of image signatures and attestations, keyed by manifest digest::

    <root>/<sha256-hex>/signature.json        the image's simple-signing signature (latest)
    <root>/<sha256-hex>/attestations/*.json   DSSE envelopes whose statement names the image

``signet sign-image --store`` and ``signet sign-statement --store`` write it; the admission
webhook and ``signet verify-*`` read it with ``--store``. Without it they read the OCI
registry next to the image, at the tags cosign uses (``signer/registry.py``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kms.errors import InvalidArgument
from signer.payloads.simplesigning import ImageReference

_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class StoredSignature:
    image: str
    payload: bytes
    signature: bytes
    key: str
    key_version: int
    key_id: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "payload": base64.b64encode(self.payload).decode(),
            "signature": base64.b64encode(self.signature).decode(),
            "key": self.key,
            "key_version": self.key_version,
            "key_id": self.key_id,
        }

    @classmethod
    def from_dict(cls, data: Any) -> StoredSignature:
        """Raises ``InvalidArgument`` for a malformed record."""
        try:
            return cls(
                image=str(data["image"]),
                payload=base64.b64decode(data["payload"], validate=True),
                signature=base64.b64decode(data["signature"], validate=True),
                key=str(data["key"]),
                key_version=int(data["key_version"]),
                key_id=str(data["key_id"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidArgument(f"malformed stored signature: {error}") from None


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".tmp")
    scratch.write_bytes(data)
    os.replace(scratch, path)  # readers never see a half-written file


class SignatureStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _image_dir(self, digest_hex: str) -> Path:
        if not _HEX.match(digest_hex):
            raise InvalidArgument(f"{digest_hex!r} is not a sha256 hex digest")
        return self.root / digest_hex

    def put_signature(self, digest_hex: str, signature: StoredSignature) -> Path:
        path = self._image_dir(digest_hex) / "signature.json"
        _write_atomically(path, json.dumps(signature.to_dict(), indent=2).encode())
        return path

    def put_attestation(self, digest_hex: str, envelope_json: bytes) -> Path:
        name = hashlib.sha256(envelope_json).hexdigest()[:32] + ".json"
        path = self._image_dir(digest_hex) / "attestations" / name
        _write_atomically(path, envelope_json)
        return path

    def signature(self, digest_hex: str) -> StoredSignature | None:
        """The stored signature, or None. Raises ``InvalidArgument`` if it is malformed."""
        path = self._image_dir(digest_hex) / "signature.json"
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            return StoredSignature.from_dict(json.loads(text))
        except json.JSONDecodeError as error:
            raise InvalidArgument(f"{path} is not valid JSON: {error}") from None

    def attestations(self, digest_hex: str) -> list[bytes]:
        folder = self._image_dir(digest_hex) / "attestations"
        if not folder.is_dir():
            return []
        return [p.read_bytes() for p in sorted(folder.glob("*.json"))]

    def signatures_for(self, image: ImageReference) -> list[StoredSignature]:
        """The image's stored signature as a list (``SignatureSource``); raises
        ``InvalidArgument`` if it is malformed or the image is not pinned."""
        stored = self.signature(image.digest_hex)
        return [] if stored is None else [stored]

    def attestations_for(self, image: ImageReference) -> list[bytes]:
        """The image's stored attestations (``SignatureSource``)."""
        return self.attestations(image.digest_hex)
