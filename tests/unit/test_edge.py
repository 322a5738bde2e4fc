"""The service edge's pure parts: status table, identities, config and cluster files."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from kms import errors
from signer.cli.main import cli
from signer.cluster import ClusterFile, ClusterFileError
from signer.config import ServerConfig
from signer.dev.ca import DevCa
from signer.errors import status_for
from signer.identity import identity_from_pem


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.Conflict("x"), grpc.StatusCode.ABORTED),
        (errors.PermissionDenied("x"), grpc.StatusCode.PERMISSION_DENIED),
        (errors.Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.HsmError("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.StateStoreError("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.WatchCompacted("x", 3), grpc.StatusCode.UNAVAILABLE),
        (errors.KmsError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_every_error_kind_has_its_status(error: errors.KmsError, code: grpc.StatusCode) -> None:
    assert status_for(error) is code


def test_identity_is_the_single_uri_san(tmp_path: Path) -> None:
    ca = DevCa.load_or_create(tmp_path)
    good = ca.issue("good", uri="spiffe://ci/pipeline", client=True)
    assert identity_from_pem(good.cert_path.read_bytes()) == "spiffe://ci/pipeline"
    bare = ca.issue("bare", server_names=("example.org",), client=True)
    with pytest.raises(errors.Unauthenticated, match="exactly one URI SAN, it has 0"):
        identity_from_pem(bare.cert_path.read_bytes())


def config(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "region": "r1", "listen": "127.0.0.1:7443",
        "tls": {"cert": "s.pem", "key": "s-key.pem", "client_ca": "ca.pem"},
        "etcd": {"endpoints": ["127.0.0.1:2379"]},
        "hsm": {"token_label": "t", "pin_file": "pin"},
    }
    return base | overrides


def test_config_resolves_relative_paths(tmp_path: Path) -> None:
    loaded = ServerConfig.from_dict(config(), base=tmp_path)
    assert loaded.tls is not None
    assert loaded.tls.cert == tmp_path / "s.pem"
    assert loaded.hsm.pin_file == tmp_path / "pin"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"listen": "7443"}, "host:port"),
        ({"tls": None}, "tls must be a mapping"),
        ({"etcd": {"endpoints": []}}, "etcd.endpoints"),
        ({"etcd": {"endpoints": ["etcd-0:2379", "etcd-1:2379"]}}, "must be IPv4 addresses"),
        ({"hsm": {"token_label": "t"}}, "pin_file or pin_env"),
        ({"hsm": {"token_label": "t", "pin": "1234", "pin_env": "X"}}, "keep the PIN out"),
        ({"lease_ttl_seconds": 0}, "lease_ttl_seconds"),
        ({"attestation": {"baseline": "b.yaml"}}, "attestation.policy must be a file path"),
        ({"attestation": {"baseline": "b", "policy": "p", "x": 1}}, "attestation has unknown"),
    ],
)
def test_bad_config_names_the_problem(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        ServerConfig.from_dict(config(**overrides), base=Path("/"))


def test_attestation_files_resolve_relative_to_the_config(tmp_path: Path) -> None:
    assert ServerConfig.from_dict(config(), base=tmp_path).attestation is None
    loaded = ServerConfig.from_dict(
        config(attestation={"baseline": "baseline.yaml", "policy": "/etc/policy.yaml"}),
        base=tmp_path)
    assert loaded.attestation is not None
    assert loaded.attestation.baseline == tmp_path / "baseline.yaml"
    assert loaded.attestation.policy == Path("/etc/policy.yaml")


def test_insecure_config_needs_no_tls() -> None:
    loaded = ServerConfig.from_dict(config(tls=None, insecure=True), base=Path("/"))
    assert loaded.insecure
    assert loaded.tls is None


def test_cluster_file_round_trips_and_orders_the_home_region_first(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({
        "version": 1, "home_region": "b",
        "regions": {"a": {"grpc_endpoints": ["a:1"]}, "b": {"grpc_endpoints": ["b:1"]}},
        "ca": "ca.pem",
        "identities": {"admin": {"uri": "spiffe://x/admin", "cert": "a.pem", "key": "k.pem"}},
    }))
    cluster = ClusterFile.load(path)
    assert cluster.endpoints() == ["b:1", "a:1"]
    assert cluster.identity("admin").cert == tmp_path / "a.pem"
    cluster.write()
    assert ClusterFile.load(path).to_dict() == cluster.to_dict()
    with pytest.raises(ClusterFileError, match="identity 'nobody'"):
        cluster.identity("nobody")


def test_cli_reports_a_missing_cluster_file_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["key", "list", "--cluster", str(tmp_path / "none.json")]
    )
    assert result.exit_code == 2
    assert result.output.startswith("signet: error: cluster file")
    assert "Traceback" not in result.output


def test_cli_rejects_a_malformed_digest_before_calling_anyone(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"version": 1, "regions": {"r": {"grpc_endpoints": ["x:1"]}},
                                "insecure": True}))
    result = CliRunner().invoke(
        cli, ["sign", "--key", "k", "--digest", "sha256:1234", "--cluster", str(path)]
    )
    assert result.exit_code == 3
    assert "32 bytes, got 2" in result.output
