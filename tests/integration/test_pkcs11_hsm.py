"""The PKCS#11 adapter against a real SoftHSM2 token (one fresh token per test)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pkcs11 import Attribute, ObjectClass

from kms.domain.keys import Algorithm
from kms.errors import HsmError, InvalidArgument, NotFound
from kms.hsm.direct import CKM_ECDSA, CKM_EDDSA
from kms.hsm.pkcs11 import SESSION_COPY_ID_PREFIX, Pkcs11Hsm
from signer.dev.softhsm import CONF_TEMPLATE, init_token, token_labels
from tests.fixtures.softhsm import SoftHsmTestToken

pytestmark = pytest.mark.integration

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]


def run(coro: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await coro

    return asyncio.run(wrapper())


def digest_of(data: bytes | str) -> bytes:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).digest()


def verify(public_key_der: bytes, algorithm: Algorithm, digest: bytes, signature: bytes) -> None:
    """Raises InvalidSignature unless ``signature`` is ``algorithm``'s signature of ``digest``."""
    public = serialization.load_der_public_key(public_key_der)
    if algorithm is Algorithm.ECDSA_P256_SHA256:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(public.curve, ec.SECP256R1)
        public.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    elif algorithm is Algorithm.ED25519:
        assert isinstance(public, ed25519.Ed25519PublicKey)
        public.verify(signature, digest)
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.key_size == 3072
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        public.verify(signature, digest, pss, Prehashed(hashes.SHA256()))


def openssl_verify(
    directory: Path, public_key_der: bytes, algorithm: Algorithm, digest: bytes, signature: bytes
) -> subprocess.CompletedProcess[str]:
    public = serialization.load_der_public_key(public_key_der)
    pem = directory / "pub.pem"
    pem.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (directory / "digest.bin").write_bytes(digest)
    (directory / "sig.bin").write_bytes(signature)
    command = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(pem)]
    command += ["-in", str(directory / "digest.bin"), "-sigfile", str(directory / "sig.bin")]
    if algorithm is Algorithm.ED25519:
        command.append("-rawin")
    if algorithm is Algorithm.RSA_PSS_3072_SHA256:
        command += ["-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:32"]
        command += ["-pkeyopt", "digest:sha256"]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)


@pytest.mark.parametrize("algorithm", list(Algorithm), ids=lambda a: a.short_name)
def test_signature_verifies_with_cryptography_and_openssl(
    hsm: Pkcs11Hsm, algorithm: Algorithm, tmp_path: Path
) -> None:
    digest = digest_of("sha256 of an image manifest")

    async def scenario() -> tuple[bytes, bytes, bytes]:
        pair = await hsm.generate_key_pair(
            label="build-key", algorithm=algorithm, extractable=False
        )
        signature = await hsm.sign_digest(pair.hsm_id, algorithm, digest)
        return pair.public_key_der, signature, await hsm.public_key(pair.hsm_id)

    public_der, signature, fetched_public_der = run(scenario())

    assert fetched_public_der == public_der
    verify(public_der, algorithm, digest, signature)
    tampered = bytes([digest[0] ^ 1]) + digest[1:]
    with pytest.raises(InvalidSignature):
        verify(public_der, algorithm, tampered, signature)

    ok = openssl_verify(tmp_path, public_der, algorithm, digest, signature)
    assert ok.returncode == 0, ok.stderr
    assert "Signature Verified Successfully" in ok.stdout
    bad = openssl_verify(tmp_path, public_der, algorithm, tampered, signature)
    assert bad.returncode != 0
    assert "Signature Verified Successfully" not in bad.stdout


def test_ed25519_signs_longer_digests_as_its_message(hsm: Pkcs11Hsm) -> None:
    digest = hashlib.sha512(b"provenance").digest()

    async def scenario() -> tuple[bytes, bytes]:
        pair = await hsm.generate_key_pair(
            label="ed", algorithm=Algorithm.ED25519, extractable=False
        )
        return pair.public_key_der, await hsm.sign_digest(pair.hsm_id, Algorithm.ED25519, digest)

    public_der, signature = run(scenario())
    assert len(signature) == 64
    verify(public_der, Algorithm.ED25519, digest, signature)


def test_ecdsa_signatures_are_der_and_randomised(hsm: Pkcs11Hsm) -> None:
    digest = digest_of("same digest twice")

    async def scenario() -> tuple[bytes, bytes]:
        pair = await hsm.generate_key_pair(
            label="ec", algorithm=Algorithm.ECDSA_P256_SHA256, extractable=False
        )
        first = await hsm.sign_digest(pair.hsm_id, Algorithm.ECDSA_P256_SHA256, digest)
        second = await hsm.sign_digest(pair.hsm_id, Algorithm.ECDSA_P256_SHA256, digest)
        return first, second

    first, second = run(scenario())
    assert first[0] == 0x30  # DER SEQUENCE, not raw r||s
    assert first != second


def test_wrong_digest_size_and_wrong_algorithm_are_invalid_arguments(hsm: Pkcs11Hsm) -> None:
    async def scenario() -> None:
        pair = await hsm.generate_key_pair(
            label="ec", algorithm=Algorithm.ECDSA_P256_SHA256, extractable=False
        )
        with pytest.raises(InvalidArgument, match="32-byte digest"):
            await hsm.sign_digest(pair.hsm_id, Algorithm.ECDSA_P256_SHA256, bytes(48))
        with pytest.raises(InvalidArgument, match="cannot sign as ed25519"):
            await hsm.sign_digest(pair.hsm_id, Algorithm.ED25519, bytes(32))

    run(scenario())


def test_many_tasks_and_threads_sign_at_once(hsm: Pkcs11Hsm) -> None:
    algorithm = Algorithm.ECDSA_P256_SHA256
    pair = run(hsm.generate_key_pair(label="busy", algorithm=algorithm, extractable=False))
    threads_count, tasks_per_thread = 6, 400
    main_loop_tasks = 1000
    results: dict[str, list[tuple[bytes, bytes]]] = {}
    failures: list[BaseException] = []

    async def sign_many(prefix: str, count: int) -> list[tuple[bytes, bytes]]:
        # Distinct digests, so a signature handed to the wrong caller fails verification.
        digests = [digest_of(f"{prefix}-{i}") for i in range(count)]
        signatures = await asyncio.gather(
            *(hsm.sign_digest(pair.hsm_id, algorithm, digest) for digest in digests)
        )
        return list(zip(digests, signatures, strict=True))

    def thread_main(name: str) -> None:
        try:
            results[name] = asyncio.run(sign_many(name, tasks_per_thread))
        except BaseException as exc:  # reported below; a thread must not die silently
            failures.append(exc)

    threads = [
        threading.Thread(target=thread_main, args=(f"thread{i}",)) for i in range(threads_count)
    ]
    for thread in threads:
        thread.start()
    results["main"] = run(sign_many("main", main_loop_tasks))
    for thread in threads:
        thread.join(timeout=120)

    assert not failures
    assert not any(thread.is_alive() for thread in threads)
    signed = [item for batch in results.values() for item in batch]
    assert len(signed) == threads_count * tasks_per_thread + main_loop_tasks
    public = serialization.load_der_public_key(pair.public_key_der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    for digest, signature in signed:
        public.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


@pytest.mark.parametrize("algorithm", list(Algorithm), ids=lambda a: a.short_name)
def test_batch_signing_keeps_order_and_per_item_errors(
    hsm: Pkcs11Hsm, algorithm: Algorithm
) -> None:
    digests = [digest_of(f"artifact-{i}") for i in range(20)]
    digests.insert(7, b"too short")

    async def scenario() -> tuple[bytes, list[bytes | Exception]]:
        pair = await hsm.generate_key_pair(label="batch", algorithm=algorithm, extractable=False)
        return pair.public_key_der, await hsm.sign_digests(pair.hsm_id, algorithm, digests)

    public_der, results = run(scenario())

    assert len(results) == len(digests)
    assert isinstance(results[7], InvalidArgument)
    for index, (digest, result) in enumerate(zip(digests, results, strict=True)):
        if index == 7:
            continue
        assert isinstance(result, bytes)
        verify(public_der, algorithm, digest, result)


@pytest.mark.parametrize("algorithm", list(Algorithm), ids=lambda a: a.short_name)
def test_private_keys_are_sensitive_and_not_extractable_by_default(
    hsm: Pkcs11Hsm, algorithm: Algorithm
) -> None:
    secret_attribute = (
        Attribute.PRIVATE_EXPONENT
        if algorithm is Algorithm.RSA_PSS_3072_SHA256
        else Attribute.VALUE
    )

    async def scenario() -> tuple[dict[str, bool], dict[str, bool]]:
        regional = await hsm.generate_key_pair(label="r", algorithm=algorithm, extractable=False)
        replicable = await hsm.generate_key_pair(label="m", algorithm=algorithm, extractable=True)
        for pair in (regional, replicable):

            def read_secret(session: Any, hsm_id: bytes = pair.hsm_id) -> Any:
                key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=hsm_id)
                return key[secret_attribute]

            with pytest.raises(HsmError, match="AttributeSensitive"):
                await hsm.run_with_session(read_secret)
        return await hsm.key_attributes(regional.hsm_id), await hsm.key_attributes(
            replicable.hsm_id
        )

    regional, replicable = run(scenario())

    assert regional == {
        "sensitive": True,
        "extractable": False,
        "sign": True,
        "decrypt": False,
        "unwrap": False,
        "local": True,
        "always_sensitive": True,
        "never_extractable": True,
        "token": True,
        "private": True,
    }
    assert replicable["extractable"] is True
    assert replicable["never_extractable"] is False
    assert replicable["sensitive"] is True
    assert replicable["always_sensitive"] is True


def test_keys_persist_in_the_token_across_adapters(softhsm_token: SoftHsmTestToken) -> None:
    digest = digest_of("persist")
    first = softhsm_token.open_hsm()
    try:
        pair = run(
            first.generate_key_pair(
                label="k", algorithm=Algorithm.ECDSA_P256_SHA256, extractable=False
            )
        )
    finally:
        first.close_blocking()
    second = softhsm_token.open_hsm()
    try:
        signature = run(second.sign_digest(pair.hsm_id, Algorithm.ECDSA_P256_SHA256, digest))
        assert run(second.public_key(pair.hsm_id)) == pair.public_key_der
    finally:
        second.close_blocking()
    verify(pair.public_key_der, Algorithm.ECDSA_P256_SHA256, digest, signature)


def test_destroy_removes_both_objects(hsm: Pkcs11Hsm) -> None:
    algorithm = Algorithm.ED25519

    async def scenario() -> None:
        doomed = await hsm.generate_key_pair(label="doomed", algorithm=algorithm, extractable=False)
        kept = await hsm.generate_key_pair(label="kept", algorithm=algorithm, extractable=False)
        await hsm.sign_digest(doomed.hsm_id, algorithm, digest_of("before"))

        await hsm.destroy_key_pair(doomed.hsm_id)

        with pytest.raises(NotFound):
            await hsm.sign_digest(doomed.hsm_id, algorithm, digest_of("after"))
        with pytest.raises(NotFound):
            await hsm.sign_digests(doomed.hsm_id, algorithm, [digest_of("after")])
        with pytest.raises(NotFound):
            await hsm.public_key(doomed.hsm_id)
        remaining = await hsm.run_with_session(
            lambda session: list(session.get_objects({Attribute.ID: doomed.hsm_id}))
            + list(session.get_objects({Attribute.ID: SESSION_COPY_ID_PREFIX + doomed.hsm_id}))
        )
        assert remaining == []  # the token pair and the session copy signing used
        await hsm.destroy_key_pair(doomed.hsm_id)  # already gone: fine
        await hsm.sign_digest(kept.hsm_id, algorithm, digest_of("others unaffected"))

    run(scenario())


def test_unknown_key_is_not_found(hsm: Pkcs11Hsm) -> None:
    unknown = bytes(16)

    async def scenario() -> None:
        with pytest.raises(NotFound):
            await hsm.sign_digest(unknown, Algorithm.ECDSA_P256_SHA256, digest_of("x"))
        with pytest.raises(NotFound):
            await hsm.public_key(unknown)
        with pytest.raises(NotFound):
            await hsm.key_attributes(unknown)

    run(scenario())


def test_hsm_id_comes_from_the_id_source(softhsm_token: SoftHsmTestToken) -> None:
    fixed = bytes.fromhex("00112233445566778899aabbccddeeff")
    adapter = Pkcs11Hsm.open_blocking(
        softhsm_token.module_path,
        softhsm_token.label,
        softhsm_token.user_pin,
        id_source=lambda size: fixed[:size],
    )
    try:
        pair = run(
            adapter.generate_key_pair(label="k", algorithm=Algorithm.ED25519, extractable=False)
        )
        assert pair.hsm_id == fixed
        # A second key with the same CKA_ID would make hsm_id ambiguous: refused.
        with pytest.raises(HsmError, match="already holds an object"):
            run(
                adapter.generate_key_pair(label="k", algorithm=Algorithm.ED25519, extractable=False)
            )
    finally:
        adapter.close_blocking()


def test_two_adapters_share_the_login_and_closing_one_keeps_the_other(
    softhsm_token: SoftHsmTestToken,
) -> None:
    algorithm = Algorithm.ECDSA_P256_SHA256
    first = softhsm_token.open_hsm()
    second = softhsm_token.open_hsm()  # a second C_Login would raise UserAlreadyLoggedIn
    try:
        pair = run(first.generate_key_pair(label="k", algorithm=algorithm, extractable=False))
        first.close_blocking()
        signature = run(second.sign_digest(pair.hsm_id, algorithm, digest_of("still logged in")))
        verify(pair.public_key_der, algorithm, digest_of("still logged in"), signature)
        with pytest.raises(HsmError, match="closed"):
            run(first.sign_digest(pair.hsm_id, algorithm, digest_of("x")))
    finally:
        first.close_blocking()
        second.close_blocking()


def test_pin_stays_out_of_repr_and_errors(softhsm_token: SoftHsmTestToken) -> None:
    pin = softhsm_token.user_pin
    wrong_pin = pin[::-1] + "0"
    with pytest.raises(HsmError) as nobody_open:
        Pkcs11Hsm.open_blocking(softhsm_token.module_path, softhsm_token.label, wrong_pin)

    adapter = softhsm_token.open_hsm()
    try:
        assert pin not in repr(adapter)
        assert softhsm_token.label in repr(adapter)
        # With the token already logged in, a wrong PIN must still be refused.
        with pytest.raises(HsmError) as already_open:
            run(Pkcs11Hsm.open(softhsm_token.module_path, softhsm_token.label, wrong_pin))
    finally:
        adapter.close_blocking()

    for error in (nobody_open.value, already_open.value):
        assert "rejected the user PIN" in str(error)
        text = f"{error} {error!r} {error.__cause__!r} {error.__context__!r}"
        assert wrong_pin not in text
        assert pin not in text


def test_missing_token_is_an_hsm_error_naming_it(softhsm_token: SoftHsmTestToken) -> None:
    with pytest.raises(HsmError, match="no token labelled 'no-such-token'"):
        Pkcs11Hsm.open_blocking(softhsm_token.module_path, "no-such-token", "1234")


def test_token_created_after_close_is_found(softhsm_token: SoftHsmTestToken) -> None:
    # SoftHSM reads its token directory only in C_Initialize; the adapter re-initialises when
    # the last user closes, so a token made later (another test, an operator) is seen.
    first = softhsm_token.open_hsm()
    first.close_blocking()
    label = softhsm_token.label + "-b"
    init_token(softhsm_token.conf_path, label, so_pin="so-pin-b", user_pin="user-pin-b")
    later = Pkcs11Hsm.open_blocking(softhsm_token.module_path, label, "user-pin-b")
    try:
        assert later.token_label == label
    finally:
        later.close_blocking()
        subprocess.run(
            ["softhsm2-util", "--delete-token", "--token", label],
            env=softhsm_token.token.child_env(),
            capture_output=True,
            check=False,
        )


def test_init_token_is_idempotent(softhsm_token: SoftHsmTestToken) -> None:
    init_token(softhsm_token.conf_path, softhsm_token.label, so_pin="other-so", user_pin="other")
    assert token_labels(softhsm_token.conf_path).count(softhsm_token.label) == 1
    adapter = softhsm_token.open_hsm()  # the original PIN still works
    adapter.close_blocking()


CHILD_SIGNER = """
import asyncio, hashlib, sys
from kms.domain.keys import Algorithm
from kms.hsm.pkcs11 import Pkcs11Hsm, load_pin
from signer.dev.softhsm import find_softhsm_module

async def main(label, pin_file, hsm_id):
    hsm = await Pkcs11Hsm.open(find_softhsm_module(), label, load_pin(pin_file, None))
    try:
        digest = hashlib.sha256(sys.argv[4].encode()).digest()
        signature = await hsm.sign_digest(bytes.fromhex(hsm_id), Algorithm.ED25519, digest)
        print(signature.hex())
    finally:
        await hsm.close()

asyncio.run(main(*sys.argv[1:4]))
"""


def test_processes_opening_one_token_at_once(
    softhsm_token: SoftHsmTestToken, softhsm_pin_file: Path
) -> None:
    assert softhsm_pin_file.stat().st_mode & 0o777 == 0o600
    adapter = softhsm_token.open_hsm()
    try:
        pair = run(
            adapter.generate_key_pair(
                label="shared", algorithm=Algorithm.ED25519, extractable=False
            )
        )
    finally:
        adapter.close_blocking()

    env = softhsm_token.token.child_env()
    env["PYTHONPATH"] = str(REPO)
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD_SIGNER,
                softhsm_token.label,
                str(softhsm_pin_file),
                pair.hsm_id.hex(),
                f"child-{i}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    for i, child in enumerate(children):
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        verify(pair.public_key_der, Algorithm.ED25519, digest_of(f"child-{i}"), bytes.fromhex(out))


def test_conf_template_file_matches_the_tooling() -> None:
    template = (REPO / "softhsm" / "softhsm2.conf.template").read_text(encoding="utf-8")
    assert template == CONF_TEMPLATE
    assert "{tokendir}" in template


def test_adapter_works_from_a_forked_child(softhsm_token: SoftHsmTestToken) -> None:
    # Signer workers fork after the parent may have used the HSM.
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    adapter = softhsm_token.open_hsm()
    try:
        pair = run(
            adapter.generate_key_pair(label="fork", algorithm=Algorithm.ED25519, extractable=False)
        )
        child_check = _in_forked_child(
            lambda: _sign_in_child(softhsm_token, pair.hsm_id, pair.public_key_der)
        )
        assert child_check == 0
        run(adapter.sign_digest(pair.hsm_id, Algorithm.ED25519, digest_of("parent still works")))
    finally:
        adapter.close_blocking()


def _sign_in_child(token: SoftHsmTestToken, hsm_id: bytes, public_der: bytes) -> None:
    child = token.open_hsm()
    try:
        signature = run(child.sign_digest(hsm_id, Algorithm.ED25519, digest_of("child")))
    finally:
        child.close_blocking()
    verify(public_der, Algorithm.ED25519, digest_of("child"), signature)


def _in_forked_child(body: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("algorithm", [Algorithm.ECDSA_P256_SHA256, Algorithm.ED25519],
                         ids=lambda a: a.short_name)
def test_direct_c_sign_signs_like_python_pkcs11_and_refuses_cleanly(
    hsm: Pkcs11Hsm, algorithm: Algorithm
) -> None:
    """The one-call C_Sign path (kms.hsm.direct) makes valid signatures, and a refusal leaves
    no operation active: the next signature on the same session still works."""
    direct = hsm._runtime.direct
    assert direct is not None  # SoftHSM exports C_GetFunctionList
    mechanism = CKM_ECDSA if algorithm is Algorithm.ECDSA_P256_SHA256 else CKM_EDDSA
    digest = digest_of("direct")

    async def scenario() -> tuple[bytes, bytes | None, bytes | None, bytes | None]:
        pair = await hsm.generate_key_pair(label="direct", algorithm=algorithm,
                                           extractable=False)

        def sign_three(session: Any) -> tuple[bytes | None, bytes | None, bytes | None]:
            private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=pair.hsm_id)
            good = direct.sign(session.handle, private.handle, mechanism, digest)
            unknown_key = direct.sign(session.handle, 0x7FFFFFF0, mechanism, digest)
            again = direct.sign(session.handle, private.handle, mechanism, digest)
            return good, unknown_key, again

        def sign_all(session: Any) -> tuple[list[bytes | None], list[bytes | None]]:
            private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=pair.hsm_id)
            refused = direct.sign_all(session.handle, 0x7FFFFFF0, mechanism, [digest] * 2)
            return refused, direct.sign_all(session.handle, private.handle, mechanism,
                                            [digest] * 3)

        three = await hsm.run_with_session(sign_three)
        refused, signed = await hsm.run_with_session(sign_all)
        assert refused == [None, None]
        return (pair.public_key_der, three[0], three[1], three[2], *signed)

    public_der, good, unknown_key, *others = run(scenario())
    assert unknown_key is None
    for raw in (good, *others):
        assert raw is not None
        signature = (raw if algorithm is Algorithm.ED25519
                     else encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                               int.from_bytes(raw[32:], "big")))
        verify(public_der, algorithm, digest, signature)


class _RefusesSome:
    """A DirectSigner whose module call refuses the digests in ``refused`` (as a module
    without a mechanism, or after a transient error, would)."""

    def __init__(self, real: Any, refused: set[bytes]) -> None:
        self._real, self._refused = real, refused

    def sign_all(self, session: int, key: int, mechanism: int,
                 digests: list[bytes]) -> list[bytes | None]:
        return [None if digest in self._refused
                else self._real.sign(session, key, mechanism, digest) for digest in digests]


@pytest.mark.parametrize("algorithm", [Algorithm.ECDSA_P256_SHA256, Algorithm.ED25519],
                         ids=lambda a: a.short_name)
def test_a_batch_signs_what_the_direct_path_refused_through_python_pkcs11(
    hsm: Pkcs11Hsm, algorithm: Algorithm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A digest the one-call path gives up on is signed again alone, in its place; a
    wrong-size digest beside it is still refused on its own."""
    digests = [digest_of(f"item-{i}") for i in range(6)]
    monkeypatch.setattr(hsm._runtime, "direct",
                        _RefusesSome(hsm._runtime.direct, {digests[1], digests[4]}))
    items = [*digests[:3], b"short", *digests[3:]]

    async def scenario() -> tuple[bytes, list[bytes | Exception]]:
        pair = await hsm.generate_key_pair(label="refused", algorithm=algorithm,
                                           extractable=False)
        return pair.public_key_der, await hsm.sign_digests(pair.hsm_id, algorithm, items)

    public_der, results = run(scenario())

    assert isinstance(results.pop(3), InvalidArgument)
    for digest, result in zip(digests, results, strict=True):
        assert isinstance(result, bytes)
        verify(public_der, algorithm, digest, result)


def test_softhsm_signs_with_a_sensitive_session_copy_under_its_own_id(hsm: Pkcs11Hsm) -> None:
    """The copy that signs (docs/adr/0013) is a session object as sensitive as its token
    original, and invisible to every lookup by the key's own id."""
    algorithm = Algorithm.ECDSA_P256_SHA256

    async def scenario() -> tuple[list[dict[str, Any]], int, bytes]:
        pair = await hsm.generate_key_pair(label="copied", algorithm=algorithm,
                                           extractable=True)  # multi-region: extractable
        signature = await hsm.sign_digest(pair.hsm_id, algorithm, digest_of("copied"))
        verify(pair.public_key_der, algorithm, digest_of("copied"), signature)

        def inspect(session: Any) -> tuple[list[dict[str, Any]], int]:
            copies = list(session.get_objects(
                {Attribute.ID: SESSION_COPY_ID_PREFIX + pair.hsm_id}))
            found = []
            for copy in copies:
                try:
                    copy[Attribute.VALUE]
                    readable = True
                except Exception:  # any refusal will do
                    readable = False
                found.append({"token": copy[Attribute.TOKEN],
                              "sensitive": copy[Attribute.SENSITIVE],
                              "sign": copy[Attribute.SIGN], "value_readable": readable})
            by_key_id = len(list(session.get_objects({Attribute.ID: pair.hsm_id,
                                                      Attribute.CLASS: ObjectClass.PRIVATE_KEY})))
            return found, by_key_id

        found, by_key_id = await hsm.run_with_session(inspect)
        return found, by_key_id, pair.hsm_id

    found, by_key_id, _ = run(scenario())
    assert found == [{"token": False, "sensitive": True, "sign": True, "value_readable": False}]
    assert by_key_id == 1  # only the token private key


def test_a_session_copy_is_replaced_from_the_token_object_when_it_ages(
    hsm: Pkcs11Hsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token key destroyed behind this process's back (another worker destroyed it) stops
    signing here once the copy is older than SESSION_COPY_MAX_AGE: the new copy is refused."""
    algorithm = Algorithm.ECDSA_P256_SHA256

    async def scenario() -> None:
        pair = await hsm.generate_key_pair(label="aging", algorithm=algorithm,
                                           extractable=False)
        await hsm.sign_digest(pair.hsm_id, algorithm, digest_of("fresh copy"))

        def destroy_token_pair_only(session: Any) -> None:
            for obj in list(session.get_objects({Attribute.ID: pair.hsm_id})):
                obj.destroy()

        await hsm.run_with_session(destroy_token_pair_only)
        monkeypatch.setattr("kms.hsm.pkcs11.SESSION_COPY_MAX_AGE", 0.0)
        with pytest.raises(NotFound):
            await hsm.sign_digests(pair.hsm_id, algorithm, [digest_of("after")])
        leftover = await hsm.run_with_session(lambda session: list(session.get_objects(
            {Attribute.ID: SESSION_COPY_ID_PREFIX + pair.hsm_id})))
        assert leftover == []  # the old copy was destroyed, not just forgotten

    run(scenario())


def test_a_lost_session_is_opened_again_without_a_restart(hsm: Pkcs11Hsm) -> None:
    """The module drops the session (token reset, HSM failover, SoftHSM after its files
    changed): the next call opens it again, logs in with the PIN it was opened with and
    succeeds; no operator step (issue 10, chaos)."""
    algorithm = Algorithm.ECDSA_P256_SHA256

    async def scenario() -> None:
        pair = await hsm.generate_key_pair(label="survivor", algorithm=algorithm,
                                           extractable=False)
        await hsm.sign_digest(pair.hsm_id, algorithm, digest_of("before"))
        await hsm.run_with_session(lambda session: session.close())  # behind the adapter
        for name in ("single", "batch"):
            if name == "single":
                signature = await hsm.sign_digest(pair.hsm_id, algorithm, digest_of(name))
            else:
                (signature,) = await hsm.sign_digests(pair.hsm_id, algorithm, [digest_of(name)])
            assert isinstance(signature, bytes)
            verify(pair.public_key_der, algorithm, digest_of(name), signature)

    run(scenario())
