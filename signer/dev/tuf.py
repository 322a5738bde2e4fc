"""Bootstrap of the development cluster's TUF root (docs/adr/0007-trust-bundles.md).

``signet dev up`` plays the custodians: it generates custodian key files under
``<state>/custodians/`` (like keys on custodians' laptops; the signer never reads them), waits
until the signers have registered their regions' online keys, signs root version 1 with the
custodian keys and stores it in etcd, where the signers pick it up and start publishing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from kms.errors import AlreadyExists, Unavailable
from kms.state.etcd import EtcdConfig, EtcdKeyStateStore
from kms.tuf.signing import generate_custodian_key, init_root, load_custodian_signer
from kms.tuf.store import TufRepositoryStore

ROOT_LIFETIME_SECONDS = 365 * 86_400.0


def custodian_key_paths(state_dir: Path, count: int, algorithm: str = "ed25519") -> list[Path]:
    """``<state>/custodians/custodian-<n>.pem`` for n in 1..count, generated if missing."""
    directory = state_dir / "custodians"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = []
    for number in range(1, count + 1):
        path = directory / f"custodian-{number}.pem"
        if not path.exists():
            generate_custodian_key(path, algorithm)
        paths.append(path)
    return paths


async def bootstrap_root(
    etcd: EtcdConfig, state_dir: Path, *, custodians: int = 3, threshold: int = 2,
    algorithm: str = "ed25519", timeout: float = 30.0,
) -> Path:
    """Make sure root version 1 is stored in etcd and written to ``<state>/tuf/1.root.json``;
    then wait until the first publication exists. Returns the root file's path.

    Raises ``Unavailable`` when no online key is registered, or nothing is published, within
    ``timeout`` seconds (look at the signer log), ``InvalidArgument`` for a bad threshold.
    """
    out = state_dir / "tuf" / "1.root.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    store = EtcdKeyStateStore(etcd)
    repo = TufRepositoryStore(store, store.layout)
    deadline = time.monotonic() + timeout
    try:
        roots = await repo.roots()
        if 1 not in roots:
            online = await repo.online_keys()
            while not online:
                if time.monotonic() > deadline:
                    raise Unavailable("no signer registered an online TUF key within "
                                      f"{timeout:g} s; check the signer logs")
                await asyncio.sleep(0.1)
                online = await repo.online_keys()
            signers = [load_custodian_signer(p)
                       for p in custodian_key_paths(state_dir, custodians, algorithm)]
            root = init_root(signers, threshold, [k.tuf_key() for k in online],
                             expires=time.time() + ROOT_LIFETIME_SECONDS)
            # Another 'dev up' may have stored one first; then that one is used.
            with contextlib.suppress(AlreadyExists):
                await repo.store_root(1, root.to_bytes())
            roots = await repo.roots()
        out.write_bytes(roots[1])
        while (await repo.publication())[0] is None:
            if time.monotonic() > deadline:
                raise Unavailable(f"no trust bundle was published within {timeout:g} s of "
                                  "storing the root; check the signer logs")
            await asyncio.sleep(0.1)
    finally:
        await store.close()
    return out


def tuf_endpoint(signer_dir: Path) -> str:
    """The signer's ``/tuf/`` HTTPS listen address, chosen once and kept in
    ``<signer dir>/tuf-endpoint`` so restarts keep the URL in cluster.json valid."""
    from signer.dev.processes import persistent_endpoint

    return persistent_endpoint(signer_dir, "tuf-endpoint")
