"""Concurrent single signatures share hand-offs to the PKCS#11 thread, or inline slices on
the event loop (``sign_digest`` coalescing): each caller still gets the signature of its own
digest, or its own error. Every test runs in both signing modes (docs/adr/0013)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from kms.domain.keys import Algorithm
from kms.errors import HsmError, InvalidArgument, NotFound
from kms.hsm.pkcs11 import Pkcs11Hsm, inline_signing
from tests.fixtures.softhsm import SoftHsmTestToken

pytestmark = pytest.mark.integration
P256 = Algorithm.ECDSA_P256_SHA256


@pytest.fixture(params=["inline", "thread"])
def hsm(softhsm_token: SoftHsmTestToken, request: pytest.FixtureRequest) -> Iterator[Pkcs11Hsm]:
    adapter = softhsm_token.open_hsm(signing=request.param)
    assert adapter.inline is (request.param == "inline")
    yield adapter
    adapter.close_blocking()


def verify(public_key_der: bytes, digest: bytes, signature: bytes) -> None:
    public = serialization.load_der_public_key(public_key_der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def digests(count: int, salt: str = "") -> list[bytes]:
    return [hashlib.sha256(f"{salt}{n}".encode()).digest() for n in range(count)]


def test_concurrent_callers_each_get_their_own_signature(hsm: Pkcs11Hsm) -> None:
    async def scenario() -> None:
        pair = await hsm.generate_key_pair(label="c", algorithm=P256, extractable=False)
        wanted = digests(300)
        signatures = await asyncio.gather(*(hsm.sign_digest(pair.hsm_id, P256, d)
                                            for d in wanted))
        for d, sig in zip(wanted, signatures, strict=True):
            verify(pair.public_key_der, d, sig)

    asyncio.run(scenario())


def test_a_failing_item_fails_only_its_caller(hsm: Pkcs11Hsm) -> None:
    async def scenario() -> None:
        pair = await hsm.generate_key_pair(label="c", algorithm=P256, extractable=False)
        wanted = digests(40)
        calls = [hsm.sign_digest(pair.hsm_id, P256, d) for d in wanted]
        calls.insert(7, hsm.sign_digest(b"\x01" * 16, P256, wanted[0]))  # no such key
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(outcomes.pop(7), NotFound)
        for d, sig in zip(wanted, outcomes, strict=True):
            assert isinstance(sig, bytes)
            verify(pair.public_key_der, d, sig)

    asyncio.run(scenario())


def test_a_cancelled_caller_does_not_disturb_the_others(hsm: Pkcs11Hsm) -> None:
    async def scenario() -> None:
        pair = await hsm.generate_key_pair(label="c", algorithm=P256, extractable=False)
        wanted = digests(50)
        tasks = [asyncio.create_task(hsm.sign_digest(pair.hsm_id, P256, d)) for d in wanted]
        await asyncio.sleep(0)
        tasks[3].cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(outcomes[3], asyncio.CancelledError)
        for index, (d, sig) in enumerate(zip(wanted, outcomes, strict=True)):
            if index != 3:
                assert isinstance(sig, bytes)
                verify(pair.public_key_der, d, sig)
        # The queue is idle again, not stuck behind the cancelled call.
        verify(pair.public_key_der, wanted[0],
               await hsm.sign_digest(pair.hsm_id, P256, wanted[0]))

    asyncio.run(scenario())


def test_callers_on_several_event_loops_share_the_adapter(hsm: Pkcs11Hsm) -> None:
    pair = asyncio.run(hsm.generate_key_pair(label="c", algorithm=P256, extractable=False))
    failures: list[BaseException] = []

    def loop_thread(salt: str) -> None:
        async def sign_all() -> None:
            wanted = digests(100, salt)
            signatures = await asyncio.gather(*(hsm.sign_digest(pair.hsm_id, P256, d)
                                                for d in wanted))
            for d, sig in zip(wanted, signatures, strict=True):
                verify(pair.public_key_der, d, sig)

        try:
            asyncio.run(sign_all())
        except BaseException as error:  # reported by the test thread below
            failures.append(error)

    threads = [threading.Thread(target=loop_thread, args=(str(n),)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def test_signing_after_close_is_refused(hsm: Pkcs11Hsm) -> None:
    async def scenario() -> None:
        pair = await hsm.generate_key_pair(label="c", algorithm=P256, extractable=False)
        await hsm.close()
        with pytest.raises(HsmError, match="closed"):
            await hsm.sign_digest(pair.hsm_id, P256, digests(1)[0])

    asyncio.run(scenario())


def test_a_batch_comes_back_in_order_with_per_item_errors(hsm: Pkcs11Hsm) -> None:
    async def scenario() -> None:
        pair = await hsm.generate_key_pair(label="c", algorithm=P256, extractable=False)
        wanted = digests(700)
        items = [*wanted[:350], b"short", *wanted[350:]]
        outcomes = await hsm.sign_digests(pair.hsm_id, P256, items)
        assert len(outcomes) == len(items)
        assert isinstance(outcomes.pop(350), InvalidArgument)
        for d, sig in zip(wanted, outcomes, strict=True):
            assert isinstance(sig, bytes)
            verify(pair.public_key_der, d, sig)

    asyncio.run(scenario())


def test_an_inline_batch_lets_the_loop_run_between_slices(softhsm_token: SoftHsmTestToken
                                                           ) -> None:
    """A long batch must not hold the event loop (health checks, fence acks, other calls)
    from its first signature to its last."""
    hsm = softhsm_token.open_hsm(signing="inline")

    async def scenario() -> None:
        pair = await hsm.generate_key_pair(label="c", algorithm=P256, extractable=False)
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        before = ticks
        wanted = digests(1024)
        signatures = await hsm.sign_digests(pair.hsm_id, P256, wanted)
        during = ticks - before
        stop.set()
        await task
        for d, sig in zip(wanted, signatures, strict=True):
            assert isinstance(sig, bytes)
            verify(pair.public_key_der, d, sig)
        assert during >= 3  # 1,024 signatures took several slices, the loop ran between them

    try:
        asyncio.run(scenario())
    finally:
        hsm.close_blocking()


def test_inline_signing_waits_for_the_hsm_thread_when_it_holds_the_module(
    softhsm_token: SoftHsmTestToken,
) -> None:
    """While the HSM thread is inside the module (a key being generated), an inline signer
    must not enter it too (SoftHSM runs without locks: that would crash the process); its
    signatures go to the thread and come back correct once the thread is free."""
    hsm = softhsm_token.open_hsm(signing="inline")
    runtime = hsm._runtime  # the lock the module is guarded by
    inside = threading.Event()
    release = threading.Event()

    def hold() -> None:
        inside.set()
        release.wait(10)

    async def scenario() -> None:
        pair = await hsm.generate_key_pair(label="c", algorithm=P256, extractable=False)
        held = runtime.submit(hold)
        assert await asyncio.to_thread(inside.wait, 10)
        assert runtime.lock.locked()
        wanted = digests(40)
        batch = asyncio.create_task(hsm.sign_digests(pair.hsm_id, P256, wanted))
        singles = [asyncio.create_task(hsm.sign_digest(pair.hsm_id, P256, d))
                   for d in wanted[:5]]
        await asyncio.sleep(0.2)
        assert not batch.done()  # none went inline
        assert not any(s.done() for s in singles)
        release.set()
        await asyncio.wrap_future(held)
        for d, sig in zip(wanted, await batch, strict=True):
            assert isinstance(sig, bytes)
            verify(pair.public_key_der, d, sig)
        for d, single in zip(wanted, singles, strict=False):
            verify(pair.public_key_der, d, await single)
        assert not runtime.lock.locked()

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        hsm.close_blocking()


def test_signing_mode_auto_is_inline_only_for_softhsm() -> None:
    assert inline_signing("auto", "/usr/lib/softhsm/libsofthsm2.so")
    assert not inline_signing("auto", "/opt/cloudhsm/lib/libcloudhsm_pkcs11.so")
    assert inline_signing("inline", "/opt/cloudhsm/lib/libcloudhsm_pkcs11.so")
    assert not inline_signing("thread", "/usr/lib/softhsm/libsofthsm2.so")
    with pytest.raises(InvalidArgument, match="auto, inline, thread"):
        inline_signing("fast", "/usr/lib/softhsm/libsofthsm2.so")
