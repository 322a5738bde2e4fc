"""A Kubernetes validating admission webhook for Pods (``admission.k8s.io/v1``).

Every container, init container and ephemeral container image must be pinned by digest,
carry a signature by a trusted, non-revoked key, and have provenance that passes the
verification policy. Signatures and attestations come from a :class:`SignatureSource` (the
image's OCI registry or a local signature store).
The answer names the failing image and rule; every decision is logged with each rule checked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from kms.domain.provenance import RuleResult, VerificationPolicy
from kms.errors import InvalidArgument, KmsError
from signer.payloads.simplesigning import ImageReference
from signer.signature_store import StoredSignature
from signer.verification import (
    Decision,
    KeyResolver,
    verify_attestation,
    verify_image_signature,
)

log = logging.getLogger("signet.admission")

ADMISSION_API_VERSION = "admission.k8s.io/v1"
MAX_REVIEW_BYTES = 3 * 1024 * 1024  # the API server's own request limit
_CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


class SignatureSource(Protocol):
    """Where signatures and attestations of a digest-pinned image are found: a local
    ``SignatureStore`` or the image's OCI registry (``CosignRegistry``). Both raise
    ``KmsError`` when they cannot be read."""

    def signatures_for(self, image: ImageReference) -> list[StoredSignature]: ...
    def attestations_for(self, image: ImageReference) -> list[bytes]: ...


class MalformedReview(InvalidArgument):
    """The request is not an AdmissionReview this webhook can answer (HTTP 400)."""


class DecisionLog:
    """Admission decisions as JSON lines (time, review uid, allowed, images, message), which
    the signer's dashboard lists (``dashboard.admission_log``). Appends are serialised, so
    the webhook's threads never interleave lines; a failed write is logged, not raised, since
    the decision itself has been made and answered."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    def record(self, *, time: float, uid: str, allowed: bool, images: list[str],
               message: str) -> None:
        line = json.dumps({"time": time, "uid": uid, "allowed": allowed, "images": images,
                           "message": message}, sort_keys=True) + "\n"
        with self._lock:
            try:
                with self._path.open("a", encoding="utf-8") as f:
                    f.write(line)
            except OSError as error:
                log.warning("cannot append to the decision log %s: %s", self._path, error)


class AdmissionController:
    """Decides AdmissionReviews. Thread-safe as long as the resolver is."""

    def __init__(
        self,
        store: SignatureSource,
        resolver: KeyResolver,
        policy: VerificationPolicy,
        clock: Callable[[], float],
        decisions: DecisionLog | None = None,
    ) -> None:
        self._store = store
        self._resolver = resolver
        self._policy = policy
        self._clock = clock
        self._decisions = decisions

    def check_image(self, text: str) -> Decision:
        """Every rule checked for one image; never raises for a failing check."""
        try:
            image = ImageReference.parse(text)
        except KmsError as error:
            return Decision(f"image {text}", (RuleResult(
                "image-reference", False, f"rule 'image-reference' failed: {error}"),))
        if image.digest is None:
            return Decision(f"image {text}", (RuleResult(
                "image-pinned-by-digest", False,
                f"rule 'image-pinned-by-digest' failed: {text} is not pinned by digest; "
                f"use {image.name}@sha256:<hex>"),))
        results = list(self._signature(image))
        results.extend(self._provenance(image))
        return Decision(f"image {text}", tuple(results))

    def _signature(self, image: ImageReference) -> tuple[RuleResult, ...]:
        try:
            stored = self._store.signatures_for(image)
        except KmsError as error:
            return (RuleResult("image-signature", False, "rule 'image-signature' failed: "
                               f"cannot read signatures: {error.diagnostics()}"),)
        if not stored:
            return (RuleResult(
                "image-signature", False,
                f"rule 'image-signature' failed: no signature for {image.digest} found"),)
        decisions = [
            verify_image_signature(image, s.payload, s.signature, self._resolver, self._policy,
                                   key_id=s.key_id or None)
            for s in stored
        ]
        # One passing signature is enough (cosign keeps several per image); otherwise
        # report the first one's rules.
        return next((d for d in decisions if d.allowed), decisions[0]).results

    def _provenance(self, image: ImageReference) -> tuple[RuleResult, ...]:
        try:
            envelopes = self._store.attestations_for(image)
        except KmsError as error:
            return (RuleResult("provenance", False, "rule 'provenance' failed: cannot read "
                               f"attestations: {error.diagnostics()}"),)
        if not envelopes:
            return (RuleResult("provenance", False,
                               f"rule 'provenance' failed: no attestation for {image.digest}"),)
        decisions = [
            verify_attestation(e, self._resolver, self._policy, now=self._clock(), image=image)
            for e in envelopes
        ]
        # One passing attestation is enough; otherwise report the first one's rules.
        passing = next((d for d in decisions if d.allowed), decisions[0])
        return passing.results

    def review(self, body: bytes) -> dict[str, Any]:
        """The AdmissionReview response for a request body. Raises ``MalformedReview``."""
        review = _parse_review(body)
        request = review["request"]
        uid = request["uid"]
        if request.get("operation") == "DELETE":
            return _response(uid, True, "deletions are not checked")
        kind = request.get("kind")
        if not isinstance(kind, Mapping) or kind.get("kind") != "Pod":
            return _response(uid, False, "this webhook checks Pods only; fix its rules")
        images = _pod_images(request.get("object"))
        decisions = [self.check_image(image) for image in images]
        for decision in decisions:
            log.info("admission %s\n%s", uid, "\n".join(decision.lines()))
        failures = [d for d in decisions if not d.allowed]
        if not failures:
            message = f"{len(decisions)} image(s) verified"
        else:
            message = "; ".join(
                f"{d.subject}: {d.first_failure.message}" for d in failures if d.first_failure)
        if self._decisions is not None:
            self._decisions.record(time=self._clock(), uid=str(uid), allowed=not failures,
                                   images=images, message=message)
        return _response(uid, not failures, message)


def _response(uid: str, allowed: bool, message: str) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    response["status"] = {"message": message} if allowed else {"code": 403, "message": message}
    return {"apiVersion": ADMISSION_API_VERSION, "kind": "AdmissionReview", "response": response}


def _parse_review(body: bytes) -> Mapping[str, Any]:
    try:
        review = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MalformedReview(f"the body is not JSON: {error}") from None
    if not isinstance(review, Mapping) or review.get("kind") != "AdmissionReview":
        raise MalformedReview("the body is not an AdmissionReview")
    if review.get("apiVersion") != ADMISSION_API_VERSION:
        raise MalformedReview(
            f"apiVersion must be {ADMISSION_API_VERSION}, got {review.get('apiVersion')!r}")
    request = review.get("request")
    if not isinstance(request, Mapping) or not isinstance(request.get("uid"), str):
        raise MalformedReview("the AdmissionReview has no request with a uid")
    return review


def _pod_images(pod: Any) -> list[str]:
    if not isinstance(pod, Mapping) or not isinstance(pod.get("spec"), Mapping):
        raise MalformedReview("request.object is not a Pod with a spec")
    images = []
    for list_name in _CONTAINER_LISTS:
        containers = pod["spec"].get(list_name) or []
        if not isinstance(containers, list):
            raise MalformedReview(f"spec.{list_name} must be a list")
        for index, container in enumerate(containers):
            image = container.get("image") if isinstance(container, Mapping) else None
            if not isinstance(image, str) or not image:
                raise MalformedReview(f"spec.{list_name}[{index}].image must be a string")
            images.append(image)
    if not images:
        raise MalformedReview("the Pod has no containers")
    return images


class _Handler(BaseHTTPRequestHandler):
    server: AdmissionServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _text(self, status: HTTPStatus, message: str) -> None:
        self._send(status, (message + "\n").encode(), "text/plain; charset=utf-8")

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._text(HTTPStatus.OK, "ok")
        else:
            self._text(HTTPStatus.NOT_FOUND, "not found; POST AdmissionReviews to /validate")

    def do_POST(self) -> None:
        if self.path.partition("?")[0] != "/validate":
            self._text(HTTPStatus.NOT_FOUND, "not found; POST AdmissionReviews to /validate")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._text(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
            return
        if not 0 < length <= MAX_REVIEW_BYTES:
            self._text(HTTPStatus.BAD_REQUEST,
                       f"the body must be 1 to {MAX_REVIEW_BYTES} bytes, got {length}")
            return
        body = self.rfile.read(length)
        try:
            answer = self.server.controller.review(body)
        except MalformedReview as error:
            self._text(HTTPStatus.BAD_REQUEST, f"malformed AdmissionReview: {error}")
            return
        except Exception:
            # Fail closed: the API server treats an error as a denial (failurePolicy: Fail).
            log.exception("admission review failed")
            self._text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the webhook log")
            return
        self._send(HTTPStatus.OK, json.dumps(answer).encode(), "application/json")


class AdmissionServer(ThreadingHTTPServer):
    """HTTPS on a loopback or cluster address. TLS handshakes run in the per-request thread,
    so one slow client cannot stall the accept loop."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], controller: AdmissionController,
        cert: Path, key: Path,
    ) -> None:
        super().__init__(address, _Handler)
        self.controller = controller
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self._tls.load_cert_chain(str(cert), str(key))
        self._thread: threading.Thread | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(10)
        try:
            tls = self._tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as error:
            log.info("TLS handshake with %s failed: %s", client_address, error)
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            with contextlib.suppress(OSError):  # the client may already be gone
                tls.shutdown(socket.SHUT_RDWR)
            tls.close()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="admission",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
