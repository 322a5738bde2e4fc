"""EtcdKeyStateStore and KeyStateView against real etcd processes."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import socket
import time
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kms.domain.keys import Algorithm, Key, Replication
from kms.domain.policy import AccessPolicy, Binding
from kms.errors import (
    AlreadyExists,
    Conflict,
    NotFound,
    StateStoreError,
    Unavailable,
    WatchCompacted,
)
from kms.ports import StateEvent, SystemClock
from kms.state.etcd import EtcdConfig, EtcdKeyStateStore
from kms.state.view import KeyStateView
from signer.dev.ca import DevCa
from signer.dev.etcd import EtcdCluster, EtcdTls, free_ports
from tests.fixtures.etcd import EtcdFactory

pytestmark = pytest.mark.integration

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def make_key(name: str, period: int | None = None) -> Key:
    return Key.new(
        name=name,
        algorithm=Algorithm.ECDSA_P256_SHA256,
        replication=Replication.REGIONAL,
        public_key_der=b"spki-" + name.encode(),
        hsm_id=b"\x01\x02",
        now=1_700_000_000.0,
        rotation_period_seconds=period,
    )


def store_for(cluster: EtcdCluster, **overrides: Any) -> EtcdKeyStateStore:
    return EtcdKeyStateStore(EtcdConfig(endpoints=cluster.endpoints, **overrides))


def etcdctl_get(cluster: EtcdCluster, path: str) -> tuple[dict[str, Any], int]:
    """The JSON record and mod_revision at ``path``, read by etcdctl (not by our code)."""
    out = json.loads(cluster.etcdctl("get", path, "-w", "json"))
    (kv,) = out["kvs"]
    return json.loads(base64.b64decode(kv["value"])), int(kv["mod_revision"])


async def closing(store: EtcdKeyStateStore, work: Awaitable[T]) -> T:
    try:
        return await work
    finally:
        await store.close()


def test_create_get_list_update_and_stored_form(etcd_cluster: EtcdCluster) -> None:
    store = store_for(etcd_cluster)

    async def scenario() -> None:
        created = await store.create_key(make_key("release"))
        await store.create_key(make_key("ci"))
        assert await store.get_key("release") == created
        assert [v.key.name for v in await store.list_keys()] == ["ci", "release"]

        changed = dataclasses.replace(created.key, rotation_period_seconds=3600)
        updated = await store.update_key(changed, created.mod_revision)
        assert updated.mod_revision > created.mod_revision
        assert await store.get_key("release") == updated
        with pytest.raises(NotFound, match="no key named 'missing'"):
            await store.get_key("missing")
        with pytest.raises(NotFound):
            await store.update_key(make_key("missing"), 5)

        record, mod_revision = etcdctl_get(etcd_cluster, "/signet/v1/keys/release")
        assert Key.from_dict(record) == changed
        assert mod_revision == updated.mod_revision

    run(closing(store, scenario()))


def test_create_existing_name_raises_already_exists(etcd_cluster: EtcdCluster) -> None:
    store = store_for(etcd_cluster)

    async def scenario() -> None:
        first = await store.create_key(make_key("release"))
        with pytest.raises(AlreadyExists, match="'release' already exists"):
            await store.create_key(make_key("release", period=60))
        assert await store.get_key("release") == first  # the loser wrote nothing

    run(closing(store, scenario()))


def test_racing_updates_from_one_revision_exactly_one_wins(etcd_cluster: EtcdCluster) -> None:
    admin_a, admin_b = store_for(etcd_cluster), store_for(etcd_cluster)

    async def scenario() -> None:
        base = await admin_a.create_key(make_key("release"))
        change_a = dataclasses.replace(base.key, rotation_period_seconds=111)
        change_b = dataclasses.replace(base.key, rotation_period_seconds=222)
        results = await asyncio.gather(
            admin_a.update_key(change_a, base.mod_revision),
            admin_b.update_key(change_b, base.mod_revision),
            return_exceptions=True,
        )
        winners = [r for r in results if not isinstance(r, BaseException)]
        losers = [r for r in results if isinstance(r, BaseException)]
        assert len(winners) == 1, results
        assert len(losers) == 1
        assert isinstance(losers[0], Conflict), losers
        assert "read it again and retry" in str(losers[0])

        record, mod_revision = etcdctl_get(etcd_cluster, "/signet/v1/keys/release")
        assert Key.from_dict(record) == winners[0].key
        assert mod_revision == winners[0].mod_revision
        # A write based on the stale read keeps failing; nothing was silently overwritten.
        with pytest.raises(Conflict):
            await admin_b.update_key(change_b, base.mod_revision)
        await admin_b.close()

    run(closing(admin_a, scenario()))


def test_policy_compare_and_swap(etcd_cluster: EtcdCluster) -> None:
    store = store_for(etcd_cluster)
    policy_1 = AccessPolicy((Binding("spiffe://signet.dev/admin", admin=True),))
    policy_2 = AccessPolicy((*policy_1.bindings, Binding("spiffe://ci/*", sign=("release-*",))))

    async def scenario() -> None:
        assert await store.get_policy() is None
        first = await store.put_policy(policy_1, None)
        with pytest.raises(Conflict, match="exists already"):
            await store.put_policy(policy_2, None)
        second = await store.put_policy(policy_2, first.mod_revision)
        with pytest.raises(Conflict, match="changed at revision"):
            await store.put_policy(policy_1, first.mod_revision)
        assert await store.get_policy() == second
        forced = await store.put_policy(policy_1, 0)
        assert forced.mod_revision > second.mod_revision
        record, _ = etcdctl_get(etcd_cluster, "/signet/v1/policy")
        assert AccessPolicy.from_dict(record) == policy_1

    run(closing(store, scenario()))


def test_snapshot_reads_all_state_at_one_revision(etcd_cluster: EtcdCluster) -> None:
    store = store_for(etcd_cluster)

    async def scenario() -> None:
        a = await store.create_key(make_key("a"))
        b = await store.create_key(make_key("b"))
        policy = await store.put_policy(AccessPolicy(()), None)
        lease = await store.grant_lease(5)
        await store.register_signer("signer-1", lease, policy.mod_revision)
        etcd_cluster.etcdctl("put", "/elsewhere/key", "not ours")

        snapshot = await store.snapshot()
        assert snapshot.revision == await store.current_revision()
        assert snapshot.keys == {"a": a, "b": b}  # the signer registration is not key state
        assert snapshot.policy == policy

    run(closing(store, scenario()))


def test_snapshot_pages_key_state_and_ignores_large_records_beside_it(
    etcd_cluster: EtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signer must start however much else the prefix holds (CI once failed a restart on
    4.4 MB of TUF files), and a snapshot spanning pages is still one revision."""
    monkeypatch.setattr("kms.state.etcd.SNAPSHOT_PAGE", 3)
    store = store_for(etcd_cluster)

    async def scenario() -> None:
        created = {n: await store.create_key(make_key(n)) for n in "abcdefgh"}
        policy = await store.put_policy(AccessPolicy(()), None)
        blob = os.urandom(1024 * 1024)
        for i in range(5):  # 5 MiB beside the keys: more than gRPC's default 4 MiB reply
            await store.write_records({f"/signet/v1/tuf/files/{i}.targets.json": blob})
        read = await store.read_records(prefixes=["/signet/v1/tuf/files/"])
        assert len(read.records) == 5

        real_range = store._client.kvstub.Range  # interpose between pages
        pages = 0

        async def range_then_write(request: Any, **kwargs: Any) -> Any:
            nonlocal pages
            response = await real_range(request, **kwargs)
            pages += 1
            if pages == 1:  # a write after the first page must not show up in the snapshot
                await store.create_key(make_key("late"))
            return response

        store._client.kvstub.Range = range_then_write
        snapshot = await store.snapshot()
        store._client.kvstub.Range = real_range
        assert pages >= 3
        assert snapshot.keys == created
        assert snapshot.policy == policy
        assert "late" in (await store.snapshot()).keys

    run(closing(store, scenario()))


def test_watch_delivers_changes_in_order_quickly(etcd_cluster: EtcdCluster) -> None:
    store, writer = store_for(etcd_cluster), store_for(etcd_cluster)

    async def scenario() -> list[float]:
        start = await store.current_revision() + 1
        seen: list[StateEvent] = []
        arrivals: list[float] = []

        async def follow() -> None:
            async for event in store.watch(start):
                seen.append(event)
                arrivals.append(time.perf_counter())
                if len(seen) == 4:
                    return

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0.2)  # let the watch open
        sent = time.perf_counter()
        created = await writer.create_key(make_key("release"))
        put_done = time.perf_counter()
        updated = await writer.update_key(
            dataclasses.replace(created.key, rotation_period_seconds=5), created.mod_revision
        )
        policy = await writer.put_policy(AccessPolicy(()), None)
        await asyncio.to_thread(etcd_cluster.etcdctl, "del", "/signet/v1/keys/release")
        await asyncio.wait_for(follower, 5)
        await writer.close()

        assert [e.kind for e in seen] == ["key-put", "key-put", "policy-put", "key-deleted"]
        assert seen[0].key == created
        assert seen[1].key == updated
        assert seen[2].policy == policy
        assert seen[3].name == "release"
        assert [e.revision for e in seen] == sorted(e.revision for e in seen)
        return [put_done - sent, arrivals[0] - sent]

    put_latency, watch_delay = run(closing(store, scenario()))
    print(f"put latency {put_latency * 1000:.2f} ms, watch event after {watch_delay * 1000:.2f} ms")
    assert watch_delay < 1.0


def test_watch_from_compacted_revision_raises_watch_compacted(etcd_cluster: EtcdCluster) -> None:
    store = store_for(etcd_cluster)

    async def scenario() -> None:
        first = await store.create_key(make_key("a"))
        latest = await store.update_key(
            dataclasses.replace(first.key, rotation_period_seconds=9), first.mod_revision
        )
        await asyncio.to_thread(etcd_cluster.etcdctl, "compact", str(latest.mod_revision))
        with pytest.raises(WatchCompacted) as caught:
            async for _ in store.watch(first.mod_revision):
                pass
        assert caught.value.compact_revision == latest.mod_revision
        # From the compaction revision on, history is still there.
        async for event in store.watch(latest.mod_revision):
            assert event.key == latest
            break

    run(closing(store, scenario()))


def test_tls_with_client_certificates(etcd_factory: EtcdFactory, tmp_path: Path) -> None:
    ca = DevCa.load_or_create(tmp_path / "ca")
    server = ca.issue("etcd", server_names=("127.0.0.1",), server=True, client=True)
    client = ca.issue("signer", server_names=("127.0.0.1",), client=True)
    cluster = etcd_factory(1, tls=EtcdTls(ca.cert_path, server.cert_path, server.key_path))

    with_cert = store_for(
        cluster, ca_file=ca.cert_path, cert_file=client.cert_path, key_file=client.key_path
    )
    created = run(closing(with_cert, with_cert.create_key(make_key("release"))))
    record, _ = etcdctl_get(cluster, "/signet/v1/keys/release")
    assert Key.from_dict(record) == created.key

    without_cert = store_for(cluster, ca_file=ca.cert_path, retry_budget=1.0, call_timeout=0.5)
    with pytest.raises(StateStoreError, match=cluster.endpoints[0]):
        run(closing(without_cert, without_cert.get_key("release")))

    plaintext = store_for(cluster, retry_budget=1.0, call_timeout=0.5)
    with pytest.raises(StateStoreError):
        run(closing(plaintext, plaintext.get_key("release")))


def test_failover_when_the_first_member_dies(etcd_cluster3: EtcdCluster) -> None:
    store = store_for(etcd_cluster3)
    watcher_store = store_for(etcd_cluster3)

    async def scenario() -> float:
        view = KeyStateView(watcher_store, SystemClock(), lease_ttl=3)
        created = await store.create_key(make_key("release"))
        await view.start()
        await asyncio.to_thread(etcd_cluster3.member(0).kill)
        began = time.perf_counter()
        assert await store.get_key("release") == created
        updated = await store.update_key(
            dataclasses.replace(created.key, rotation_period_seconds=7), created.mod_revision
        )
        failover = time.perf_counter() - began
        with pytest.raises(Conflict):
            await store.update_key(created.key, created.mod_revision)
        # The signer's watch moved to a surviving member and still follows changes.
        await view.wait_for_revision(updated.mod_revision, timeout=5)
        assert view.key("release") == updated
        view.require_current()
        await view.stop()
        await watcher_store.close()
        return failover

    failover = run(closing(store, scenario()))
    print(f"read + CAS write after killing the first member took {failover:.3f} s")
    assert failover < 5.0


def test_etcd_down_raises_state_store_error_within_budget(etcd_cluster: EtcdCluster) -> None:
    etcd_cluster.stop()
    store = store_for(etcd_cluster, retry_budget=1.5, call_timeout=0.5)
    began = time.monotonic()
    with pytest.raises(StateStoreError, match=etcd_cluster.endpoints[0]) as caught:
        run(closing(store, store.get_key("release")))
    elapsed = time.monotonic() - began
    assert elapsed < 1.5 + 0.5
    assert "majority of etcd members" in str(caught.value)


def test_view_follows_puts_within_a_second(etcd_cluster: EtcdCluster) -> None:
    view_store, writer = store_for(etcd_cluster), store_for(etcd_cluster)

    async def scenario() -> float:
        view = KeyStateView(view_store, SystemClock(), signer_id="signer-1", registry=view_store)
        await view.start()
        view.require_current()
        began = time.perf_counter()
        created = await writer.create_key(make_key("release"))
        await view.wait_for_revision(created.mod_revision, timeout=1.0)
        delay = time.perf_counter() - began
        assert view.key("release") == created
        with pytest.raises(NotFound, match="signet key list"):
            view.key("other")
        # The signer acknowledged the revision it applied, under its lease.
        for _ in range(50):
            record = json.loads(
                etcd_cluster.etcdctl("get", "/signet/v1/signers/signer-1", "--print-value-only")
                or "{}"
            )
            if record.get("applied_revision") == created.mod_revision:
                break
            await asyncio.sleep(0.02)
        assert record["applied_revision"] == created.mod_revision
        await view.stop()
        # Revoking the lease at stop removed the registration.
        assert etcd_cluster.etcdctl("get", "/signet/v1/signers/signer-1").strip() == ""
        await writer.close()
        return delay

    delay = run(closing(view_store, scenario()))
    print(f"view applied a put {delay * 1000:.1f} ms after the write started")


def test_view_refuses_while_etcd_is_paused_and_recovers(etcd_cluster3: EtcdCluster) -> None:
    ttl = 2.0
    view_store = store_for(etcd_cluster3, call_timeout=0.5)
    writer = store_for(etcd_cluster3)

    async def scenario() -> tuple[float, float]:
        view = KeyStateView(view_store, SystemClock(), lease_ttl=ttl)
        await view.start()
        lease_before = view.lease_id
        # The watch is open once it delivers a change.
        before = await writer.create_key(make_key("before-pause"))
        await view.wait_for_revision(before.mod_revision, timeout=5)
        view.require_current()
        for m in etcd_cluster3.members:
            m.pause()
        paused = time.monotonic()
        try:
            while view.current:
                assert time.monotonic() - paused < ttl, "still claims to be current"
                await asyncio.sleep(0.02)
            refused_after = time.monotonic() - paused
            with pytest.raises(Unavailable, match="cannot prove its key state is current"):
                view.require_current()
            await asyncio.sleep(ttl)  # stays refused while etcd is out of reach
            assert not view.current
        finally:
            for m in etcd_cluster3.members:
                m.resume()
        resumed = time.monotonic()
        while not view.current:
            assert time.monotonic() - resumed < 15, "did not recover after SIGCONT"
            await asyncio.sleep(0.05)
        recovered_after = time.monotonic() - resumed
        print(f"lease {'kept' if view.lease_id == lease_before else 'expired and re-granted'}")
        # It follows changes again.
        created = await writer.create_key(make_key("after-pause"))
        await view.wait_for_revision(created.mod_revision, timeout=5)
        assert view.key("after-pause") == created
        await view.stop()
        await writer.close()
        return refused_after, recovered_after

    refused_after, recovered_after = run(closing(view_store, scenario()), timeout=45)
    print(
        f"refused {refused_after:.2f} s after SIGSTOP, current {recovered_after:.2f} s after resume"
    )


def test_free_ports_are_all_different_and_each_can_be_bound() -> None:
    """Members take two ports each; one at a time the kernel may hand out the same port
    twice, and etcd then fails to bind its peer URL on its own client port."""
    ports = free_ports(64)
    assert len(set(ports)) == 64
    for port in ports[:8]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_launcher_detached_load_stop_and_restart_on_same_data(tmp_path: Path) -> None:
    directory = tmp_path / "dev-etcd"
    cluster = EtcdCluster.start(directory, detach=True)
    try:
        cluster.etcdctl("put", "/signet/v1/probe", "kept")
        pid = cluster.member(0).pid
        assert pid is not None
        assert os.getsid(pid) == pid  # its own session: it outlives the CLI that started it

        found = EtcdCluster.load(directory)  # what `signet dev down` does
        assert found.endpoints == cluster.endpoints
        assert found.member(0).pid == pid
        found.stop()
        assert not cluster.member(0).running

        again = EtcdCluster.start(directory)  # same data dir, same flags: the data is back
        assert again.endpoints == cluster.endpoints
        assert again.etcdctl("get", "/signet/v1/probe", "--print-value-only").strip() == "kept"
        again.stop()
    finally:
        EtcdCluster.load(directory).stop(timeout=1.0)
