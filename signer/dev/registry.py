"""A throwaway OCI registry on loopback for demos and tests: Debian's ``docker-registry``
(distribution) started with its own config, storage folder and free port — never the system
service the package may install — plus a minimal image to push into it."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from signer.dev.etcd import free_port
from signer.registry import OCI_CONFIG, OCI_MANIFEST, RegistryClient

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


class RegistryLaunchError(RuntimeError):
    """The registry binary is missing or did not answer on its port."""


@dataclass
class LocalRegistry:
    """A running ``docker-registry serve``; ``address`` is ``127.0.0.1:PORT``."""

    address: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, directory: Path, *, timeout: float = 15.0) -> LocalRegistry:
        """Start a registry storing into ``directory``. Raises ``RegistryLaunchError`` with
        the registry's log when it does not come up."""
        binary = shutil.which("docker-registry")
        if binary is None:
            raise RegistryLaunchError(
                "docker-registry is not installed; run 'make setup' (Debian package "
                "docker-registry)")
        directory.mkdir(parents=True, exist_ok=True)
        address = f"127.0.0.1:{free_port()}"
        config = directory / "config.yml"
        config.write_text(yaml.safe_dump({
            "version": 0.1,
            "log": {"level": "warn"},
            "storage": {"filesystem": {"rootdirectory": str(directory / "data")},
                        "delete": {"enabled": True}},
            "http": {"addr": address},
        }))
        log_path = directory / "registry.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen([binary, "serve", str(config)], stdout=log,
                                       stderr=subprocess.STDOUT)
        registry = cls(address, process, log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://{address}/v2/", timeout=1):
                    return registry
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        registry.stop()
        raise RegistryLaunchError(
            f"docker-registry did not answer on {address}:\n{log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass(frozen=True)
class ImageBlobs:
    """A one-layer OCI image: manifest, config and layer bytes."""

    manifest: bytes
    config: bytes
    layer: bytes


def minimal_image(files: dict[str, bytes]) -> ImageBlobs:
    """A reproducible one-layer linux/amd64 OCI image holding ``files`` (fixed mtimes, so the
    same files always give the same manifest digest)."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as archive:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o755
            archive.addfile(info, io.BytesIO(data))
    layer = gzip.compress(tar_bytes.getvalue(), mtime=0)
    diff_id = "sha256:" + hashlib.sha256(tar_bytes.getvalue()).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}},
                        separators=(",", ":")).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "size": len(config),
                   "digest": "sha256:" + hashlib.sha256(config).hexdigest()},
        "layers": [{"mediaType": LAYER_MEDIA_TYPE, "size": len(layer),
                    "digest": "sha256:" + hashlib.sha256(layer).hexdigest()}],
    }, separators=(",", ":")).encode()
    return ImageBlobs(manifest, config, layer)


def push_image(registry: str, repository: str, tag: str, image: ImageBlobs) -> str:
    """Push an image over the distribution API; returns its manifest digest. Raises what
    ``RegistryClient`` raises."""
    client = RegistryClient(registry)
    client.put_blob(repository, image.layer)
    client.put_blob(repository, image.config)
    return client.put_manifest(repository, tag, image.manifest)
