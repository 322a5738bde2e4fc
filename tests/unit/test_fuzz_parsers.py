"""Property-based fuzzing of every parser at a trust boundary (issue 10, docs/adr/0012): on any
input, each one returns or raises its module's documented error type — never anything else.

Inputs are arbitrary JSON values, arbitrary bytes, and valid documents with one field
replaced by an arbitrary value (which reaches much deeper than random JSON does)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms.domain.ceremony import ApprovalStatement, CustodianSet, Proposal, ProposalBody
from kms.domain.policy import AccessPolicy
from kms.domain.provenance import StatementPolicy, VerificationPolicy
from kms.errors import KmsError
from kms.tuf.freshness import FreshnessStatement
from signer.admission import AdmissionController
from signer.cluster import ClusterFile, ClusterFileError
from signer.config import ServerConfig
from signer.payloads.dsse import Envelope
from signer.payloads.intoto import Statement
from signer.payloads.simplesigning import ImageReference, SimpleSigningPayload
from signer.trust import TrustClient, TrustError, TrustResponse, _parse_bundle
from tests.unit.tuf_simulator import RepositorySimulator, SimulatorTransport

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(
    max_size=40)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=6),
    max_leaves=25,
)


def mutations(valid: dict[str, Any]) -> st.SearchStrategy[Any]:
    """``valid`` with one (possibly nested) field replaced by an arbitrary value, or removed."""

    def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        found = [prefix] if prefix else []
        if isinstance(node, dict):
            for key, value in node.items():
                found += paths(value, (*prefix, key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                found += paths(value, (*prefix, index))
        return found

    def apply(path: tuple[Any, ...], value: Any, remove: bool) -> Any:
        document = json.loads(json.dumps(valid))
        node = document
        for step in path[:-1]:
            node = node[step]
        if remove and isinstance(node, dict):
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return document

    return st.builds(apply, st.sampled_from(paths(valid)), json_values, st.booleans())


def documents(valid: dict[str, Any]) -> st.SearchStrategy[Any]:
    return json_values | mutations(valid)


def raw(valid: dict[str, Any]) -> st.SearchStrategy[bytes]:
    return (st.binary(max_size=200)
            | documents(valid).map(lambda d: json.dumps(d).encode())
            | st.binary(max_size=20).map(lambda b: json.dumps(valid).encode()[:-1] + b))


def only(errors: tuple[type[BaseException], ...], fn: Any, *args: Any, **kwargs: Any) -> None:
    with contextlib.suppress(*errors):
        fn(*args, **kwargs)


STATEMENT = {
    "_type": "https://in-toto.io/Statement/v1",
    "subject": [{"name": "registry.example.com/app", "digest": {"sha256": "ab" * 32}}],
    "predicateType": "https://slsa.dev/provenance/v1",
    "predicate": {"buildDefinition": {"buildType": "x", "externalParameters": {},
                                      "resolvedDependencies": [{"uri": "git+https://x/y"}]},
                  "runDetails": {"builder": {"id": "https://builder"},
                                 "metadata": {"finishedOn": "2026-01-01T00:00:00Z"}}},
}
ENVELOPE = {"payload": "e30=", "payloadType": "application/vnd.in-toto+json",
            "signatures": [{"keyid": "k", "sig": "c2ln"}]}
POLICY = {"version": 1, "rules": [{"identities": ["spiffe://x/pipeline"], "keys": ["release-*"],
                                   "actions": ["sign"]}]}
STATEMENT_POLICY = {"predicate_types": ["https://slsa.dev/provenance/v1"],
                    "builders": ["https://builder"], "source_repositories": ["https://x/*"],
                    "max_age_seconds": 3600}
VERIFICATION_POLICY = {"version": 1, "trusted_keys": ["release"],
                       "builder_ids": ["https://ci.example.com/*"],
                       "source_repositories": ["https://git.example.com/*"],
                       "max_age_seconds": 86400}
FRESHNESS = {"format": "signet-freshness/v1", "nonce": "AAAA", "region": "eu", "key_id": "k",
             "timestamp_version": 1, "bundle_sha256": "00", "etcd_revision": 1,
             "time": "2026-01-01T00:00:00.000000Z"}
REVIEW = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
          "request": {"uid": "u-1", "operation": "CREATE",
                      "kind": {"group": "", "version": "v1", "kind": "Pod"},
                      "object": {"spec": {"containers": [
                          {"name": "c", "image": "r.example/app@sha256:" + "ab" * 32}]}}}}
PROPOSAL_BODY = {"format": "signet-proposal/v1", "action": "rotate", "params": {"name": "k"},
                 "created_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-02T00:00:00Z",
                 "nonce": "n", "proposer": "spiffe://x/admin", "base_revision": 3}
CUSTODIANS = {"threshold": 2, "custodians": [{"name": "a", "public_key": "x"}]}
CLUSTER = {"home_region": "local", "regions": {"local": {"endpoints": ["127.0.0.1:1"]}},
           "etcd_endpoints": ["127.0.0.1:2"], "ca": "ca.pem",
           "identities": {"pipeline": {"uri": "spiffe://x/p", "cert": "p.pem", "key": "k.pem"}}}
CONFIG = {"region": "eu", "listen": "127.0.0.1:0", "insecure": True,
          "etcd": {"endpoints": ["127.0.0.1:2379"]},
          "hsm": {"token_label": "t", "pin_env": "PIN"},
          "limits": {"per_identity_rps": 10, "per_identity_burst": 5,
                     "per_identity_concurrency": 2},
          "multi_region": {"request_window_seconds": 5, "request_group_linger_ms": 2},
          "lifecycle": {}, "audit": {},
          "trust": {}, "telemetry": {}}


@FUZZ
@given(raw(STATEMENT))
def test_in_toto_statements(data: bytes) -> None:
    only((KmsError,), Statement.from_json, data)


@FUZZ
@given(raw(ENVELOPE))
def test_dsse_envelopes(data: bytes) -> None:
    only((KmsError,), Envelope.from_json, data)


@FUZZ
@given(st.text(max_size=120) | st.sampled_from(["r.example/a@sha256:" + "0" * 64,
                                                 "r.example:5000/a/b:tag"]))
def test_image_references_and_simple_signing(text: str) -> None:
    only((KmsError,), ImageReference.parse, text)
    only((KmsError,), SimpleSigningPayload.from_json, text.encode())


@FUZZ
@given(documents(POLICY))
def test_access_policies(document: Any) -> None:
    only((KmsError,), AccessPolicy.from_dict, document)


@FUZZ
@given(documents(STATEMENT_POLICY), documents(VERIFICATION_POLICY))
def test_statement_and_verification_policies(statement: Any, verification: Any) -> None:
    only((KmsError,), StatementPolicy.from_dict, statement)
    only((KmsError,), VerificationPolicy.from_dict, verification)


@FUZZ
@given(raw(FRESHNESS))
def test_freshness_statements(data: bytes) -> None:
    only((ValueError,), FreshnessStatement.from_bytes, data)  # documented: ValueError


@FUZZ
@given(raw({"format": "signet-trust-bundle/v1", "keys": []}))
def test_trust_bundle_json(data: bytes) -> None:
    only((TrustError,), _parse_bundle, data)


@pytest.fixture(scope="module")
def trust_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[RepositorySimulator, Path]:
    sim = RepositorySimulator(now=1_800_000_000.0)
    sim.publish()
    root = tmp_path_factory.mktemp("trust") / "1.root.json"
    root.write_bytes(sim.root_bytes)
    return sim, root


@FUZZ
@given(field=st.sampled_from(["timestamp", "snapshot", "targets", "bundle", "statement",
                              "signature"]),
       value=st.binary(max_size=300) | json_values.map(lambda d: json.dumps(d).encode()))
def test_trust_responses(trust_setup: tuple[RepositorySimulator, Path], tmp_path: Path,
                         field: str, value: bytes) -> None:
    """A whole GetTrustBundle answer with one part replaced: TrustError, state unchanged."""
    sim, root = trust_setup
    client = TrustClient(root, tmp_path / "state", "local", SimulatorTransport(sim),
                         clock=lambda: sim.now, nonce_source=lambda _: b"\x01" * 32)
    honest = sim.respond(b"\x01" * 32)
    tampered = TrustResponse(**{**honest.__dict__, field: value})
    only((TrustError,), client.accept, tampered, b"\x01" * 32)


@FUZZ
@given(raw(REVIEW))
def test_admission_reviews(data: bytes) -> None:
    class Nothing:
        def signatures(self, *_: Any) -> list[Any]:
            return []

        def attestations(self, *_: Any) -> list[Any]:
            return []

        def __getattr__(self, name: str) -> Any:
            return lambda *_a, **_k: []

    from signer.verification import StaticKeyResolver

    controller = AdmissionController(
        Nothing(), StaticKeyResolver([]),
        VerificationPolicy.from_dict(VERIFICATION_POLICY), clock=lambda: 0.0)
    only((KmsError,), controller.review, data)


@FUZZ
@given(documents(PROPOSAL_BODY), documents(CUSTODIANS), st.binary(max_size=200),
       documents({"proposal": PROPOSAL_BODY, "approvals": [], "status": "PENDING"}))
def test_ceremony_proposals_and_approvals(body: Any, custodians: Any, approval: bytes,
                                          proposal: Any) -> None:
    only((KmsError,), ProposalBody.from_dict, body)
    only((KmsError,), CustodianSet.from_dict, custodians)
    only((KmsError,), ApprovalStatement.from_payload, approval)
    if isinstance(proposal, dict):
        only((KmsError,), Proposal.from_dict, proposal)


@FUZZ
@given(documents(CLUSTER))
def test_cluster_files(document: Any) -> None:
    only((ClusterFileError,), ClusterFile.from_dict, document, path=Path("cluster.json").absolute())


@FUZZ
@given(documents(CONFIG))
def test_signer_configs(document: Any) -> None:
    only((KmsError,), ServerConfig.from_dict, document, base=Path.cwd())
