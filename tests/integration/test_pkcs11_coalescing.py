"""Concurrent single signatures share hand-offs to the PKCS#11 thread (``sign_digest``
coalescing): each caller still gets the signature of its own digest, or its own error."""

from __future__ import annotations

import asyncio
import hashlib
import threading

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from kms.domain.keys import Algorithm
from kms.errors import HsmError, NotFound
from kms.hsm.pkcs11 import Pkcs11Hsm

pytestmark = pytest.mark.integration
P256 = Algorithm.ECDSA_P256_SHA256


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
