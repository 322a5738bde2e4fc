"""Custodian ceremonies: M-of-N approval of privileged changes (DESIGN.md I6).

Everything here is pure: no I/O, no clock reads, no randomness (the nonce and the time are
passed in). A *proposal* is canonical JSON naming the exact action and its parameters, the
proposer, when it was made, when it expires and a nonce; its id is the SHA-256 of those bytes.
An *approval* is a DSSE envelope (payload type ``APPROVAL_PAYLOAD_TYPE``) whose payload names
the proposal id and the body hash, signed by one custodian's own key. ``Proposal.approve``
accepts an approval only for an open, unexpired proposal, from a listed custodian who has not
approved yet, bound to exactly this proposal — and always raises on refusal.

docs/adr/0009-custodian-ceremonies.md records the decisions.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from kms.domain.keys import Algorithm, Replication, key_id_for, validate_key_name
from kms.domain.policy import AccessPolicy
from kms.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
)

PROPOSAL_FORMAT = "signet-ceremony-proposal/v1"
APPROVAL_FORMAT = "signet-ceremony-approval/v1"
APPROVAL_PAYLOAD_TYPE = "application/vnd.signet.ceremony-approval+json"
DEFAULT_LIFETIME_SECONDS = 7 * 86_400
MIN_LIFETIME_SECONDS = 60  # lower only by explicit configuration (tests)
MAX_LIFETIME_SECONDS = 30 * 86_400
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def canonical_json(document: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8, no NaN: the one byte form of proposals and approvals."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def pae(payload_type: str, payload: bytes) -> bytes:
    """The DSSE v1 pre-authentication encoding (the same as ``signer.payloads.dsse.pae``; kept
    here because ``kms`` may not import ``signer``)."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


class Action(enum.Enum):
    """What a proposal does. The value is the wire name and the CLI's ``propose`` verb."""

    CREATE_KEY = "create-key"
    ROTATE = "rotate"
    REVOKE = "revoke"
    DISABLE = "disable"
    ENABLE = "enable"
    SCHEDULE_DESTROY = "schedule-destroy"
    CANCEL_DESTROY = "cancel-destroy"
    SET_MIN_VERSION = "set-min-version"
    POLICY = "policy"
    CUSTODIANS = "custodians"
    ONBOARD_REGION = "onboard-region"
    ROTATE_ROOT = "rotate-root"

    @classmethod
    def parse(cls, name: str) -> Action:
        try:
            return cls(name.strip().lower())
        except ValueError:
            choices = ", ".join(a.value for a in cls)
            raise InvalidArgument(f"unknown ceremony action {name!r}; use one of: {choices}"
                                  ) from None

    @property
    def touches_key(self) -> bool:
        return self in _KEY_ACTIONS

    @property
    def needs_hsm(self) -> bool:
        """Whether executing it generates a key pair in the approving signer's HSM."""
        return self in (Action.CREATE_KEY, Action.ROTATE)


_KEY_ACTIONS = frozenset({
    Action.CREATE_KEY, Action.ROTATE, Action.REVOKE, Action.DISABLE, Action.ENABLE,
    Action.SCHEDULE_DESTROY, Action.CANCEL_DESTROY, Action.SET_MIN_VERSION,
})
_VERSION_ACTIONS = frozenset({
    Action.REVOKE, Action.DISABLE, Action.ENABLE, Action.SCHEDULE_DESTROY,
    Action.CANCEL_DESTROY, Action.SET_MIN_VERSION,
})


# -- custodians ---------------------------------------------------------------------------------


def load_public_key_pem(pem: str, where: str) -> Any:
    """The cryptography public key of an Ed25519 or ECDSA P-256 PEM; raises ``InvalidArgument``
    naming ``where``."""
    try:
        public = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as error:
        raise InvalidArgument(f"{where} is not a PEM public key: {error}") from None
    if isinstance(public, ed25519.Ed25519PublicKey):
        return public
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
        return public
    raise InvalidArgument(f"{where} must be an Ed25519 or ECDSA P-256 public key")


def pem_key_id(pem: str, where: str = "the public key") -> str:
    """Signet's key id (hex SHA-256 of the DER SubjectPublicKeyInfo) of a PEM public key."""
    public = load_public_key_pem(pem, where)
    return key_id_for(public.public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo))


def verify_signature(public_key_pem: str, message: bytes, signature: bytes) -> None:
    """Check a custodian signature: Ed25519 over ``message``, or DER ECDSA P-256 over
    SHA-256(``message``) — securesystemslib's ``ed25519`` and ``ecdsa-sha2-nistp256`` schemes.
    Raises ``PermissionDenied`` when it does not verify."""
    public = load_public_key_pem(public_key_pem, "the custodian key")
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, message)
        else:
            public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise PermissionDenied("the approval signature does not verify with the custodian's "
                               "public key") from None


@dataclass(frozen=True)
class Custodian:
    name: str
    public_key_pem: str
    key_id: str = ""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise InvalidArgument(f"custodian name {self.name!r} is not valid: 1-64 letters, "
                                  "digits, '.', '_', '@' or '-'")
        computed = pem_key_id(self.public_key_pem, f"custodian {self.name}'s public key")
        if self.key_id and self.key_id != computed:
            raise InvalidArgument(f"custodian {self.name}: key_id does not match the public key")
        object.__setattr__(self, "key_id", computed)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "public_key_pem": self.public_key_pem, "key_id": self.key_id}


@dataclass(frozen=True)
class CustodianSet:
    """Who approves, and how many of them must. ``emergency_threshold`` (at most
    ``threshold``) applies only to revocations proposed as emergencies."""

    custodians: tuple[Custodian, ...]
    threshold: int
    emergency_threshold: int

    def __post_init__(self) -> None:
        if not self.custodians:
            raise InvalidArgument("a custodian set needs at least one custodian")
        names = [c.name for c in self.custodians]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"custodian names must be unique: {sorted(names)}")
        ids = [c.key_id for c in self.custodians]
        if len(set(ids)) != len(ids):
            raise InvalidArgument("two custodians share one public key; each needs their own")
        if not 1 <= self.threshold <= len(self.custodians):
            raise InvalidArgument(f"the threshold must be between 1 and the "
                                  f"{len(self.custodians)} custodians, got {self.threshold}")
        if not 1 <= self.emergency_threshold <= self.threshold:
            raise InvalidArgument(f"the emergency threshold must be between 1 and the threshold "
                                  f"({self.threshold}), got {self.emergency_threshold}")

    def by_key_id(self, key_id: str) -> Custodian | None:
        return next((c for c in self.custodians if c.key_id == key_id), None)

    def to_dict(self) -> dict[str, Any]:
        return {"custodians": [c.to_dict() for c in self.custodians],
                "threshold": self.threshold, "emergency_threshold": self.emergency_threshold}

    @classmethod
    def from_dict(cls, data: Any) -> CustodianSet:
        """Raises ``InvalidArgument`` naming the malformed field."""
        if not isinstance(data, Mapping):
            raise InvalidArgument("a custodian set must be a mapping")
        raw = data.get("custodians")
        if not isinstance(raw, list):
            raise InvalidArgument("custodian set field 'custodians' must be a list")
        custodians = []
        for index, item in enumerate(raw):
            if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) \
                    or not isinstance(item.get("public_key_pem"), str):
                raise InvalidArgument(f"custodians[{index}] needs 'name' and 'public_key_pem'")
            custodians.append(Custodian(item["name"], item["public_key_pem"],
                                        str(item.get("key_id", ""))))
        threshold = data.get("threshold")
        emergency = data.get("emergency_threshold", threshold)
        if isinstance(threshold, bool) or not isinstance(threshold, int) \
                or isinstance(emergency, bool) or not isinstance(emergency, int):
            raise InvalidArgument("custodian set fields 'threshold' and 'emergency_threshold' "
                                  "must be whole numbers")
        return cls(tuple(custodians), threshold, emergency)


# -- proposals ----------------------------------------------------------------------------------


def _number(params: Mapping[str, Any], name: str, *, minimum: float = 0,
            required: bool = False, whole: bool = False) -> int | float | None:
    value = params.get(name)
    if value is None:
        if required:
            raise InvalidArgument(f"parameter {name!r} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise InvalidArgument(f"parameter {name!r} must be a number >= {minimum:g}")
    if whole and not float(value).is_integer():
        raise InvalidArgument(f"parameter {name!r} must be a whole number")
    return int(value) if whole else value


def _key_parameters(action: Action, params: Mapping[str, Any]) -> dict[str, Any]:
    name = params.get("name")
    if not isinstance(name, str):
        raise InvalidArgument("parameter 'name' (the key name) is required")
    out: dict[str, Any] = {"name": validate_key_name(name)}
    if action is Action.CREATE_KEY:
        algorithm = Algorithm.parse(str(params.get("algorithm", "ecdsa-p256")))
        replication = Replication.parse(str(params.get("replication", "regional")))
        if replication is Replication.MULTI_REGION and not algorithm.wrappable:
            raise InvalidArgument(f"{algorithm.short_name} keys can only be regional")
        period = _number(params, "rotation_period_seconds", minimum=1, whole=True)
        return out | {"algorithm": algorithm.value, "replication": replication.value,
                      "rotation_period_seconds": period}
    if action is Action.ROTATE:
        return out | {"retire_grace_seconds": _number(params, "retire_grace_seconds") or 0}
    out["version"] = _number(params, "version", minimum=1, required=True, whole=True)
    if action is Action.REVOKE:
        emergency = params.get("emergency", False)
        if not isinstance(emergency, bool):
            raise InvalidArgument("parameter 'emergency' must be true or false")
        out["emergency"] = emergency
    if action is Action.SCHEDULE_DESTROY:
        out["waiting_seconds"] = _number(params, "waiting_seconds")
    return out


def _region_parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    region = params.get("region")
    pem = params.get("transport_key_pem")
    if not isinstance(region, str) or not _NAME.match(region):
        raise InvalidArgument("parameter 'region' must be a region name")
    if not isinstance(pem, str):
        raise InvalidArgument("parameter 'transport_key_pem' (PEM public key) is required")
    _transport_key_check(pem)
    return {"region": region, "transport_key_pem": pem}


def _root_parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """The exact unsigned root the custodians sign (built by the server at propose time)."""
    root = params.get("root")
    version = _number(params, "version", minimum=2, required=True, whole=True)
    if not isinstance(root, Mapping) or root.get("_type") != "root" \
            or root.get("version") != version:
        raise InvalidArgument(f"parameter 'root' must be the signed part of root version "
                              f"{version}")
    return {"version": version, "root": dict(root)}


def normalize_parameters(action: Action, params: Mapping[str, Any]) -> dict[str, Any]:
    """The canonical parameters of ``action``: validated, defaults filled in, unknown fields
    refused. Raises ``InvalidArgument`` naming the field."""
    if not isinstance(params, Mapping):
        raise InvalidArgument("proposal parameters must be a JSON object")
    if action.touches_key:
        out = _key_parameters(action, params)
    elif action is Action.POLICY:
        out = {"policy": AccessPolicy.from_dict(params.get("policy")).to_dict()}
    elif action is Action.CUSTODIANS:
        out = {"custodian_set": CustodianSet.from_dict(params.get("custodian_set")).to_dict()}
    elif action is Action.ONBOARD_REGION:
        out = _region_parameters(params)
    else:
        out = _root_parameters(params)
    unknown = set(params) - set(out)
    if unknown:
        raise InvalidArgument(f"unknown parameters for {action.value}: {sorted(unknown)}")
    return out


def _transport_key_check(pem: str) -> None:
    try:
        public = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as error:
        raise InvalidArgument(f"the transport key is not a PEM public key: {error}") from None
    from cryptography.hazmat.primitives.asymmetric import rsa

    if not isinstance(public, rsa.RSAPublicKey) or public.key_size < 3072:
        raise InvalidArgument("a region transport key must be RSA with at least 3072 bits "
                              "(it wraps keys with RSA-OAEP, DESIGN.md)")


@dataclass(frozen=True)
class ProposalBody:
    """Exactly what custodians approve. Its canonical JSON is hashed into the proposal id."""

    action: Action
    parameters: Mapping[str, Any]
    proposer: str
    created_at: int
    expires_at: int
    nonce: str

    def __post_init__(self) -> None:
        if self.expires_at <= self.created_at:
            raise InvalidArgument("a proposal must expire after it is created")
        if not re.fullmatch(r"[0-9a-f]{32,64}", self.nonce):
            raise InvalidArgument("the proposal nonce must be 32-64 lowercase hex digits")

    @classmethod
    def new(cls, *, action: Action, parameters: Mapping[str, Any], proposer: str, now: float,
            nonce: str, lifetime_seconds: float = DEFAULT_LIFETIME_SECONDS,
            min_lifetime_seconds: float = MIN_LIFETIME_SECONDS) -> ProposalBody:
        """A validated body; raises ``InvalidArgument`` for bad parameters or lifetime."""
        if not min_lifetime_seconds <= lifetime_seconds <= MAX_LIFETIME_SECONDS:
            raise InvalidArgument(f"a proposal lives {min_lifetime_seconds:g} s to "
                                  f"{MAX_LIFETIME_SECONDS} s, got {lifetime_seconds:g}")
        created = int(now)
        return cls(action, normalize_parameters(action, parameters), proposer, created,
                   created + int(lifetime_seconds), nonce)

    def to_dict(self) -> dict[str, Any]:
        return {"format": PROPOSAL_FORMAT, "action": self.action.value,
                "parameters": dict(self.parameters), "proposer": self.proposer,
                "created_at": self.created_at, "expires_at": self.expires_at,
                "nonce": self.nonce}

    def canonical(self) -> bytes:
        return canonical_json(self.to_dict())

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    @classmethod
    def from_dict(cls, data: Any) -> ProposalBody:
        """Raises ``InvalidArgument``; re-validates the parameters, so a stored body that
        does not survive normalisation unchanged is refused."""
        if not isinstance(data, Mapping) or data.get("format") != PROPOSAL_FORMAT:
            raise InvalidArgument(f"a proposal body must have format {PROPOSAL_FORMAT!r}")
        try:
            body = cls(Action.parse(str(data["action"])), dict(data["parameters"]),
                       str(data["proposer"]), int(data["created_at"]), int(data["expires_at"]),
                       str(data["nonce"]))
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidArgument(f"malformed proposal body: {error}") from None
        if normalize_parameters(body.action, body.parameters) != dict(body.parameters):
            raise InvalidArgument("the proposal parameters are not in canonical form")
        return body

    def describe(self) -> str:
        """One line saying exactly what executing this proposal does."""
        p = self.parameters
        what: dict[Action, Callable[[], str]] = {
            Action.CREATE_KEY: lambda: (
                f"create key {p.get('name')!r} ({p.get('algorithm')}, {p.get('replication')}"
                + (f", rotated every {p['rotation_period_seconds']} s"
                   if p.get("rotation_period_seconds") else "") + ") in the approving HSM"),
            Action.ROTATE: lambda: f"rotate key {p.get('name')!r} (new primary version; the old "
                                   f"primary retires after {p.get('retire_grace_seconds')} s)",
            Action.REVOKE: lambda: f"REVOKE key {p.get('name')!r} version {p.get('version')} "
                                   "(final)" + (" as an EMERGENCY" if p.get("emergency") else ""),
            Action.DISABLE: lambda: f"disable key {p.get('name')!r} version {p.get('version')}",
            Action.ENABLE: lambda: f"enable key {p.get('name')!r} version {p.get('version')}",
            Action.SCHEDULE_DESTROY: lambda: (
                f"schedule destruction of key {p.get('name')!r} version {p.get('version')} "
                + (f"after {p['waiting_seconds']} s" if p.get("waiting_seconds") is not None
                   else "after the cluster's waiting period")),
            Action.CANCEL_DESTROY: lambda: (f"cancel destruction of key {p.get('name')!r} "
                                            f"version {p.get('version')}"),
            Action.SET_MIN_VERSION: lambda: (f"refuse signing with key {p.get('name')!r} "
                                             f"versions below {p.get('version')}"),
            Action.POLICY: lambda: (f"replace the access policy with "
                                    f"{len(p['policy']['bindings'])} bindings"),
            Action.CUSTODIANS: lambda: (
                "replace the custodian set with "
                + ", ".join(c["name"] for c in p["custodian_set"]["custodians"])
                + f" (threshold {p['custodian_set']['threshold']}, emergency "
                  f"{p['custodian_set']['emergency_threshold']})"),
            Action.ONBOARD_REGION: lambda: (f"onboard region {p.get('region')!r} with its RSA "
                                            "transport key"),
            Action.ROTATE_ROOT: lambda: f"sign and store TUF root version {p.get('version')}",
        }
        return what[self.action]()


class Status(enum.Enum):
    OPEN = "open"
    EXECUTED = "executed"
    CANCELLED = "cancelled"
    FAILED = "failed"  # threshold reached, but the action could not run (e.g. illegal move)
    EXPIRED = "expired"  # never stored: an OPEN proposal past its expiry reads as this


@dataclass(frozen=True)
class ApprovalStatement:
    """The payload of an approval envelope."""

    proposal_id: str
    body_sha256: str
    root_signature: str | None = None  # hex TUF signature over the proposed root (rotate-root)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": APPROVAL_FORMAT, "proposal_id": self.proposal_id,
                                "body_sha256": self.body_sha256}
        if self.root_signature is not None:
            data["root_signature"] = self.root_signature
        return data

    def payload(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_payload(cls, payload: bytes) -> ApprovalStatement:
        try:
            data = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidArgument("the approval payload is not JSON") from None
        if not isinstance(data, Mapping) or data.get("format") != APPROVAL_FORMAT:
            raise InvalidArgument(f"the approval payload must have format {APPROVAL_FORMAT!r}")
        unknown = set(data) - {"format", "proposal_id", "body_sha256", "root_signature"}
        if unknown:
            raise InvalidArgument(f"the approval payload has unknown fields: {sorted(unknown)}")
        pid, body_hash, root_sig = (data.get("proposal_id"), data.get("body_sha256"),
                                    data.get("root_signature"))
        if not isinstance(pid, str) or not isinstance(body_hash, str) \
                or not _HEX64.match(pid) or not _HEX64.match(body_hash):
            raise InvalidArgument("the approval payload needs hex 'proposal_id' and "
                                  "'body_sha256'")
        if root_sig is not None and not (isinstance(root_sig, str)
                                         and re.fullmatch(r"[0-9a-f]{2,1024}", root_sig)):
            raise InvalidArgument("the approval's 'root_signature' must be hex")
        return cls(pid, body_hash, root_sig)


def approval_envelope(statement: ApprovalStatement, key_id: str, signature: bytes
                      ) -> dict[str, Any]:
    """The DSSE envelope (JSON object) carrying ``statement`` and one custodian signature
    over ``pae(APPROVAL_PAYLOAD_TYPE, statement.payload())``."""
    return {"payload": base64.b64encode(statement.payload()).decode(),
            "payloadType": APPROVAL_PAYLOAD_TYPE,
            "signatures": [{"keyid": key_id, "sig": base64.b64encode(signature).decode()}]}


@dataclass(frozen=True)
class Approval:
    """One custodian's accepted approval, as stored with the proposal (envelope included, so
    anyone can re-check it offline)."""

    custodian: str
    key_id: str
    approved_at: float
    envelope: Mapping[str, Any]
    root_signature: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"custodian": self.custodian, "key_id": self.key_id,
                "approved_at": self.approved_at, "envelope": dict(self.envelope),
                "root_signature": self.root_signature}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Approval:
        return cls(str(data["custodian"]), str(data["key_id"]), float(data["approved_at"]),
                   dict(data["envelope"]), data.get("root_signature"))


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidArgument(f"approval envelope field {where!r} must be base64")
    try:
        return base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"approval envelope field {where!r} is not valid base64") from None


def open_approval(envelope: Any, custodians: CustodianSet
                  ) -> tuple[Custodian, ApprovalStatement]:
    """Check an approval envelope's form and its one signature. Returns the custodian who
    signed and the statement. Raises ``InvalidArgument`` for a malformed envelope,
    ``PermissionDenied`` for a key that is not a custodian's or a signature that does not
    verify."""
    if not isinstance(envelope, Mapping):
        raise InvalidArgument("an approval must be a DSSE envelope (JSON object)")
    if envelope.get("payloadType") != APPROVAL_PAYLOAD_TYPE:
        raise InvalidArgument(f"an approval envelope has payloadType {APPROVAL_PAYLOAD_TYPE!r}, "
                              f"not {envelope.get('payloadType')!r}")
    payload = _b64(envelope.get("payload"), "payload")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or len(signatures) != 1 \
            or not isinstance(signatures[0], Mapping):
        raise InvalidArgument("an approval envelope carries exactly one custodian signature")
    keyid = signatures[0].get("keyid")
    signature = _b64(signatures[0].get("sig"), "signatures[0].sig")
    custodian = custodians.by_key_id(keyid) if isinstance(keyid, str) else None
    if custodian is None:
        raise PermissionDenied(f"key {keyid!r} is not a custodian key of this cluster; only "
                               f"{', '.join(c.name for c in custodians.custodians)} may approve")
    verify_signature(custodian.public_key_pem, pae(APPROVAL_PAYLOAD_TYPE, payload), signature)
    return custodian, ApprovalStatement.from_payload(payload)


@dataclass(frozen=True)
class Proposal:
    """A proposal and what has happened to it. ``status`` is the stored status; ask
    ``status_at(now)`` for the one that counts (an open proposal past expiry is EXPIRED)."""

    body: ProposalBody
    status: Status = Status.OPEN
    approvals: tuple[Approval, ...] = ()
    closed_at: float | None = None
    closed_by: str = ""
    outcome: Mapping[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.body.sha256

    @property
    def action(self) -> Action:
        return self.body.action

    def status_at(self, now: float) -> Status:
        if self.status is Status.OPEN and now >= self.body.expires_at:
            return Status.EXPIRED
        return self.status

    def closed_since(self, now: float) -> float | None:
        """When the proposal stopped taking approvals (closed, or expired), or None while it
        is open."""
        status = self.status_at(now)
        if status is Status.OPEN:
            return None
        if status is Status.EXPIRED:
            return float(self.body.expires_at)
        return self.closed_at if self.closed_at is not None else float(self.body.created_at)

    def required(self, custodians: CustodianSet) -> int:
        """How many distinct custodians must approve: the emergency threshold for emergency
        revocations, the threshold otherwise."""
        if self.action is Action.REVOKE and self.body.parameters.get("emergency"):
            return custodians.emergency_threshold
        return custodians.threshold

    def counted(self, custodians: CustodianSet) -> tuple[Approval, ...]:
        """Approvals by custodians still in ``custodians`` (a custodian removed since
        approving no longer counts), each re-verified."""
        counted = []
        for approval in self.approvals:
            custodian = custodians.by_key_id(approval.key_id)
            if custodian is None:
                continue
            try:
                _, statement = open_approval(approval.envelope, custodians)
            except (InvalidArgument, PermissionDenied):
                continue
            if statement.proposal_id == self.id and statement.body_sha256 == self.body.sha256:
                counted.append(approval)
        return tuple(counted)

    def threshold_met(self, custodians: CustodianSet) -> bool:
        return len(self.counted(custodians)) >= self.required(custodians)

    def _require_open(self, now: float, doing: str) -> None:
        status = self.status_at(now)
        if status is Status.OPEN:
            return
        if status is Status.EXPIRED:
            raise FailedPrecondition(f"proposal {self.id[:16]} expired at {self.body.expires_at} "
                                     f"and cannot be {doing}; propose it again")
        raise FailedPrecondition(f"proposal {self.id[:16]} is {status.value} and cannot be "
                                 f"{doing}")

    def approve(self, envelope: Any, custodians: CustodianSet, now: float) -> Proposal:
        """This proposal with one more approval. Raises ``FailedPrecondition`` when it is not
        open (executed, cancelled, failed, expired), ``InvalidArgument`` for a malformed or
        foreign approval (another proposal's id, another body hash, a rotate-root approval
        without the root signature), ``PermissionDenied`` for a non-custodian or bad
        signature, ``AlreadyExists`` when this custodian approved already."""
        self._require_open(now, "approved")
        custodian, statement = open_approval(envelope, custodians)
        if statement.proposal_id != self.id:
            raise InvalidArgument(f"this approval is for proposal {statement.proposal_id[:16]}, "
                                  f"not {self.id[:16]}; an approval never counts for another")
        if statement.body_sha256 != self.body.sha256:
            raise InvalidArgument("the approval's body hash does not match this proposal's "
                                  "body; sign the proposal exactly as shown by 'ceremony show'")
        if (self.action is Action.ROTATE_ROOT) != (statement.root_signature is not None):
            raise InvalidArgument("a rotate-root approval (and only that) carries the "
                                  "custodian's signature over the proposed root")
        if any(a.key_id == custodian.key_id or a.custodian == custodian.name
               for a in self.approvals):
            raise AlreadyExists(f"custodian {custodian.name} approved proposal {self.id[:16]} "
                                "already; each custodian counts once")
        approval = Approval(custodian.name, custodian.key_id, now, dict(envelope),
                            statement.root_signature)
        return replace(self, approvals=(*self.approvals, approval))

    def cancel(self, by: str, now: float) -> Proposal:
        """Raises ``FailedPrecondition`` unless open."""
        self._require_open(now, "cancelled")
        return replace(self, status=Status.CANCELLED, closed_at=now, closed_by=by)

    def executed(self, now: float, outcome: Mapping[str, Any]) -> Proposal:
        return replace(self, status=Status.EXECUTED, closed_at=now,
                       closed_by=",".join(a.custodian for a in self.approvals),
                       outcome=dict(outcome))

    def failed(self, now: float, error: str) -> Proposal:
        return replace(self, status=Status.FAILED, closed_at=now,
                       closed_by=",".join(a.custodian for a in self.approvals),
                       outcome={"error": error})

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "body": self.body.to_dict(), "status": self.status.value,
                "approvals": [a.to_dict() for a in self.approvals],
                "closed_at": self.closed_at, "closed_by": self.closed_by,
                "outcome": dict(self.outcome)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Proposal:
        """Raises ``InvalidArgument`` for a malformed record or an id that does not match."""
        try:
            proposal = cls(
                ProposalBody.from_dict(data["body"]), Status(data["status"]),
                tuple(Approval.from_dict(a) for a in data["approvals"]),
                None if data.get("closed_at") is None else float(data["closed_at"]),
                str(data.get("closed_by", "")), dict(data.get("outcome") or {}),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidArgument(f"malformed proposal record: {error}") from None
        if data.get("id") != proposal.id:
            raise InvalidArgument("a proposal record's id does not match its body")
        return proposal
