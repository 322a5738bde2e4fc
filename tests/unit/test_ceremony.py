"""The pure ceremony model (kms/domain/ceremony.py): thresholds, and every way an approval
must be refused. No I/O: keys are generated in memory, time is passed in."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from kms.domain.ceremony import (
    APPROVAL_PAYLOAD_TYPE,
    Action,
    ApprovalStatement,
    Custodian,
    CustodianSet,
    Proposal,
    ProposalBody,
    Status,
    approval_envelope,
    pae,
    pem_key_id,
)
from kms.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KmsError,
    PermissionDenied,
)

NOW = 1_700_000_000.0
NONCE = "ab" * 16


@dataclass(frozen=True)
class Holder:
    """A custodian's private key, as it would sit on their own machine."""

    name: str
    private: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> str:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    @property
    def key_id(self) -> str:
        return pem_key_id(self.pem)

    def sign(self, message: bytes) -> bytes:
        if isinstance(self.private, ed25519.Ed25519PrivateKey):
            return self.private.sign(message)
        from cryptography.hazmat.primitives import hashes

        return self.private.sign(message, ec.ECDSA(hashes.SHA256()))

    def approve(self, proposal: Proposal, *, proposal_id: str | None = None,
                body_sha256: str | None = None, root_signature: str | None = None
                ) -> dict[str, Any]:
        statement = ApprovalStatement(proposal_id or proposal.id,
                                      body_sha256 or proposal.body.sha256, root_signature)
        return approval_envelope(statement, self.key_id,
                                 self.sign(pae(APPROVAL_PAYLOAD_TYPE, statement.payload())))


ALICE = Holder("alice", ed25519.Ed25519PrivateKey.generate())
BOB = Holder("bob", ec.generate_private_key(ec.SECP256R1()))
CAROL = Holder("carol", ed25519.Ed25519PrivateKey.generate())
MALLORY = Holder("mallory", ed25519.Ed25519PrivateKey.generate())
CUSTODIANS = CustodianSet(tuple(Custodian(h.name, h.pem) for h in (ALICE, BOB, CAROL)),
                          threshold=2, emergency_threshold=1)


def proposal(action: Action = Action.ROTATE, **params: Any) -> Proposal:
    params = params or {"name": "release"}
    return Proposal(ProposalBody.new(action=action, parameters=params, proposer="admin",
                                     now=NOW, nonce=NONCE, lifetime_seconds=3600))


def approved_by(p: Proposal, *holders: Holder, now: float = NOW + 1) -> Proposal:
    for holder in holders:
        p = p.approve(holder.approve(p), CUSTODIANS, now)
    return p


# -- thresholds ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("action", "params", "holders", "met"), [
    (Action.ROTATE, {"name": "k"}, (), False),
    (Action.ROTATE, {"name": "k"}, (ALICE,), False),
    (Action.ROTATE, {"name": "k"}, (ALICE, BOB), True),
    (Action.ROTATE, {"name": "k"}, (ALICE, BOB, CAROL), True),
    (Action.REVOKE, {"name": "k", "version": 1}, (ALICE,), False),
    (Action.REVOKE, {"name": "k", "version": 1, "emergency": True}, (ALICE,), True),
    (Action.POLICY, {"policy": {"version": 1, "bindings": []}}, (BOB,), False),
    (Action.CREATE_KEY, {"name": "k", "algorithm": "ed25519"}, (CAROL, BOB), True),
])
def test_threshold(action: Action, params: dict[str, Any], holders: tuple[Holder, ...],
                   met: bool) -> None:
    p = approved_by(proposal(action, **params), *holders)
    assert p.threshold_met(CUSTODIANS) is met
    assert p.status is Status.OPEN  # approving never executes by itself: the store does that


def test_emergency_threshold_applies_only_to_emergency_revocations() -> None:
    # Nothing but REVOKE accepts the 'emergency' parameter at all.
    for action in (Action.ROTATE, Action.DISABLE, Action.SCHEDULE_DESTROY):
        with pytest.raises(InvalidArgument, match="unknown parameters"):
            proposal(action, name="k", version=1, emergency=True)
    assert proposal(Action.REVOKE, name="k", version=1).required(CUSTODIANS) == 2
    assert proposal(Action.REVOKE, name="k", version=1,
                    emergency=True).required(CUSTODIANS) == 1


def test_a_removed_custodian_no_longer_counts() -> None:
    p = approved_by(proposal(), ALICE, BOB)
    without_bob = CustodianSet((Custodian("alice", ALICE.pem), Custodian("carol", CAROL.pem)),
                               2, 1)
    assert [a.custodian for a in p.counted(without_bob)] == ["alice"]
    assert not p.threshold_met(without_bob)


# -- refusals -----------------------------------------------------------------------------------

OTHER = proposal(Action.ROTATE, name="other")


def _tampered_signature(p: Proposal) -> dict[str, Any]:
    envelope = ALICE.approve(p)
    envelope["signatures"][0]["sig"] = base64.b64encode(b"\x00" * 64).decode()
    return envelope


def _swapped_payload(p: Proposal) -> dict[str, Any]:
    envelope = ALICE.approve(p)
    envelope["payload"] = ALICE.approve(OTHER)["payload"]
    return envelope


def _wrong_type(p: Proposal) -> dict[str, Any]:
    envelope = ALICE.approve(p)
    envelope["payloadType"] = "application/vnd.in-toto+json"
    return envelope


def _two_signatures(p: Proposal) -> dict[str, Any]:
    envelope = ALICE.approve(p)
    envelope["signatures"] += BOB.approve(p)["signatures"]
    return envelope


Case = tuple[str, Callable[[], Proposal], Callable[[Proposal], Any], float,
             type[KmsError], str]
REFUSALS: list[Case] = [
    ("duplicate custodian", lambda: approved_by(proposal(), ALICE),
     ALICE.approve, NOW + 2, AlreadyExists, "alice approved proposal"),
    ("replayed envelope", lambda: approved_by(proposal(), ALICE),
     lambda p: p.approvals[0].envelope, NOW + 2, AlreadyExists, "counts once"),
    ("expired", proposal, ALICE.approve, NOW + 3600, FailedPrecondition,
     "expired"),
    ("cancelled", lambda: proposal().cancel("admin", NOW), ALICE.approve, NOW + 1,
     FailedPrecondition, "is cancelled"),
    ("executed", lambda: approved_by(proposal(), ALICE, BOB).executed(NOW + 1, {}),
     CAROL.approve, NOW + 2, FailedPrecondition, "is executed"),
    ("failed", lambda: approved_by(proposal(), ALICE, BOB).failed(NOW + 1, "x"),
     CAROL.approve, NOW + 2, FailedPrecondition, "is failed"),
    ("approval of another proposal", proposal, lambda p: ALICE.approve(OTHER), NOW + 1,
     InvalidArgument, "never counts for another"),
    ("another proposal's id in a correctly signed payload", proposal,
     lambda p: ALICE.approve(p, proposal_id=OTHER.id), NOW + 1, InvalidArgument,
     "never counts for another"),
    ("body hash mismatch", proposal, lambda p: ALICE.approve(p, body_sha256="0" * 64),
     NOW + 1, InvalidArgument, "body hash does not match"),
    ("non-custodian", proposal, MALLORY.approve, NOW + 1, PermissionDenied,
     "not a custodian key"),
    ("bad signature", proposal, _tampered_signature, NOW + 1, PermissionDenied,
     "does not verify"),
    ("payload swapped under a signature", proposal, _swapped_payload, NOW + 1,
     PermissionDenied, "does not verify"),
    ("wrong payload type", proposal, _wrong_type, NOW + 1, InvalidArgument, "payloadType"),
    ("two signatures", proposal, _two_signatures, NOW + 1, InvalidArgument, "exactly one"),
    ("not an envelope", proposal, lambda p: ["nope"], NOW + 1, InvalidArgument, "DSSE"),
    ("root signature on a non-root proposal", proposal,
     lambda p: ALICE.approve(p, root_signature="ab"), NOW + 1, InvalidArgument,
     "rotate-root approval"),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_refused_approvals(case: Case) -> None:
    _, make, approval, now, error, message = case
    p = make()
    with pytest.raises(error, match=message):
        p.approve(approval(p), CUSTODIANS, now)


# -- the proposal itself ------------------------------------------------------------------------

def test_id_is_the_hash_of_the_canonical_body_and_round_trips() -> None:
    p = approved_by(proposal(Action.SCHEDULE_DESTROY, name="k", version=2, waiting_seconds=5),
                    ALICE)
    import hashlib

    assert p.id == hashlib.sha256(p.body.canonical()).hexdigest()
    stored = json.loads(json.dumps(p.to_dict()))
    assert Proposal.from_dict(stored) == p
    stored["body"]["parameters"]["version"] = 3  # an edited body no longer matches its id
    with pytest.raises(InvalidArgument, match="id does not match"):
        Proposal.from_dict(stored)


def test_two_identical_requests_make_two_proposals() -> None:
    first = proposal()
    second = Proposal(replace(first.body, nonce="cd" * 16))
    assert first.id != second.id
    # ...so an approval of one is refused for the other.
    with pytest.raises(InvalidArgument):
        second.approve(ALICE.approve(first), CUSTODIANS, NOW + 1)


@pytest.mark.parametrize(("action", "params", "message"), [
    (Action.CREATE_KEY, {"name": "bad/name"}, "not valid"),
    (Action.CREATE_KEY, {"name": "k", "algorithm": "dsa"}, "unknown key algorithm"),
    (Action.CREATE_KEY, {"name": "k", "algorithm": "ed25519", "replication": "multi-region"},
     "only be regional"),
    (Action.REVOKE, {"name": "k"}, "'version' is required"),
    (Action.REVOKE, {"name": "k", "version": 0}, "'version' must be"),
    (Action.ROTATE, {"name": "k", "extra": 1}, "unknown parameters"),
    (Action.SCHEDULE_DESTROY, {"name": "k", "version": 1, "waiting_seconds": -1},
     "'waiting_seconds'"),
    (Action.POLICY, {"policy": {"version": 2}}, "policy version"),
    (Action.CUSTODIANS, {"custodian_set": {"custodians": [], "threshold": 1}},
     "at least one"),
    (Action.ONBOARD_REGION, {"region": "eu", "transport_key_pem": ALICE.pem}, "RSA"),
    (Action.ROTATE_ROOT, {"version": 2, "root": {"_type": "targets"}}, "signed part"),
])
def test_bad_parameters_are_refused_naming_the_field(action: Action, params: dict[str, Any],
                                                     message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        proposal(action, **params)


@pytest.mark.parametrize(("threshold", "emergency", "message"), [
    (0, 0, "threshold must be between 1 and the 3"),
    (4, 1, "threshold must be between 1 and the 3"),
    (2, 3, "emergency threshold must be between 1 and the threshold"),
])
def test_custodian_set_thresholds_are_checked(threshold: int, emergency: int,
                                              message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        CustodianSet(CUSTODIANS.custodians, threshold, emergency)


def test_a_custodian_set_refuses_a_shared_key() -> None:
    with pytest.raises(InvalidArgument, match="share one public key"):
        CustodianSet((Custodian("a", ALICE.pem), Custodian("b", ALICE.pem)), 1, 1)


def test_cancel_closes_and_an_expired_proposal_cannot_be_cancelled() -> None:
    p = proposal()
    assert p.status_at(NOW + 3599) is Status.OPEN
    assert p.status_at(NOW + 3600) is Status.EXPIRED
    with pytest.raises(FailedPrecondition, match="expired"):
        p.cancel("admin", NOW + 3600)
    cancelled = p.cancel("admin", NOW + 5)
    assert (cancelled.status, cancelled.closed_by) == (Status.CANCELLED, "admin")
