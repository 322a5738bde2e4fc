"""Custodian ceremony use cases: propose, approve, execute once, cancel (DESIGN.md I6).

Records (``StateLayout``): ``{prefix}/custodians`` (the custodian set),
``{prefix}/ceremonies/proposals/<id>`` (one proposal with its approvals and outcome) and, for
region onboarding, ``{prefix}/regions/<name>``.

Every approval is a compare-and-swap on the proposal record (and on the custodian set, so a
set replaced meanwhile is re-read). The approval that reaches the threshold executes the
action in the *same* etcd transaction that closes the proposal, comparing the proposal record
and every record the action writes; so however many signer processes receive approvals at
once, exactly one transaction executes it and the others re-read a closed proposal. Key pairs
for create-key and rotate are generated in the approving signer's HSM just before that
transaction and removed again when it loses.

docs/adr/0009-custodian-ceremonies.md records the decisions.
"""

from __future__ import annotations

import copy
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import Signature
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root

from kms.admin import KeyAdministration, LifecycleSettings
from kms.domain.ceremony import (
    MIN_LIFETIME_SECONDS,
    Action,
    CustodianSet,
    Proposal,
    ProposalBody,
    Status,
    canonical_json,
)
from kms.domain.keys import Algorithm, Key, Replication
from kms.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    KmsError,
    NotFound,
    StateStoreError,
    Unavailable,
)
from kms.ports import AuditRecorder, Clock, Hsm, VersionedKey
from kms.signing import Caller
from kms.state.etcd import StateLayout
from kms.state.fence import FenceReport, SignerFence
from kms.state.view import KeyStateView
from kms.tuf.repository import OnlineKey, build_root, tuf_key
from kms.tuf.store import RecordStore

log = logging.getLogger(__name__)

ROOT_LIFETIME_SECONDS = 365 * 86_400.0
_ATTEMPTS = 8  # re-reads after lost compare-and-swaps before giving up with ABORTED
# Errors that mean "this action can never run as proposed": the proposal closes as failed.
_TERMINAL = (FailedPrecondition, NotFound, InvalidArgument, AlreadyExists)


@dataclass(frozen=True)
class StoredProposal:
    """A proposal as read from etcd: ``revision`` is its record's mod_revision (for an
    executed proposal, the revision at which the action took effect)."""

    proposal: Proposal
    revision: int
    required: int  # approvals needed under the current custodian set
    counted: tuple[str, ...]  # custodians whose approvals count now


@dataclass(frozen=True)
class ApprovalResult:
    stored: StoredProposal
    executed: bool
    key: VersionedKey | None = None
    fence: FenceReport | None = None


@dataclass
class _Effect:
    puts: dict[str, bytes]
    expect: dict[str, int]
    outcome: dict[str, Any]
    key: Key | None = None
    discard: bytes | None = None  # HSM object to remove if the transaction loses
    extra: dict[str, Any] = field(default_factory=dict)


def _decode(path: str, value: bytes) -> Any:
    try:
        return json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StateStoreError(f"etcd record {path} is not JSON: {error}") from None


def root_signed_bytes(root: Mapping[str, Any]) -> bytes:
    """The bytes custodians sign for a TUF root: canonical JSON of its ``signed`` part."""
    metadata = Metadata[Root].from_dict({"signed": copy.deepcopy(dict(root)), "signatures": []})
    return metadata.signed_bytes


class Ceremonies:
    """Propose, approve, list and cancel custodian ceremonies in one signer process."""

    def __init__(
        self, *, records: RecordStore, layout: StateLayout, admin: KeyAdministration,
        hsm: Hsm, view: KeyStateView, clock: Clock, fence: SignerFence | None,
        settings: LifecycleSettings, audit: AuditRecorder | None,
        nonce: Callable[[], str] = lambda: secrets.token_hex(16),
        min_lifetime_seconds: float = MIN_LIFETIME_SECONDS,
    ) -> None:
        self._min_lifetime = min_lifetime_seconds
        self._records = records
        self._layout = layout
        self._admin = admin
        self._hsm = hsm
        self._view = view
        self._clock = clock
        self._fence = fence
        self._settings = settings
        self._audit = audit
        self._nonce = nonce

    async def _record(self, event: str, proposal: Proposal, **fields: Any) -> None:
        """Append a ``ceremony`` audit entry (ids, names and revisions; never key material
        or signatures)."""
        if self._audit is not None:
            await self._audit.record_event("ceremony", {
                "event": event, "proposal": proposal.id, "action": proposal.action.value,
                **fields})

    # -- reads ----------------------------------------------------------------------------

    async def custodians(self) -> tuple[CustodianSet, int]:
        """The custodian set and its record's mod_revision. Raises ``FailedPrecondition``
        when none is configured."""
        path = self._layout.custodians
        read = await self._records.read_records([path])
        if path not in read.records:
            raise FailedPrecondition(
                "no custodian set is configured, so no ceremony can run; bootstrap one with "
                "'signet init --custodian NAME=PUBKEY.pem … --threshold M' (or 'signet dev up')")
        value, revision = read.records[path]
        return CustodianSet.from_dict(_decode(path, value)), revision

    async def get_custodians(self, caller: Caller) -> tuple[CustodianSet, int]:
        """The custodian set and its revision, for administrators and custodians' tools."""
        self._admin.authorize(caller, "read the custodian set")
        return await self.custodians()

    def _stored(self, proposal: Proposal, revision: int, custodians: CustodianSet
                ) -> StoredProposal:
        return StoredProposal(proposal, revision, proposal.required(custodians),
                              tuple(a.custodian for a in proposal.counted(custodians)))

    async def _read(self, proposal_id: str) -> tuple[Proposal, int, CustodianSet, int]:
        path = self._layout.proposal(proposal_id)
        read = await self._records.read_records([path, self._layout.custodians])
        if path not in read.records:
            raise NotFound(f"no proposal {proposal_id!r}; list them with 'signet ceremony list'")
        value, revision = read.records[path]
        proposal = Proposal.from_dict(_decode(path, value))
        if self._layout.custodians not in read.records:
            raise FailedPrecondition("the custodian set is missing from etcd")
        raw, custodians_revision = read.records[self._layout.custodians]
        custodians = CustodianSet.from_dict(_decode(self._layout.custodians, raw))
        return proposal, revision, custodians, custodians_revision

    async def get(self, caller: Caller, proposal_id: str) -> StoredProposal:
        self._admin.authorize(caller, "read ceremony proposals")
        proposal, revision, custodians, _ = await self._read(proposal_id)
        return self._stored(proposal, revision, custodians)

    async def list(self, caller: Caller, *, include_closed: bool = False
                   ) -> list[StoredProposal]:
        """Proposals, oldest first; only those still open unless ``include_closed``."""
        self._admin.authorize(caller, "list ceremony proposals")
        custodians, _ = await self.custodians()
        read = await self._records.read_records(prefixes=[self._layout.proposals_dir])
        now = self._clock.now()
        found = []
        for path, (value, revision) in read.records.items():
            proposal = Proposal.from_dict(_decode(path, value))
            if include_closed or proposal.status_at(now) is Status.OPEN:
                found.append(self._stored(proposal, revision, custodians))
        return sorted(found, key=lambda s: (s.proposal.body.created_at, s.proposal.id))

    # -- retention --------------------------------------------------------------------------

    async def purge_closed(self, retention_seconds: float) -> tuple[str, ...]:
        """Delete proposals that were executed, cancelled or failed, or expired, more than
        ``retention_seconds`` ago, each only if unchanged since read (a lost swap waits for
        the next round). The audit log keeps the permanent record: each deletion is audited
        (``purged``) before the next. Returns the deleted ids. Raises what the record store
        raises."""
        read = await self._records.read_records(prefixes=[self._layout.proposals_dir])
        now = self._clock.now()
        purged: tuple[str, ...] = ()
        for path, (value, revision) in read.records.items():
            try:
                proposal = Proposal.from_dict(_decode(path, value))
            except KmsError as error:
                log.warning("proposal record %s is unreadable, left in place: %s", path,
                            error.diagnostics())
                continue
            closed = proposal.closed_since(now)
            if closed is None or now - closed < retention_seconds:
                continue
            try:
                await self._records.write_records({}, expect={path: revision}, deletes=[path])
            except Conflict:
                continue
            await self._record("purged", proposal, status=proposal.status_at(now).value,
                               closed_at=closed, revision=revision)
            purged += (proposal.id,)
        return purged

    # -- propose and cancel ---------------------------------------------------------------

    async def propose(self, caller: Caller, action: Action, parameters: Mapping[str, Any],
                      *, lifetime_seconds: float | None = None) -> StoredProposal:
        """Store a new open proposal. Administrators propose; custodians approve.

        Raises ``PermissionDenied``, ``InvalidArgument`` (bad parameters), ``NotFound`` /
        ``AlreadyExists`` when the named key does not exist / exists already,
        ``FailedPrecondition`` when no custodian set is configured.
        """
        self._admin.authorize(caller, "propose ceremonies")
        custodians, _ = await self.custodians()
        params = dict(parameters)
        if action is Action.ROTATE_ROOT:
            params = await self._proposed_root(custodians)
        if action.touches_key and isinstance(params.get("name"), str):
            self._check_key_target(action, params)
        body = ProposalBody.new(
            action=action, parameters=params, proposer=caller.identity, now=self._clock.now(),
            nonce=self._nonce(), min_lifetime_seconds=self._min_lifetime,
            **({} if not lifetime_seconds else {"lifetime_seconds": lifetime_seconds}))
        proposal = Proposal(body)
        path = self._layout.proposal(proposal.id)
        revision = await self._records.write_records({path: canonical_json(proposal.to_dict())},
                                                     expect={path: 0})
        log.info("proposal %s: %s (by %s)", proposal.id[:16], body.describe(), caller.identity)
        await self._record("proposed", proposal, identity=caller.identity,
                           summary=body.describe(), revision=revision)
        return self._stored(proposal, revision, custodians)

    def _check_key_target(self, action: Action, params: Mapping[str, Any]) -> None:
        """Refuse at once a proposal whose key (or version) does not exist, or a create-key
        for a taken name; execution checks again against the state it then finds."""
        try:
            current = self._view.key(params["name"])
        except NotFound:
            if action is not Action.CREATE_KEY:
                raise
            return
        if action is Action.CREATE_KEY:
            raise AlreadyExists(f"a key named {params['name']!r} exists already")
        version = params.get("version")
        if isinstance(version, int) and not isinstance(version, bool):
            current.key.version(version)

    async def _proposed_root(self, custodians: CustodianSet) -> dict[str, Any]:
        """Root N+1 (unsigned): the custodian set as root keys with its threshold, and every
        registered online key — so a rotation also lists regions onboarded since."""
        read = await self._records.read_records(prefixes=[f"{self._layout.tuf_dir}root/",
                                                          f"{self._layout.tuf_dir}online-keys/"])
        roots = [int(p.rsplit("/", 1)[1]) for p in read.records
                 if p.startswith(f"{self._layout.tuf_dir}root/")]
        if not roots:
            raise FailedPrecondition("no TUF root is stored yet; bootstrap root version 1 first")
        online = [OnlineKey.from_dict(_decode(p, v)) for p, (v, _) in read.records.items()
                  if p.startswith(f"{self._layout.tuf_dir}online-keys/")]
        keys = [tuf_key(_pem_der(c.public_key_pem)) for c in custodians.custodians]
        try:
            root = build_root(custodian_keys=keys, threshold=custodians.threshold,
                              online_keys=[k.tuf_key() for k in online],
                              version=max(roots) + 1,
                              expires=self._clock.now() + ROOT_LIFETIME_SECONDS)
        except ValueError as error:
            raise InvalidArgument(str(error)) from None
        return {"version": max(roots) + 1, "root": root.signed.to_dict()}

    async def cancel(self, caller: Caller, proposal_id: str) -> StoredProposal:
        """Close an open proposal without running it. Raises ``FailedPrecondition`` when it
        is closed or expired already, ``Conflict`` after too many concurrent changes."""
        self._admin.authorize(caller, "cancel ceremony proposals")
        for _ in range(_ATTEMPTS):
            proposal, revision, custodians, _ = await self._read(proposal_id)
            cancelled = proposal.cancel(caller.identity, self._clock.now())
            path = self._layout.proposal(proposal_id)
            try:
                written = await self._records.write_records(
                    {path: canonical_json(cancelled.to_dict())}, expect={path: revision})
            except Conflict:
                continue
            await self._record("cancelled", cancelled, identity=caller.identity,
                               revision=written)
            return self._stored(cancelled, written, custodians)
        raise Conflict(f"proposal {proposal_id[:16]} kept changing; retry the cancel")

    # -- approve and execute --------------------------------------------------------------

    async def approve(self, caller: Caller, proposal_id: str, envelope: Any) -> ApprovalResult:
        """Add one custodian's approval (a DSSE envelope); when that reaches the threshold,
        execute the action once, atomically with closing the proposal.

        Any authenticated caller may deliver an approval: the custodian's signature is what
        counts. Raises what ``Proposal.approve`` raises (refusals are also audited),
        ``FailedPrecondition`` when the threshold was reached but the action cannot run (the
        proposal is then closed as failed), ``Unavailable`` (HSM, etcd, or a revocation fence
        that did not close in time — the revocation is committed then), ``Conflict`` after too
        many concurrent changes.
        """
        for _ in range(_ATTEMPTS):
            proposal, revision, custodians, custodians_revision = await self._read(proposal_id)
            now = self._clock.now()
            try:
                approved = proposal.approve(envelope, custodians, now)
                if approved.action is Action.ROTATE_ROOT:
                    _check_root_signature(approved, custodians)
            except KmsError as error:
                await self._record("approval-refused", proposal, identity=caller.identity,
                                   reason=error.diagnostics())
                raise
            custodian = approved.approvals[-1].custodian
            path = self._layout.proposal(proposal_id)
            if not approved.threshold_met(custodians):
                try:
                    written = await self._records.write_records(
                        {path: canonical_json(approved.to_dict())},
                        expect={path: revision, self._layout.custodians: custodians_revision})
                except Conflict:
                    continue  # another approval landed first: re-read and add ours to it
                log.info("proposal %s approved by %s (%d of %d)", proposal_id[:16], custodian,
                         len(approved.counted(custodians)), approved.required(custodians))
                await self._record("approved", approved, custodian=custodian,
                                   identity=caller.identity, revision=written)
                return ApprovalResult(self._stored(approved, written, custodians), False)
            try:
                return await self._execute(caller, approved, revision=revision,
                                           custodians=custodians,
                                           custodians_revision=custodians_revision, now=now)
            except Conflict:
                continue  # the proposal or the key changed: re-read; maybe it ran already
        raise Conflict(f"proposal {proposal_id[:16]} and the records it changes kept changing "
                       "while this approval ran; nothing of it was written — retry")

    async def _execute(self, caller: Caller, proposal: Proposal, *, revision: int,
                       custodians: CustodianSet, custodians_revision: int, now: float
                       ) -> ApprovalResult:
        path = self._layout.proposal(proposal.id)
        custodian = proposal.approvals[-1].custodian
        try:
            effect = await self._effect(proposal, custodians, now)
        except _TERMINAL as error:
            failed = proposal.failed(now, error.diagnostics())
            written = await self._records.write_records(
                {path: canonical_json(failed.to_dict())},
                expect={path: revision, self._layout.custodians: custodians_revision})
            await self._record("approved", failed, custodian=custodian,
                               identity=caller.identity, revision=written)
            await self._record("failed", failed, error=error.diagnostics(), revision=written)
            raise FailedPrecondition(
                f"proposal {proposal.id[:16]} reached its threshold but cannot run: "
                f"{error.diagnostics()}; it is closed as failed") from None
        closed = proposal.executed(now, effect.outcome)
        puts = {**effect.puts, path: canonical_json(closed.to_dict())}
        expect = {**effect.expect, path: revision, self._layout.custodians: custodians_revision}
        try:
            committed = await self._records.write_records(puts, expect=expect)
        except KmsError:
            if effect.discard is not None:
                await self._discard(effect.discard)
            raise
        log.warning("proposal %s executed at revision %d: %s (approved by %s)",
                    proposal.id[:16], committed, proposal.body.describe(), closed.closed_by)
        await self._record("approved", closed, custodian=custodian, identity=caller.identity,
                           revision=committed)
        await self._record("executed", closed, approved_by=closed.closed_by,
                           revision=committed, **effect.outcome)
        stored = self._stored(closed, committed, custodians)
        if effect.key is None:
            return ApprovalResult(stored, True)
        try:
            await self._view.wait_for_revision(committed, timeout=2.0)
        except Unavailable:
            log.warning("proposal %s: this signer has not seen revision %d yet",
                        proposal.id[:16], committed)
        versioned = VersionedKey(effect.key, committed)
        if proposal.action is not Action.REVOKE:
            return ApprovalResult(stored, True, versioned)
        # I2 holds for ceremonies too: the approving RPC returns only once fenced.
        if self._fence is None:
            raise Unavailable("this signer has no fence configured; cannot confirm revocation")
        report = await self._fence.wait(committed)
        return ApprovalResult(stored, True, versioned, report)

    async def _discard(self, hsm_id: bytes) -> None:
        try:
            await self._hsm.destroy_key_pair(hsm_id)
        except KmsError:
            log.exception("could not remove an unused HSM key pair made for a ceremony")

    async def _effect(self, proposal: Proposal, custodians: CustodianSet, now: float
                      ) -> _Effect:
        """What executing ``proposal`` writes, computed from the records as they are now."""
        params = proposal.body.parameters
        action = proposal.action
        if action.touches_key:
            return await self._key_effect(action, params, now)
        if action is Action.POLICY:
            path = self._layout.policy
            read = await self._records.read_records([path])
            current = read.records.get(path, (b"", 0))[1]
            return _Effect({path: canonical_json(params["policy"])}, {path: current},
                           {"bindings": len(params["policy"]["bindings"])})
        if action is Action.CUSTODIANS:
            new_set = CustodianSet.from_dict(params["custodian_set"])
            # The custodian record is compared by the caller already.
            return _Effect({self._layout.custodians: canonical_json(new_set.to_dict())}, {},
                           {"custodians": [c.name for c in new_set.custodians],
                            "threshold": new_set.threshold})
        if action is Action.ONBOARD_REGION:
            path = self._layout.region(params["region"])
            read = await self._records.read_records([path])
            if path in read.records:
                raise AlreadyExists(f"region {params['region']!r} is onboarded already")
            record = {"region": params["region"], "transport_key_pem": params["transport_key_pem"],
                      "onboarded_at": now, "proposal": proposal.id}
            return _Effect({path: canonical_json(record)}, {path: 0}, {"region": params["region"]})
        return await self._root_effect(proposal, custodians)

    async def _key_effect(self, action: Action, params: Mapping[str, Any], now: float
                          ) -> _Effect:
        name = params["name"]
        path = self._layout.key(name)
        read = await self._records.read_records([path])
        if action is Action.CREATE_KEY:
            if path in read.records:
                raise AlreadyExists(f"a key named {name!r} exists already")
            algorithm = Algorithm(params["algorithm"])
            replication = Replication(params["replication"])
            pair = await self._admin.generate(name, algorithm, replication, 1)
            try:
                key = Key.new(name=name, algorithm=algorithm, replication=replication,
                              public_key_der=pair.public_key_der, hsm_id=pair.hsm_id, now=now,
                              rotation_period_seconds=params.get("rotation_period_seconds"))
            except KmsError:
                await self._discard(pair.hsm_id)
                raise
            return _Effect({path: canonical_json(key.to_dict())}, {path: 0},
                           {"key": name, "version": 1}, key=key, discard=pair.hsm_id)
        if path not in read.records:
            raise NotFound(f"no key named {name!r}")
        value, revision = read.records[path]
        current = Key.from_dict(_decode(path, value))
        discard = None
        if action is Action.ROTATE:
            number = len(current.versions) + 1
            pair = await self._admin.generate(name, current.algorithm, current.replication,
                                              number)
            try:
                changed = current.rotate(now=now, public_key_der=pair.public_key_der,
                                         hsm_id=pair.hsm_id,
                                         retire_grace_seconds=params["retire_grace_seconds"])
            except KmsError:
                await self._discard(pair.hsm_id)
                raise
            discard = pair.hsm_id
            outcome: dict[str, Any] = {"key": name, "version": number}
        else:
            version = int(params["version"])
            outcome = {"key": name, "version": version}
            changed = self._version_transition(action, params, current, version, now)
        return _Effect({path: canonical_json(changed.to_dict())}, {path: revision}, outcome,
                       key=changed, discard=discard)

    def _version_transition(self, action: Action, params: Mapping[str, Any], key: Key,
                            version: int, now: float) -> Key:
        """The pure lifecycle move of ``action`` (kms.domain.keys); raises what it raises."""
        if action is Action.SCHEDULE_DESTROY:
            wait = self._settings.destroy_wait(params.get("waiting_seconds"))
            return key.schedule_destroy(version, now=now, waiting_seconds=wait)
        moves: dict[Action, Callable[[], Key]] = {
            Action.REVOKE: lambda: key.revoke(version, now=now),
            Action.DISABLE: lambda: key.disable(version, now=now),
            Action.ENABLE: lambda: key.enable(version, now=now),
            Action.CANCEL_DESTROY: lambda: key.cancel_destroy(version, now=now),
            Action.SET_MIN_VERSION: lambda: key.set_min_sign_version(version),
        }
        return moves[action]()

    async def _root_effect(self, proposal: Proposal, custodians: CustodianSet) -> _Effect:
        version = int(proposal.body.parameters["version"])
        new_path, old_path = self._layout.tuf_root(version), self._layout.tuf_root(version - 1)
        read = await self._records.read_records([old_path, new_path])
        if new_path in read.records:
            raise FailedPrecondition(f"root version {version} is stored already")
        if old_path not in read.records:
            raise FailedPrecondition(f"root version {version - 1} is not stored")
        old_bytes, old_revision = read.records[old_path]
        current = Metadata[Root].from_bytes(old_bytes)
        signed = copy.deepcopy(dict(proposal.body.parameters["root"]))
        signatures = [{"keyid": a.key_id, "sig": a.root_signature}
                      for a in proposal.counted(custodians) if a.root_signature]
        signed_by = sorted(s["keyid"][:16] for s in signatures)
        # from_dict consumes the dicts it is given.
        new = Metadata[Root].from_dict({"signed": signed, "signatures": signatures})
        for name, delegator in (("the current root's", current), ("the new root's", new)):
            try:
                delegator.verify_delegate(Root.type, new)
            except UnsignedMetadataError as error:
                raise FailedPrecondition(
                    f"root version {version} does not meet {name} threshold with these "
                    f"approvals ({error}); the approving custodians must hold keys of both "
                    "roots") from None
        return _Effect({new_path: new.to_bytes()}, {new_path: 0, old_path: old_revision},
                       {"root_version": version,
                        "signed_by": signed_by})


def _pem_der(pem: str) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_public_key(pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_root_signature(proposal: Proposal, custodians: CustodianSet) -> None:
    """The newest approval's TUF signature over the proposed root must verify with that
    custodian's key; raises ``InvalidArgument`` otherwise (so a bad one is refused at once,
    not when the threshold is reached)."""
    approval = proposal.approvals[-1]
    custodian = custodians.by_key_id(approval.key_id)
    if custodian is None or approval.root_signature is None:
        raise InvalidArgument("a rotate-root approval needs the custodian's root signature")
    key = tuf_key(_pem_der(custodian.public_key_pem))
    try:
        key.verify_signature(Signature(key.keyid, approval.root_signature),
                             root_signed_bytes(proposal.body.parameters["root"]))
    except UnverifiedSignatureError:
        raise InvalidArgument(f"custodian {custodian.name}'s signature over the proposed root "
                              "does not verify; sign the root exactly as 'ceremony show' "
                              "prints it") from None


async def store_initial_custodians(records: RecordStore, layout: StateLayout,
                                   custodians: CustodianSet) -> bool:
    """Bootstrap: store the first custodian set only if none exists (later changes are
    ceremonies). True when it was stored now, False when one existed already."""
    try:
        await records.write_records({layout.custodians: canonical_json(custodians.to_dict())},
                                    expect={layout.custodians: 0})
    except Conflict:
        return False
    return True
