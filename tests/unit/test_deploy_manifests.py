"""The deployment files in deploy/ validate against their schemas, offline.

- Kubernetes objects: the JSON schemas bundled in ``kubernetes-validate`` (generated from the
  Kubernetes OpenAPI spec), in strict mode, so an unknown or misspelled field fails.
- ServiceMonitor (a Prometheus operator CRD, not bundled): ``SERVICE_MONITOR_SCHEMA`` below,
  written from the fields of the CRD ``servicemonitors.monitoring.coreos.com`` (v1) that these
  manifests use, with ``additionalProperties: false`` so nothing unchecked slips in.
- compose.yaml: the compose-spec JSON schema that ``check-jsonschema`` vendors
  (``check_jsonschema/builtin_schemas/vendor/compose-spec.json``).
- CI examples in deploy/ci: the GitHub workflow and GitLab CI schemas ``check-jsonschema``
  vendors.
- Every signer config parses with ``signer.config.ServerConfig.from_dict`` and its etcd
  endpoints form a gRPC target the state store accepts.
- The Dockerfile is checked statically (no Docker daemon here): base image, non-root user,
  entrypoint equal to the real ``signet serve --config`` CLI, health check, no secrets.
- No file holds a literal PIN or private key; every image is pinned by a tag other than latest.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kms.errors import InvalidArgument
from kms.state.etcd import EtcdConfig
from signer.cli.main import cli
from signer.config import ServerConfig
from signer.dev.softhsm import CONF_TEMPLATE

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
REGIONS = ("eu-west", "us-east", "ap-south")
K8S_VERSION = "1.30"  # oldest Kubernetes minor these manifests promise to work on
ENTRYPOINT = ["signet", "serve", "--config", "/etc/signet/signer.yaml"]

SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                           "labels": {"type": "object",
                                      "additionalProperties": {"type": "string"}}},
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object",
                                                   "additionalProperties": {"type": "string"}}},
                },
                "namespaceSelector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}},
                                   "any": {"type": "boolean"}},
                },
                "endpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string",
                                              "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}

# Keys whose values would be secrets if they appeared literally in a manifest.
SECRET_KEYS = re.compile(r"^(pin|so_pin|user_pin|password|passwd|private_key|token)$", re.I)
PRIVATE_KEY_PEM = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
LITERAL_PIN = re.compile(r"--(so-)?pin[ =]+[\"']?[0-9A-Za-z]{4,}")


def vendored_schema(name: str) -> dict[str, Any]:
    base = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads((base / name).read_text(encoding="utf-8"))
    return schema


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p.name}:{d.get('kind')}/{d.get('metadata', {}).get('name')}", d)
            for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"
            for d in yaml_documents(p)]


def deploy_files() -> list[Path]:
    return [p for p in sorted(DEPLOY.rglob("*"))
            if p.is_file() and "secrets" not in p.parts and "local" not in p.relative_to(
                DEPLOY).parts[:1]]


def validate_k8s(obj: dict[str, Any]) -> None:
    if obj["kind"] == "ServiceMonitor":
        jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def walk(value: Any, where: str = "") -> Iterator[tuple[str, Any, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield f"{where}.{key}", key, item
            yield from walk(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from walk(item, f"{where}[{index}]")


def check_signer_config(data: Any, where: str) -> ServerConfig:
    config = ServerConfig.from_dict(data, base=Path("/etc/signet"))
    # ServerConfig accepts any host:port list, but the store refuses several host names.
    EtcdConfig(endpoints=config.etcd.endpoints).grpc_target()
    assert config.hsm.pin_file is not None, f"{where}: the PIN must come from a file"
    assert not config.insecure, f"{where}: deployment configs must use mTLS"
    return config


def image_refs() -> list[tuple[str, str]]:
    refs = [(f"k8s {name}", str(v)) for name, obj in k8s_objects()
            for _, key, v in walk(obj) if key == "image"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    refs += [(f"compose {name}", s["image"]) for name, s in compose["services"].items()]
    refs += [("Dockerfile", line.split("=", 1)[1]) for line in dockerfile_lines()
             if line.startswith("ARG PYTHON_IMAGE=")]
    return refs


def dockerfile_lines() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


# -- Kubernetes --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "obj"), k8s_objects(), ids=[n for n, _ in k8s_objects()])
def test_kubernetes_object_matches_its_schema(name: str, obj: dict[str, Any]) -> None:
    validate_k8s(obj)


def test_the_validators_reject_a_misspelled_field() -> None:
    objects = dict(k8s_objects())
    deployment = objects["signer-eu-west.yaml:Deployment/signer-eu-west"]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(broken)
    monitor = json.loads(json.dumps(objects["signer-eu-west.yaml:ServiceMonitor/signer-eu-west"]))
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(monitor)


def test_each_region_has_the_full_set_of_signer_objects() -> None:
    kinds = {(obj["kind"], obj["metadata"]["name"]) for _, obj in k8s_objects()}
    for region in REGIONS:
        for kind in ("ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
                     "NetworkPolicy", "ServiceMonitor"):
            assert (kind, f"signer-{region}") in kinds, f"{kind} signer-{region} is missing"
        assert ("PersistentVolumeClaim", f"signer-{region}-tokens") in kinds
        assert ("PersistentVolumeClaim", f"signer-{region}-audit") in kinds


def test_etcd_is_a_three_member_statefulset_behind_a_headless_service() -> None:
    objects = {(o["kind"], o["metadata"]["name"]): o for _, o in k8s_objects()}
    statefulset = objects[("StatefulSet", "etcd")]
    assert statefulset["spec"]["replicas"] == 3
    assert statefulset["spec"]["serviceName"] == "etcd"
    assert objects[("Service", "etcd")]["spec"]["clusterIP"] == "None"
    image = statefulset["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.startswith("quay.io/coreos/etcd:")
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    cluster = next(a for a in args if a.startswith("--initial-cluster="))
    assert cluster.count("=http") == 3


@pytest.mark.parametrize("region", REGIONS)
def test_k8s_signer_config_and_pin_come_from_mounted_files(region: str) -> None:
    objects = {(o["kind"], o["metadata"]["name"]): o for _, o in k8s_objects()}
    config_map = objects[("ConfigMap", f"signer-{region}")]
    config = check_signer_config(yaml.safe_load(config_map["data"]["signer.yaml"]), region)
    assert config.region == region
    pod = objects[("Deployment", f"signer-{region}")]["spec"]["template"]["spec"]
    signer = next(c for c in pod["containers"] if c["name"] == "signer")
    mounts = {m["mountPath"]: m["name"] for m in signer["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    pin_dir = str(config.hsm.pin_file.parent) if config.hsm.pin_file else ""
    assert "secret" in volumes[mounts[pin_dir]], "the PIN must be mounted from a Secret"
    audit_dir = getattr(getattr(config, "audit", None), "directory", None)
    if audit_dir is not None:  # the audit log must survive a pod restart
        assert "persistentVolumeClaim" in volumes[mounts[str(audit_dir)]]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert not signer.get("env"), "no environment variables: secrets come as files"


# -- compose -----------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    jsonschema.validate(compose, vendored_schema("compose-spec.json"))


def test_compose_schema_rejects_an_unknown_service_field() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    compose["services"]["signer-eu-west"]["imagee"] = "x:1"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(compose, vendored_schema("compose-spec.json"))


def test_compose_runs_three_etcd_members_three_signers_and_a_collector() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    etcd = [s for s in services.values() if s["image"].startswith("quay.io/coreos/etcd:")]
    assert len(etcd) == 3
    assert services["otel-collector"]["image"].startswith("otel/opentelemetry-collector:")
    volumes, pins = set(), set()
    for region in REGIONS:
        signer = services[f"signer-{region}"]
        config_source = next(c["source"] for c in signer["configs"]
                             if c["target"] == ENTRYPOINT[-1])
        config_file = DEPLOY / compose["configs"][config_source]["file"]
        config = check_signer_config(yaml.safe_load(config_file.read_text()), region)
        assert config.region == region
        volumes.add(signer["volumes"][0].split(":")[0])
        pins.add(next(s["source"] for s in signer["secrets"] if s["target"] == "hsm-pin"))
        assert str(config.hsm.pin_file) == "/run/secrets/hsm-pin"
    assert len(volumes) == 3, "each region needs its own token volume"
    assert len(pins) == 3, "each region needs its own PIN secret"
    for entry in compose["configs"].values():
        assert (DEPLOY / entry["file"]).is_file(), entry["file"]


@pytest.mark.parametrize("path", sorted((DEPLOY / "config").glob("signer-*.yaml")),
                         ids=lambda p: p.name)
def test_signer_config_parses(path: Path) -> None:
    config = check_signer_config(yaml.safe_load(path.read_text()), path.name)
    assert path.name == f"signer-{config.region}.yaml"


def test_a_config_with_several_host_names_is_caught() -> None:
    data = yaml.safe_load((DEPLOY / "config" / "signer-eu-west.yaml").read_text())
    data["etcd"]["endpoints"] = ["etcd-1:2379", "etcd-2:2379"]
    with pytest.raises(InvalidArgument, match="IPv4"):
        check_signer_config(data, "mutated")


def test_otel_collector_pipelines_use_declared_components() -> None:
    config = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    for name, pipeline in config["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"{name} uses undeclared {component}"


# -- Dockerfile and image ----------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_signer_image_with_the_real_entrypoint() -> None:
    lines = dockerfile_lines()
    base = next(line.split("=", 1)[1] for line in lines if line.startswith("ARG PYTHON_IMAGE="))
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-bookworm", base)
    assert sum(line.startswith("FROM ") for line in lines) >= 1
    install = next(line for line in lines if "apt-get install" in line)
    assert "softhsm2" in install
    assert "p11-kit-modules" in install
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "the image must switch to a non-root USER"
    assert users[-1].split(":")[0] not in {"0", "root"}
    entrypoint = json.loads(next(line for line in lines if line.startswith("ENTRYPOINT "))[11:])
    assert entrypoint == ENTRYPOINT
    serve = cli.commands["serve"]
    assert "--config" in [opt for p in serve.params for opt in getattr(p, "opts", [])]
    health = next(line for line in lines if line.startswith("HEALTHCHECK "))
    assert "healthcheck.py" in health
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                if not source.startswith("--"):
                    assert (ROOT / source).exists(), f"COPY source {source} is missing"
    for line in lines:
        if line.startswith(("ENV ", "ARG ")):
            assert not re.search(r"PIN|PASSWORD|SECRET|TOKEN=", line, re.I), line


def test_image_softhsm_config_matches_the_template() -> None:
    expected = CONF_TEMPLATE.format(tokendir="/var/lib/signet/tokens")
    assert (DEPLOY / "softhsm2.conf").read_text() == expected
    volumes = [line for line in dockerfile_lines() if line.startswith("VOLUME ")]
    assert "/var/lib/signet/tokens" in volumes[0]


def test_dockerignore_keeps_secrets_out_of_the_build_context() -> None:
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for pattern in ("deploy/secrets", "**/*.pin", "**/*-key.pem", ".git", ".venv"):
        assert pattern in ignored


# -- everything --------------------------------------------------------------------------------


def test_every_image_is_pinned_by_a_tag_other_than_latest() -> None:
    refs = image_refs()
    assert len(refs) >= 8
    for where, ref in refs:
        _, sep, tag = ref.rpartition(":")
        assert sep, f"{where}: {ref} has no tag"
        assert "/" not in tag, f"{where}: {ref} has no tag"
        assert tag not in {"", "latest"}, f"{where}: {ref} is not pinned"


def test_no_file_in_deploy_holds_a_pin_or_private_key() -> None:
    files = deploy_files()
    assert len(files) >= 10
    for path in files:
        text = path.read_text()
        assert not PRIVATE_KEY_PEM.search(text), f"{path} holds a private key"
        assert not LITERAL_PIN.search(text), f"{path} passes a literal PIN"
        if path.suffix in {".yaml", ".yml"}:
            for document in yaml.safe_load_all(text):
                for where, key, value in walk(document):
                    if SECRET_KEYS.match(str(key)):
                        assert not isinstance(value, str | int), f"{path}{where} is a secret"


def test_the_secret_scan_would_catch_a_pin() -> None:
    assert LITERAL_PIN.search('softhsm2-util --pin 1234abcd --so-pin "$(cat f)"')
    assert not LITERAL_PIN.search('--pin "$(cat "${SIGNET_PIN_FILE}")"')
    with pytest.raises(Exception, match="pin is not accepted"):
        ServerConfig.from_dict({"listen": "0.0.0.0:1", "insecure": True,
                                "etcd": {"endpoints": ["127.0.0.1:2379"]},
                                "hsm": {"token_label": "t", "pin_file": "p", "pin": "1234"}},
                               base=Path("/"))


# -- CI examples -------------------------------------------------------------------------------


@pytest.mark.parametrize(("file", "schema"), [("github-actions.yml", "github-workflows.json"),
                                              ("gitlab-ci.yml", "gitlab-ci.json")])
def test_ci_example_matches_its_schema(file: str, schema: str) -> None:
    document = yaml.safe_load((DEPLOY / "ci" / file).read_text())
    if True in document:  # PyYAML reads the workflow key `on:` as YAML 1.1 boolean true
        document["on"] = document.pop(True)
    jsonschema.validate(document, vendored_schema(schema))
    text = (DEPLOY / "ci" / file).read_text()
    assert "signet sign --cluster" in text
