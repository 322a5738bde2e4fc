"""Creating keys against a real SoftHSM token: attributes, and nothing left half-created."""

from __future__ import annotations

import asyncio

import pytest

from kms.admin import KeyAdministration
from kms.domain.keys import Algorithm, Replication
from kms.errors import AlreadyExists, NotFound
from kms.hsm.pkcs11 import Pkcs11Hsm
from kms.ports import SystemClock
from kms.signing import Caller
from kms.state.memory import InMemoryKeyStateStore
from kms.state.view import KeyStateView

pytestmark = pytest.mark.integration

ADMIN = Caller("insecure://test", unrestricted=True)


async def administration(hsm: Pkcs11Hsm) -> tuple[KeyAdministration, InMemoryKeyStateStore,
                                                   KeyStateView]:
    clock = SystemClock()
    store = InMemoryKeyStateStore(clock)
    view = KeyStateView(store, clock, lease_ttl=5)
    await view.start()
    # The lifecycle engine itself, as the insecure development mode runs it (ceremonies off).
    return KeyAdministration(hsm=hsm, store=store, view=view, clock=clock,
                             ceremonies_required=False), store, view


@pytest.mark.parametrize(
    ("algorithm", "replication", "extractable"),
    [
        (Algorithm.ECDSA_P256_SHA256, Replication.REGIONAL, False),
        (Algorithm.ECDSA_P256_SHA256, Replication.MULTI_REGION, True),
        (Algorithm.RSA_PSS_3072_SHA256, Replication.MULTI_REGION, True),
        (Algorithm.ED25519, Replication.REGIONAL, False),
    ],
)
def test_created_keys_are_sensitive_and_extractable_only_when_multi_region(
    hsm: Pkcs11Hsm, algorithm: Algorithm, replication: Replication, extractable: bool
) -> None:
    async def scenario() -> dict[str, bool]:
        admin, _, view = await administration(hsm)
        try:
            created = await admin.create_key(ADMIN, name="k", algorithm=algorithm,
                                             replication=replication)
            assert view.key("k").key == created.key  # this signer sees its own create
            return await hsm.key_attributes(created.key.primary.hsm_id)
        finally:
            await view.stop()

    attributes = asyncio.run(scenario())
    assert attributes["sensitive"]
    assert attributes["sign"]
    assert not attributes["decrypt"]
    assert attributes["extractable"] is extractable


def test_a_create_that_loses_the_race_removes_its_hsm_key(hsm: Pkcs11Hsm) -> None:
    async def scenario() -> None:
        admin, store, view = await administration(hsm)
        try:
            await admin.create_key(ADMIN, name="raced", algorithm=Algorithm.ECDSA_P256_SHA256,
                                   replication=Replication.REGIONAL)
            existing = await store.get_key("raced")
            # Another region creates the same name between our check and our write: simulate by
            # making the view blind to the existing record.
            await view.stop()
            blind = KeyStateView(InMemoryKeyStateStore(SystemClock()), SystemClock())
            await blind.start()
            racing = KeyAdministration(hsm=hsm, store=store, view=blind, clock=SystemClock(),
                                       ceremonies_required=False)
            made: list[bytes] = []
            real_generate = hsm.generate_key_pair

            async def recording_generate(**kwargs: object) -> object:
                pair = await real_generate(**kwargs)  # type: ignore[arg-type]
                made.append(pair.hsm_id)
                return pair

            hsm.generate_key_pair = recording_generate  # type: ignore[assignment,method-assign]
            try:
                with pytest.raises(AlreadyExists):
                    await racing.create_key(ADMIN, name="raced",
                                            algorithm=Algorithm.ECDSA_P256_SHA256,
                                            replication=Replication.REGIONAL)
            finally:
                del hsm.generate_key_pair
                await blind.stop()
            assert len(made) == 1
            with pytest.raises(NotFound):
                await hsm.public_key(made[0])  # the loser's key pair is gone from the token
            assert (await store.get_key("raced")) == existing  # the winner is untouched
            await hsm.public_key(existing.key.primary.hsm_id)
        finally:
            await view.stop()

    asyncio.run(scenario())
