"""The ``Hsm`` port over PKCS#11 (python-pkcs11), tested against SoftHSM2.

Threading. python-pkcs11 calls ``C_Initialize`` without locking flags, and SoftHSM then turns its
own locks off: two threads inside the module at once crash the process. So every PKCS#11 call in a
process holds the runtime's lock (one runtime per module path, shared by every ``Pkcs11Hsm``
opened in the process), and almost all of them run on the runtime's ONE worker thread. Async
methods hand work to that thread and await it on the caller's event loop, so one adapter serves
many tasks, threads and event loops.

Inline signing (docs/adr/0013). For a module that computes in this process (SoftHSM), ``C_Sign``
is ≈ 60 µs of CPU and returns the GIL while it runs; but to go on, the HSM thread must win the GIL
back from a busy event loop, which hands it over only every ``sys.getswitchinterval()`` (5 ms).
Measured here: a thread signing alone makes 14-16k signatures/s, beside one busy Python thread
500-1,000/s. So with ``signing="inline"`` (the default for SoftHSM) signatures are made on the
caller's event loop itself, in slices of about ``INLINE_SLICE_SECONDS`` between which the loop
runs other work, whenever the runtime's lock is free; when the HSM thread is busy (a key being
generated) they go to it as before. A module that waits on a network (most hardware HSMs) should
keep ``signing="thread"``: inline, its waits would stall the loop.

Module lifetime. python-pkcs11 loads a module once per process (``pkcs11.lib`` caches it by path)
and SoftHSM reads its token directory only in ``C_Initialize``, so a token initialised after that
is invisible. The runtime therefore finalises the module when the last adapter closes and
initialises it again on the next open: a token created in between is found. Login is token-wide
per process, so adapters of one token share one logged-in session.

Any other code that needs PKCS#11 in this process (key transport) must go through
``Pkcs11Hsm.run_with_session`` rather than calling python-pkcs11 itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11_errors
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from kms.domain.keys import Algorithm
from kms.errors import FailedPrecondition, HsmError, InvalidArgument, NotFound
from kms.hsm.direct import CKM_ECDSA, CKM_EDDSA, DirectSigner
from kms.ports import GeneratedKeyPair

_log = logging.getLogger(__name__)

T = TypeVar("T")

HSM_ID_SIZE = 16

# Session copies of token signing keys (_Runtime.session_copies): their CKA_ID, and how long
# one serves before it is copied again from the token object (which notices a key destroyed by
# another process; until then key state in etcd, not the HSM, stops its use).
SESSION_COPY_ID_PREFIX = b"signet-session-copy/"
SESSION_COPY_MAX_AGE = 30.0

# Inline signing (module docstring): how long one slice may hold the event loop, and the modes.
INLINE_SLICE_SECONDS = 0.002
SIGNING_MODES = ("auto", "inline", "thread")


def computes_in_process(module_path: str) -> bool:
    """Whether the module is a software token working in this process (SoftHSM): the one
    test behind re-indexing, session copies and inline signing by default."""
    return "softhsm" in os.path.basename(module_path).lower()


def inline_signing(mode: str, module_path: str) -> bool:
    """Whether ``mode`` signs on the event loop for ``module_path``: "inline" yes, "thread"
    no, "auto" only for SoftHSM (which computes in this process). Raises ``InvalidArgument``
    for another mode."""
    if mode not in SIGNING_MODES:
        raise InvalidArgument(f"HSM signing mode must be one of {', '.join(SIGNING_MODES)}, "
                              f"not {mode!r}")
    if mode == "auto":
        return computes_in_process(module_path)
    return mode == "inline"

# DER-encoded CKA_EC_PARAMS (namedCurve OIDs).
EC_PARAMS_P256 = bytes.fromhex("06082a8648ce3d030107")  # 1.2.840.10045.3.1.7 (prime256v1)
EC_PARAMS_ED25519 = bytes.fromhex("06032b6570")  # 1.3.101.112 (id-Ed25519)

RSA_MODULUS_BITS = 3072
PSS_SALT_LENGTH = 32

# Signed with one C_SignInit + C_Sign through kms.hsm.direct when the module allows it.
_DIRECT_MECHANISMS: dict[Algorithm, int] = {
    Algorithm.ECDSA_P256_SHA256: CKM_ECDSA,  # SoftHSM 2.6.1 has no CKM_ECDSA_SHA256
    Algorithm.ED25519: CKM_EDDSA,
}
_ALLOWED_DIGEST_SIZES: dict[Algorithm, frozenset[int]] = {
    Algorithm.ECDSA_P256_SHA256: frozenset({32}),
    Algorithm.RSA_PSS_3072_SHA256: frozenset({32}),
    # Ed25519 signs the digest bytes as its message: SHA-256, SHA-384 or SHA-512.
    Algorithm.ED25519: frozenset({32, 48, 64}),
}

_KEY_TYPES: dict[Algorithm, KeyType] = {
    Algorithm.ECDSA_P256_SHA256: KeyType.EC,
    Algorithm.ED25519: KeyType.EC_EDWARDS,
    Algorithm.RSA_PSS_3072_SHA256: KeyType.RSA,
}

# Token discovery and login: several processes opening one file-backed token at the same moment
# sometimes get CKR_GENERAL_ERROR; a token being initialised by another process may not be
# visible yet. Bounded: about two seconds at most.
_DISCOVERY_ATTEMPTS = 6
_DISCOVERY_RETRYABLE: tuple[type[BaseException], ...] = (
    p11_errors.GeneralError,
    p11_errors.DeviceError,
    p11_errors.NoSuchToken,
    p11_errors.TokenNotPresent,
    p11_errors.TokenNotRecognised,
)

_KEY_MISSING: tuple[type[BaseException], ...] = (
    p11_errors.NoSuchKey,
    p11_errors.ObjectHandleInvalid,
    p11_errors.KeyHandleInvalid,
)

# The session is gone (the module dropped it, or its login): open it again and log in again.
_SESSION_LOST: tuple[type[BaseException], ...] = (
    p11_errors.SessionHandleInvalid,
    p11_errors.SessionClosed,
    p11_errors.UserNotLoggedIn,
)

_PIN_REJECTED: tuple[type[BaseException], ...] = (
    p11_errors.PinIncorrect,
    p11_errors.PinInvalid,
    p11_errors.PinLenRange,
    p11_errors.PinLocked,
    p11_errors.PinExpired,
)


# --------------------------------------------------------------------------------------------
# Pure helpers (no PKCS#11, no I/O except load_pin)


def load_pin(pin_file: str | None, pin_env: str | None) -> str:
    """Read the token user PIN from ``pin_file`` (trailing newline stripped) or, if no file is
    given, from the environment variable named ``pin_env``.

    Raises ``InvalidArgument`` (never quoting the PIN) when neither is given, the file cannot be
    read, or the PIN is empty.
    """
    if pin_file:
        try:
            pin = Path(pin_file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise InvalidArgument(
                f"cannot read the HSM PIN file {pin_file!r}: {exc.strerror or exc}"
            ) from None
        if not pin:
            raise InvalidArgument(f"the HSM PIN file {pin_file!r} is empty")
        return pin
    if pin_env:
        pin = os.environ.get(pin_env, "")
        if not pin:
            raise InvalidArgument(
                f"the environment variable {pin_env!r} that should hold the HSM PIN "
                "is unset or empty"
            )
        return pin
    raise InvalidArgument("no HSM PIN given: pass a PIN file or the name of a PIN variable")


def ecdsa_raw_to_der(raw: bytes) -> bytes:
    """Convert a PKCS#11 ECDSA signature (r‖s, equal halves) to DER ``ECDSA-Sig-Value``.

    Raises ``HsmError`` if ``raw`` is empty or of odd length.
    """
    if not raw or len(raw) % 2:
        raise HsmError(f"HSM returned a malformed ECDSA signature ({len(raw)} bytes)")
    half = len(raw) // 2
    if half > 60:  # a body past 127 bytes needs long-form lengths (not P-256): the general one
        return encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
    # Two minimal unsigned INTEGERs in a SEQUENCE, built from bytes: half the CPU of going
    # through Python ints, and this runs once per signature.
    r, s = raw[:half].lstrip(b"\0"), raw[half:].lstrip(b"\0")
    if not r or r[0] & 0x80:
        r = b"\0" + r
    if not s or s[0] & 0x80:
        s = b"\0" + s
    return b"".join((bytes((0x30, len(r) + len(s) + 4, 0x02, len(r))), r,
                     bytes((0x02, len(s))), s))


def unwrap_der_octet_string(data: bytes) -> bytes:
    """Return the content of one DER OCTET STRING that spans all of ``data``.

    Raises ``ValueError`` if ``data`` is not exactly that.
    """
    if len(data) < 2 or data[0] != 0x04:
        raise ValueError("not a DER OCTET STRING")
    length = data[1]
    offset = 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or len(data) < 2 + count:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[2 : 2 + count], "big")
        offset = 2 + count
    if len(data) != offset + length:
        raise ValueError("DER OCTET STRING length does not match the data")
    return data[offset:]


def ec_point_bytes(ec_point: bytes, point_size: int) -> bytes:
    """The bare point from a CKA_EC_POINT value, which PKCS#11 wraps in a DER OCTET STRING
    (some modules return it bare). ``point_size`` is 65 for uncompressed P-256, 32 for Ed25519.

    Raises ``HsmError`` if the value is neither form.
    """
    if len(ec_point) == point_size and (point_size != 65 or ec_point[0] == 0x04):
        return ec_point
    try:
        point = unwrap_der_octet_string(ec_point)
    except ValueError:
        point = b""
    if len(point) != point_size:
        raise HsmError(f"HSM returned an EC point of unexpected form ({len(ec_point)} bytes)")
    return point


def spki_from_p256_point(point: bytes) -> bytes:
    """DER SubjectPublicKeyInfo of an uncompressed P-256 point."""
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    return _spki(key)


def spki_from_ed25519_point(point: bytes) -> bytes:
    """DER SubjectPublicKeyInfo of a 32-byte Ed25519 public key."""
    return _spki(ed25519.Ed25519PublicKey.from_public_bytes(point))


def spki_from_rsa(modulus: bytes, public_exponent: bytes) -> bytes:
    """DER SubjectPublicKeyInfo of an RSA key given as big-endian integers."""
    numbers = rsa.RSAPublicNumbers(
        int.from_bytes(public_exponent, "big"), int.from_bytes(modulus, "big")
    )
    return _spki(numbers.public_key())


def _spki(key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_digest(algorithm: Algorithm, digest: bytes) -> None:
    """Raise ``InvalidArgument`` unless ``digest`` has a size ``algorithm`` signs."""
    allowed = _ALLOWED_DIGEST_SIZES[algorithm]
    if len(digest) not in allowed:
        sizes = " or ".join(str(n) for n in sorted(allowed))
        raise InvalidArgument(
            f"a {algorithm.value} key signs a {sizes}-byte digest, got {len(digest)} bytes"
        )


# --------------------------------------------------------------------------------------------
# The process-wide runtime: one worker thread per PKCS#11 module


@dataclass
class _SigningKey:
    """What signs for one CKA_ID: a session copy of the token private key (``copied_at`` its
    monotonic time), or the token object itself (``copied_at`` None)."""

    key: Any  # python-pkcs11 PrivateKey
    key_type: KeyType
    copied_at: float | None = None


@dataclass
class _OpenToken:
    """A logged-in session to one token, shared by every adapter of that token in the process."""

    label: str
    session: Any  # pkcs11.Session
    pin_digest: bytes | None  # None when someone else in the process had logged in already
    users: int = 0
    private_keys: dict[bytes, _SigningKey] = field(default_factory=dict)
    # Kept (in memory only, never logged) to log in again after a re-index; see ``reindex``.
    pin: str | None = field(default=None, repr=False)


class _Runtime:
    """Owns the only thread that calls into one PKCS#11 module in this process."""

    def __init__(self, module_path: str) -> None:
        self.module_path = module_path
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkcs11")
        # Held by whoever is inside the module: a job on the worker thread, or an inline
        # signing slice on an event loop (see the module docstring).
        self.lock = threading.Lock()
        self.users = 0  # adapters opened or opening; guarded by _RUNTIMES_LOCK
        self.lib: Any = None
        self.direct: DirectSigner | None = None  # kms.hsm.direct, once the module is loaded
        self.tokens: dict[str, _OpenToken] = {}  # touched only on the worker thread
        # SoftHSM's file store can miss token objects another process created while this one
        # was writing (it records the shared generation counter as seen after its own write),
        # until some later write elsewhere. Re-initialising the module re-reads the token.
        software = computes_in_process(module_path)
        self.reindex_on_missing = software
        # SoftHSM re-reads a token object's generation file on every use (open, fcntl locks,
        # read, close): signing with a session copy costs ≈30 % less CPU (docs/adr/0013).
        self.session_copies = software
        self.last_reindex = -math.inf
        # The previous runtime of this module may still be finalising on its own thread.
        self.predecessor = _LAST_FINALIZE.get(module_path)

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        def locked() -> T:
            with self.lock:
                return fn()

        return self.executor.submit(locked)

    # Everything below runs on the worker thread.

    def load(self) -> Any:
        if self.lib is None:
            if self.predecessor is not None:
                self.predecessor.result()
                self.predecessor = None
            pid = os.getpid()
            lib = pkcs11.lib(self.module_path)
            if _INITIALISED_IN.get(self.module_path, pid) != pid:
                # Forked child: the module's state was copied from the parent. Start afresh.
                # SoftHSM with library.reset_on_fork has already dropped it and answers
                # C_Finalize with CKR_CRYPTOKI_NOT_INITIALIZED; python-pkcs11 marks the library
                # uninitialised either way.
                with contextlib.suppress(p11_errors.PKCS11Error):
                    lib.finalize()
                lib.initialize()
            _INITIALISED_IN[self.module_path] = pid
            self.lib = lib
            try:
                self.direct = DirectSigner(self.module_path)
            except (OSError, AttributeError) as exc:
                _log.warning("signing through python-pkcs11 only (%s): %s",
                             self.module_path, exc)
        return self.lib

    def attach(self, label: str, pin: str) -> _OpenToken:
        pin_digest = hashlib.sha256(pin.encode("utf-8")).digest()
        shared = self.tokens.get(label)
        if shared is not None:
            if shared.pin_digest is not None and not hmac.compare_digest(
                shared.pin_digest, pin_digest
            ):
                raise HsmError(_pin_rejected_message(label))
            shared.users += 1
            return shared
        lib = self.load()
        try:
            for attempt in Retrying(
                retry=retry_if_exception_type(_DISCOVERY_RETRYABLE),
                stop=stop_after_attempt(_DISCOVERY_ATTEMPTS),
                wait=wait_random_exponential(multiplier=0.05, max=1.0),
                reraise=True,
            ):
                with attempt:
                    opened = self._open_session(lib, label, pin, pin_digest)
        except _PIN_REJECTED:
            raise HsmError(_pin_rejected_message(label)) from None
        except p11_errors.NoSuchToken:
            hint = (
                " (SoftHSM lists tokens only when the module is initialised; this process has "
                f"other tokens open: {sorted(self.tokens)}; close them and open again)"
                if self.tokens
                else ""
            )
            raise HsmError(
                f"no token labelled {label!r} in PKCS#11 module {self.module_path}; check the "
                f"token label and SOFTHSM2_CONF{hint}"
            ) from None
        except p11_errors.PKCS11Error as exc:
            raise HsmError(
                f"cannot open token {label!r} in PKCS#11 module {self.module_path}: "
                f"{_describe(exc)}"
            ) from None
        opened.users = 1
        self.tokens[label] = opened
        return opened

    def _open_session(self, lib: Any, label: str, pin: str, pin_digest: bytes) -> _OpenToken:
        try:
            token = lib.get_token(token_label=label)
        except p11_errors.NoSuchToken:
            if not self.tokens:
                # Let a token created since C_Initialize show up on the next attempt.
                lib.reinitialize()
            raise
        try:
            session = token.open(rw=True, user_pin=pin)
        except p11_errors.UserAlreadyLoggedIn:
            # Login is token-wide per process: code outside this runtime logged in already.
            return _OpenToken(label, token.open(rw=True), pin_digest=None)
        return _OpenToken(label, session, pin_digest=pin_digest, pin=pin)

    def reindex_due(self) -> bool:
        return self.reindex_on_missing and time.monotonic() - self.last_reindex > 1.0

    def reopen_due(self) -> bool:
        """Whether a lost session may be opened again now: at most once a second, and only
        when this runtime logged in itself (it holds the PIN to log in again)."""
        return (time.monotonic() - self.last_reindex > 1.0
                and all(opened.pin is not None for opened in self.tokens.values()))

    def reindex(self) -> None:
        """Re-initialise the module so it re-reads every token, then reopen each session
        (logging in again with the PIN it was opened with). At most once a second."""
        self.last_reindex = time.monotonic()
        _log.info("re-reading HSM token objects and opening the sessions again")
        for opened in self.tokens.values():
            opened.private_keys.clear()
            with contextlib.suppress(p11_errors.PKCS11Error):
                opened.session.close()
        self.lib.reinitialize()
        for opened in self.tokens.values():
            token = self.lib.get_token(token_label=opened.label)
            opened.session = (token.open(rw=True, user_pin=opened.pin) if opened.pin is not None
                              else token.open(rw=True))

    def detach(self, opened: _OpenToken) -> None:
        opened.users -= 1
        if opened.users > 0:
            return
        self.tokens.pop(opened.label, None)
        opened.private_keys.clear()
        try:
            opened.session.close()  # also logs out when this session logged in
        except p11_errors.PKCS11Error as exc:
            _log.warning("closing the session to token %r failed: %s", opened.label, exc)

    def finalize(self) -> None:
        """Called last on the worker thread when no adapter is left."""
        for opened in list(self.tokens.values()):
            opened.users = 1
            self.detach(opened)
        if self.lib is not None:
            try:
                self.lib.finalize()
            except p11_errors.PKCS11Error as exc:
                _log.warning("C_Finalize failed for %s: %s", self.module_path, exc)
            self.lib = None


_RUNTIMES: dict[str, _Runtime] = {}
_RUNTIMES_LOCK = threading.Lock()
_INITIALISED_IN: dict[str, int] = {}  # module path -> pid that last ran C_Initialize
_LAST_FINALIZE: dict[str, Future[None]] = {}  # module path -> the last runtime's C_Finalize


def _forget_runtimes_after_fork() -> None:
    # The worker threads do not exist in a forked child; the child starts its own runtime.
    # A lock another thread held at fork time stays held forever in the child: replace it.
    global _RUNTIMES_LOCK  # noqa: PLW0603
    _RUNTIMES_LOCK = threading.Lock()
    _RUNTIMES.clear()
    _LAST_FINALIZE.clear()


os.register_at_fork(after_in_child=_forget_runtimes_after_fork)


def _acquire_runtime(module_path: str) -> _Runtime:
    with _RUNTIMES_LOCK:
        runtime = _RUNTIMES.get(module_path)
        if runtime is None:
            runtime = _Runtime(module_path)
            _RUNTIMES[module_path] = runtime
        runtime.users += 1
        return runtime


def _release_runtime(runtime: _Runtime) -> Future[None] | None:
    """Drop one user; when none is left, finalise the module and stop the thread."""
    with _RUNTIMES_LOCK:
        runtime.users -= 1
        if runtime.users > 0:
            return None
        if _RUNTIMES.get(runtime.module_path) is runtime:
            del _RUNTIMES[runtime.module_path]
        last = runtime.submit(runtime.finalize)
        _LAST_FINALIZE[runtime.module_path] = last
        runtime.executor.shutdown(wait=False)
        return last


def _pin_rejected_message(label: str) -> str:
    return (
        f"token {label!r} rejected the user PIN; check the PIN file or variable this signer "
        "was given"
    )


def _describe(exc: BaseException) -> str:
    """Name a PKCS#11 failure without echoing arguments (python-pkcs11 messages never hold the
    PIN, but keep it to the error class and its own text)."""
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


# --------------------------------------------------------------------------------------------
# The adapter


@dataclass
class _SignQueue:
    """Single-signature requests of one event loop waiting for the HSM thread; ``busy`` while
    a group is there (only touched on that loop)."""

    items: list[tuple[bytes, Algorithm, bytes, asyncio.Future[bytes]]] = field(
        default_factory=list)
    busy: bool = False


class Pkcs11Hsm:
    """``kms.ports.Hsm`` over one token of a PKCS#11 module.

    Open with ``await Pkcs11Hsm.open(...)`` (or ``open_blocking`` outside an event loop) and
    close with ``await close()``. Safe to use from many tasks, threads and event loops at once.
    """

    def __init__(
        self,
        runtime: _Runtime,
        opened: _OpenToken,
        *,
        id_source: Callable[[int], bytes],
        inline: bool = False,
    ) -> None:
        """Use ``open`` or ``open_blocking``."""
        self._runtime = runtime
        self._opened = opened
        self._id_source = id_source
        self.inline = inline
        self._closed = False
        self._close_lock = threading.Lock()
        # Single signatures waiting for the HSM thread, per event loop (see sign_digest).
        self._sign_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _SignQueue] = (
            weakref.WeakKeyDictionary())
        self._queues_lock = threading.Lock()
        # Keys refused by the signing-key attribute policy, by CKA_ID (see _private_key).
        self._refused: dict[bytes, FailedPrecondition] = {}

    # ---- opening and closing

    @classmethod
    async def open(
        cls,
        module_path: str,
        token_label: str,
        pin: str,
        *,
        id_source: Callable[[int], bytes] = os.urandom,
        signing: str = "auto",
    ) -> Pkcs11Hsm:
        """Find the token labelled ``token_label`` (retrying transient failures with backoff)
        and log in with ``pin``. ``signing`` is "auto", "inline" or "thread" (see the module
        docstring). Raises ``HsmError`` if the module cannot be loaded, the token is not there,
        or the PIN is rejected (the message never contains the PIN); ``InvalidArgument`` for
        an unknown signing mode."""
        inline = inline_signing(signing, module_path)
        runtime = _acquire_runtime(module_path)
        try:
            opened = await asyncio.wrap_future(
                runtime.submit(lambda: runtime.attach(token_label, pin))
            )
        except BaseException:
            await _await_release(runtime)
            raise
        return cls(runtime, opened, id_source=id_source, inline=inline)

    @classmethod
    def open_blocking(
        cls,
        module_path: str,
        token_label: str,
        pin: str,
        *,
        id_source: Callable[[int], bytes] = os.urandom,
        signing: str = "auto",
    ) -> Pkcs11Hsm:
        """``open`` for callers without an event loop (CLI, fixtures). Same errors."""
        inline = inline_signing(signing, module_path)
        runtime = _acquire_runtime(module_path)
        try:
            opened = runtime.submit(lambda: runtime.attach(token_label, pin)).result()
        except BaseException:
            last = _release_runtime(runtime)
            if last is not None:
                last.result()
            raise
        return cls(runtime, opened, id_source=id_source, inline=inline)

    async def close(self) -> None:
        """Close this adapter's use of the session; the last adapter of the process logs out,
        finalises the module and stops the worker thread. Closing twice is harmless."""
        if not self._begin_close():
            return
        await asyncio.wrap_future(self._runtime.submit(lambda: self._runtime.detach(self._opened)))
        await _await_release(self._runtime)

    def close_blocking(self) -> None:
        """``close`` for callers without an event loop."""
        if not self._begin_close():
            return
        self._runtime.submit(lambda: self._runtime.detach(self._opened)).result()
        last = _release_runtime(self._runtime)
        if last is not None:
            last.result()

    def _begin_close(self) -> bool:
        with self._close_lock:
            if self._closed:
                return False
            self._closed = True
            return True

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"Pkcs11Hsm(module={self._runtime.module_path!r}, "
            f"token={self._opened.label!r}, {state})"
        )

    @property
    def token_label(self) -> str:
        return self._opened.label

    # ---- the Hsm port

    async def generate_key_pair(
        self, *, label: str, algorithm: Algorithm, extractable: bool
    ) -> GeneratedKeyPair:
        """Generate a token key pair; see ``kms.ports.Hsm``. Raises ``HsmError``."""
        hsm_id = self._id_source(HSM_ID_SIZE)
        if len(hsm_id) != HSM_ID_SIZE:
            raise InvalidArgument(f"id_source returned {len(hsm_id)} bytes, not {HSM_ID_SIZE}")
        return await self._call(lambda: self._generate(label, algorithm, extractable, hsm_id))

    async def sign_digest(self, hsm_id: bytes, algorithm: Algorithm, digest: bytes) -> bytes:
        """Sign a precomputed digest; see ``kms.ports.Hsm``. Raises ``InvalidArgument`` for a
        digest of the wrong size or a key of another algorithm, ``NotFound``, ``HsmError``.

        Concurrent calls on one event loop are coalesced: while the HSM thread signs one group,
        new requests queue, and the next group goes over in one hand-off with one wake-up of
        the loop (the hand-off, not C_Sign, dominated the cost of a single signature).
        """
        check_digest(algorithm, digest)
        if self._closed:
            raise self._closed_error()
        loop = asyncio.get_running_loop()
        with self._queues_lock:
            queue = self._sign_queues.get(loop)
            if queue is None:
                queue = self._sign_queues[loop] = _SignQueue()
        future: asyncio.Future[bytes] = loop.create_future()
        queue.items.append((hsm_id, algorithm, digest, future))
        if not queue.busy:
            queue.busy = True
            loop.call_soon(self._flush_signs, loop, queue)
        return await future

    def _flush_signs(self, loop: asyncio.AbstractEventLoop, queue: _SignQueue) -> None:
        """On the loop: send every queued single signature to the HSM thread as one group;
        when it comes back, resolve the callers and send the next group, or go idle. Inline,
        sign a slice of the queue here instead and come back after the loop's other work."""
        if self.inline and queue.items and not self._closed and self._runtime.lock.acquire(
                blocking=False):
            try:
                signed = self._sign_slice_inline(queue.items)
            finally:
                self._runtime.lock.release()
            done, queue.items = queue.items[:len(signed)], queue.items[len(signed):]
            _resolve(done, signed)
            loop.call_soon(self._flush_signs, loop, queue)
            return
        items, queue.items = queue.items, []
        if not items:
            queue.busy = False
            return

        def deliver(outcomes: list[bytes | Exception]) -> None:
            _resolve(items, outcomes)
            self._flush_signs(loop, queue)

        def work() -> list[bytes | Exception]:
            return [self._sign_guarded(h, a, d) for h, a, d, _ in items]

        def handed_back(done: Future[list[bytes | Exception]]) -> None:
            # Runs once the thread has left the module and released its lock, so the next
            # group may go inline at once.
            try:
                outcomes = done.result()
            except BaseException:  # cancelled by an executor shutting down
                outcomes = [self._closed_error()] * len(items)
            with contextlib.suppress(RuntimeError):  # the loop was closed meanwhile
                loop.call_soon_threadsafe(deliver, outcomes)

        try:
            self._runtime.submit(work).add_done_callback(handed_back)
        except RuntimeError:  # executor shut down underneath us
            deliver([self._closed_error()] * len(items))

    def _closed_error(self) -> HsmError:
        return HsmError(f"the HSM adapter for token {self._opened.label!r} is closed")

    def _sign_slice_inline(
        self, items: list[tuple[bytes, Algorithm, bytes, asyncio.Future[bytes]]]
    ) -> list[bytes | Exception]:
        """Sign queued items from the front for about ``INLINE_SLICE_SECONDS`` (at least one),
        holding the runtime's lock; cancelled callers are skipped."""
        deadline = time.perf_counter() + INLINE_SLICE_SECONDS
        outcomes: list[bytes | Exception] = []
        for hsm_id, algorithm, digest, future in items:
            if outcomes and time.perf_counter() > deadline:
                break
            outcomes.append(_CANCELLED if future.done()
                            else self._sign_guarded(hsm_id, algorithm, digest))
        return outcomes

    def _sign_guarded(
        self, hsm_id: bytes, algorithm: Algorithm, digest: bytes
    ) -> bytes | Exception:
        """One signature of a coalesced group; a failure is returned, translated, for its
        caller alone."""
        try:
            return self._reindexed(lambda: self._sign_one(hsm_id, algorithm, digest))
        except p11_errors.PKCS11Error as exc:
            return self._translate(exc)
        except Exception as exc:  # handed to the one caller it belongs to
            return exc

    async def sign_digests(
        self, hsm_id: bytes, algorithm: Algorithm, digests: Sequence[bytes]
    ) -> list[bytes | Exception]:
        """Sign every digest with one key in one hand-off to the HSM thread, in order. A digest
        that fails carries its error (``InvalidArgument``, ``HsmError``) in its place. Errors
        about the key itself (``NotFound``, wrong algorithm) raise for the whole batch."""
        items = list(digests)
        if self.inline:
            return await self._sign_many_inline(hsm_id, algorithm, items)
        return await self._call(lambda: self._sign_many(hsm_id, algorithm, items))

    async def _sign_many_inline(
        self, hsm_id: bytes, algorithm: Algorithm, items: list[bytes]
    ) -> list[bytes | Exception]:
        """``sign_digests`` on this event loop, in slices of about ``INLINE_SLICE_SECONDS``
        with the loop's other work between them; whatever is left when the HSM thread holds
        the module (a key generation) goes to that thread."""
        results: list[bytes | Exception] = []
        size = 8  # digests per slice, adjusted to the measured time per signature
        while len(results) < len(items):
            if self._closed:
                raise self._closed_error()
            rest = items[len(results):]
            if not self._runtime.lock.acquire(blocking=False):
                results += await self._call(
                    functools.partial(self._sign_many, hsm_id, algorithm, rest))
                break
            started = time.perf_counter()
            try:
                part = rest[:size]
                results += self._guarded(
                    functools.partial(self._sign_many, hsm_id, algorithm, part))
            finally:
                self._runtime.lock.release()
            per_signature = (time.perf_counter() - started) / len(part)
            size = max(1, min(len(items), int(INLINE_SLICE_SECONDS / max(per_signature, 1e-6))))
            if len(results) < len(items):
                await asyncio.sleep(0)  # let the loop serve everything else for a moment
        return results

    async def public_key(self, hsm_id: bytes) -> bytes:
        """The DER SubjectPublicKeyInfo of the key pair. Raises ``NotFound``, ``HsmError``."""
        return await self._call(lambda: self._public_key(hsm_id))

    async def destroy_key_pair(self, hsm_id: bytes) -> None:
        """Delete every object with this CKA_ID; a missing key is not an error.
        Raises ``HsmError``."""
        await self._call(lambda: self._destroy(hsm_id))

    # ---- beyond the port

    async def key_attributes(self, hsm_id: bytes) -> dict[str, bool]:
        """The protection attributes of the private key: ``sensitive``, ``extractable``,
        ``sign``, ``decrypt``, ``unwrap``, ``local``, ``always_sensitive``,
        ``never_extractable``, ``token``, ``private``. Raises ``NotFound``, ``HsmError``."""
        return await self._call(lambda: self._key_attributes(hsm_id))

    async def run_with_session(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(session)`` on the HSM thread with this token's logged-in python-pkcs11
        session. For other PKCS#11 code in ``kms.hsm`` (key transport) and tests; ``fn`` must
        not keep the session. PKCS#11 errors come back translated (``NotFound``,
        ``HsmError``)."""
        return await self._call(lambda: fn(self._opened.session))

    # ---- worker-thread side

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise self._closed_error()

        try:
            future = self._runtime.submit(lambda: self._guarded(fn))
        except RuntimeError:  # executor shut down underneath us
            raise self._closed_error() from None
        return await asyncio.wrap_future(future)

    def _guarded(self, fn: Callable[[], T]) -> T:
        """``fn()`` re-indexed once if its key is missing, PKCS#11 errors translated. Only
        with the runtime's lock held."""
        try:
            return self._reindexed(fn)
        except p11_errors.PKCS11Error as exc:
            raise self._translate(exc) from None

    def _reindexed(self, fn: Callable[[], T]) -> T:
        """``fn()``; if it finds no key and the module may have missed one another process
        created, re-read the token once and try again (on the worker thread)."""
        try:
            return fn()
        except _KEY_MISSING:
            if not self._runtime.reindex_due():
                raise
            self._runtime.reindex()
            return fn()
        except _SESSION_LOST as lost:
            if not self._runtime.reopen_due():
                raise
            # The module dropped the session (a token reset, an HSM failover, SoftHSM after
            # its files changed): open it and log in again, then try once more.
            _log.warning("the session to HSM token %r was lost (%s); opening it again",
                         self._opened.label, type(lost).__name__)
            self._runtime.reindex()
            return fn()

    def _translate(self, exc: p11_errors.PKCS11Error) -> Exception:
        label = self._opened.label
        if isinstance(exc, _KEY_MISSING):
            return NotFound(f"no such key in HSM token {label!r}")
        if isinstance(exc, _SESSION_LOST):
            return HsmError(
                f"the session to HSM token {label!r} was lost and opening it again failed "
                "(retried at most once a second); check the HSM and its PIN")
        return HsmError(f"HSM token {label!r} failed: {_describe(exc)}")

    def _generate(
        self, label: str, algorithm: Algorithm, extractable: bool, hsm_id: bytes
    ) -> GeneratedKeyPair:
        session = self._opened.session
        if list(session.get_objects({Attribute.ID: hsm_id})):
            raise HsmError(
                f"HSM token {self._opened.label!r} already holds an object with id "
                f"{hsm_id.hex()}; id_source is not random"
            )
        public_template: dict[Attribute, Any] = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: False,
            Attribute.VERIFY: True,
            Attribute.ENCRYPT: False,
            Attribute.WRAP: False,
        }
        private_template: dict[Attribute, Any] = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.SIGN: True,
            Attribute.DECRYPT: False,
            Attribute.UNWRAP: False,
            Attribute.DERIVE: False,
            Attribute.EXTRACTABLE: extractable,
        }
        key_type = _KEY_TYPES[algorithm]
        key_length: int | None = None
        if algorithm is Algorithm.ECDSA_P256_SHA256:
            mechanism = Mechanism.EC_KEY_PAIR_GEN
            public_template[Attribute.EC_PARAMS] = EC_PARAMS_P256
        elif algorithm is Algorithm.ED25519:
            mechanism = Mechanism.EC_EDWARDS_KEY_PAIR_GEN
            public_template[Attribute.EC_PARAMS] = EC_PARAMS_ED25519
        else:
            mechanism = Mechanism.RSA_PKCS_KEY_PAIR_GEN
            key_length = RSA_MODULUS_BITS
        public, private = session.generate_keypair(
            key_type,
            key_length,
            id=hsm_id,
            label=label,
            store=True,
            mechanism=mechanism,
            public_template=public_template,
            private_template=private_template,
        )
        self._opened.private_keys[hsm_id] = self._signing_key(hsm_id, private, key_type)
        return GeneratedKeyPair(hsm_id=hsm_id, public_key_der=_public_key_der(public, key_type))

    def _signing_key(self, hsm_id: bytes, private: Any, key_type: KeyType) -> _SigningKey:
        """A session copy of ``private`` when the module gains by it (``session_copies``),
        else ``private`` itself. The copy is a session object inside the token (I1 holds):
        sensitive like its original, under another CKA_ID so that no lookup by the key's id
        finds it, and gone when the session closes; ``_private_key`` replaces it after
        ``SESSION_COPY_MAX_AGE`` and ``_forget`` destroys it."""
        if self._runtime.session_copies:
            try:
                copy = private.copy({Attribute.TOKEN: False,
                                     Attribute.ID: SESSION_COPY_ID_PREFIX + hsm_id})
            except p11_errors.PKCS11Error as exc:
                _log.debug("signing with the token object of %s: copy refused (%s)",
                           hsm_id.hex(), _describe(exc))
            else:
                with contextlib.suppress(p11_errors.PKCS11Error):
                    copy[Attribute.EXTRACTABLE] = False  # never needed to sign
                return _SigningKey(copy, key_type, time.monotonic())
        return _SigningKey(private, key_type)

    def _forget(self, hsm_id: bytes) -> None:
        """Drop the cached signing key of ``hsm_id``, destroying its session copy."""
        cached = self._opened.private_keys.pop(hsm_id, None)
        if cached is not None and cached.copied_at is not None:
            with contextlib.suppress(p11_errors.PKCS11Error):
                cached.key.destroy()

    def _private_key(self, hsm_id: bytes, algorithm: Algorithm) -> Any:
        cached = self._opened.private_keys.get(hsm_id)
        if (cached is not None and cached.copied_at is not None
                and time.monotonic() - cached.copied_at > SESSION_COPY_MAX_AGE):
            # Copy again from the token object: one destroyed elsewhere is noticed here.
            self._forget(hsm_id)
            cached = None
        if cached is None:
            refused = self._refused.get(hsm_id)
            if refused is not None:
                raise refused
            private = self._opened.session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=hsm_id)
            # Checked once per handle: a key whose attributes break the policy never signs.
            broken = signing_key_violations(_read_attributes(private))
            if broken:
                refused = self._refused[hsm_id] = FailedPrecondition(
                    f"HSM key {hsm_id.hex()} in token {self._opened.label!r} breaks the "
                    f"signing-key attribute policy ({'; '.join(broken)}); Signet refuses to "
                    "sign with it (docs/adr/0012)")
                raise refused
            cached = self._signing_key(hsm_id, private, private.key_type)
            self._opened.private_keys[hsm_id] = cached
        private, key_type = cached.key, cached.key_type
        if key_type != _KEY_TYPES[algorithm]:
            raise InvalidArgument(
                f"HSM key {hsm_id.hex()} is a {getattr(key_type, 'name', key_type)} key and "
                f"cannot sign as {algorithm.value}"
            )
        return private

    def _sign_one(self, hsm_id: bytes, algorithm: Algorithm, digest: bytes) -> bytes:
        private = self._private_key(hsm_id, algorithm)
        try:
            return _sign_with(private, algorithm, digest, self._runtime.direct)
        except _KEY_MISSING:
            # Destroyed by another process since we looked it up.
            self._forget(hsm_id)
            raise

    def _sign_many(
        self, hsm_id: bytes, algorithm: Algorithm, digests: list[bytes]
    ) -> list[bytes | Exception]:
        """Every well-sized digest in one ``DirectSigner.sign_all`` when the module allows
        it; a digest refused there, or any digest without it, signs alone through
        python-pkcs11 (``_sign_with``), which gives the precise error."""
        private = self._private_key(hsm_id, algorithm)
        direct = self._runtime.direct
        mechanism = _DIRECT_MECHANISMS.get(algorithm)
        allowed = _ALLOWED_DIGEST_SIZES[algorithm]
        raws = iter(direct.sign_all(private.session.handle, private.handle, mechanism,
                                    [digest for digest in digests if len(digest) in allowed])
                    if direct is not None and mechanism is not None else ())
        ecdsa = algorithm is Algorithm.ECDSA_P256_SHA256
        results: list[bytes | Exception] = []
        for digest in digests:
            try:
                if len(digest) not in allowed:
                    check_digest(algorithm, digest)  # raises the precise InvalidArgument
                raw = next(raws, None)
                if raw is None:
                    results.append(_sign_with(private, algorithm, digest))
                else:
                    results.append(ecdsa_raw_to_der(raw) if ecdsa else raw)
            except _KEY_MISSING:
                self._forget(hsm_id)
                raise
            except p11_errors.PKCS11Error as exc:
                results.append(self._translate(exc))
            except (InvalidArgument, HsmError) as exc:
                results.append(exc)
        return results

    def _public_key(self, hsm_id: bytes) -> bytes:
        public = self._opened.session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=hsm_id)
        return _public_key_der(public, public.key_type)

    def _destroy(self, hsm_id: bytes) -> None:
        self._forget(hsm_id)
        for obj in list(self._opened.session.get_objects({Attribute.ID: hsm_id})):
            with contextlib.suppress(*_KEY_MISSING):
                obj.destroy()

    def _key_attributes(self, hsm_id: bytes) -> dict[str, bool]:
        private = self._opened.session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=hsm_id)
        return _read_attributes(private)


_ATTRIBUTE_NAMES = {
    Attribute.SENSITIVE: "sensitive",
    Attribute.EXTRACTABLE: "extractable",
    Attribute.SIGN: "sign",
    Attribute.DECRYPT: "decrypt",
    Attribute.UNWRAP: "unwrap",
    Attribute.LOCAL: "local",
    Attribute.ALWAYS_SENSITIVE: "always_sensitive",
    Attribute.NEVER_EXTRACTABLE: "never_extractable",
    Attribute.TOKEN: "token",
    Attribute.PRIVATE: "private",
}


def _read_attributes(private: Any) -> dict[str, bool]:
    values = private.get_attributes(list(_ATTRIBUTE_NAMES))
    return {name: bool(values[attribute]) for attribute, name in _ATTRIBUTE_NAMES.items()}


def signing_key_violations(attributes: dict[str, bool]) -> list[str]:
    """What makes a private key unfit to sign for Signet (docs/adr/0012), one phrase per
    broken attribute; empty when it is fit. A signing key is a private token object, sensitive
    (CKA_VALUE is never readable), allowed to sign and to do nothing else with its secret.
    Extractable keys are allowed only because multi-region originals must be wrapped for
    transport, and then they must be sensitive too, so only wrapping can move them."""
    expected = {"sensitive": True, "sign": True, "private": True, "token": True,
                "decrypt": False, "unwrap": False}
    return [f"CKA_{name.upper()} is {str(attributes.get(name)).upper()}, must be "
            f"{str(want).upper()}" for name, want in expected.items()
            if attributes.get(name) is not want]


_CANCELLED = HsmError("not signed: the caller gave up")


def _resolve(items: Sequence[tuple[bytes, Algorithm, bytes, asyncio.Future[bytes]]],
             outcomes: Sequence[bytes | Exception]) -> None:
    for (_, _, _, future), outcome in zip(items, outcomes, strict=True):
        if future.done():  # the caller was cancelled meanwhile
            continue
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


async def _await_release(runtime: _Runtime) -> None:
    last = _release_runtime(runtime)
    if last is not None:
        await asyncio.wrap_future(last)


def _sign_with(private: Any, algorithm: Algorithm, digest: bytes,
               direct: DirectSigner | None = None) -> bytes:
    """Sign through ``direct`` when it can (kms.hsm.direct); otherwise, or when the module
    refuses there, through python-pkcs11, which raises the precise error."""
    if algorithm is Algorithm.ECDSA_P256_SHA256:
        # SoftHSM 2.6.1 has no CKM_ECDSA_SHA256: CKM_ECDSA signs the digest as given.
        raw = (None if direct is None
               else direct.sign(private.session.handle, private.handle, CKM_ECDSA, digest))
        if raw is None:
            raw = private.sign(digest, mechanism=Mechanism.ECDSA)
        return ecdsa_raw_to_der(raw)
    if algorithm is Algorithm.ED25519:
        signature = (None if direct is None
                     else direct.sign(private.session.handle, private.handle, CKM_EDDSA, digest))
        if signature is None:
            signature = private.sign(digest, mechanism=Mechanism.EDDSA)
        return signature
    signature = private.sign(
        digest,
        mechanism=Mechanism.RSA_PKCS_PSS,
        mechanism_param=(Mechanism.SHA256, MGF.SHA256, PSS_SALT_LENGTH),
    )
    return bytes(signature)


def _public_key_der(public: Any, key_type: KeyType) -> bytes:
    if key_type == KeyType.EC:
        if public[Attribute.EC_PARAMS] != EC_PARAMS_P256:
            raise HsmError("HSM EC key is not on P-256, which is the only EC curve Signet uses")
        return spki_from_p256_point(ec_point_bytes(public[Attribute.EC_POINT], 65))
    if key_type == KeyType.EC_EDWARDS:
        return spki_from_ed25519_point(ec_point_bytes(public[Attribute.EC_POINT], 32))
    if key_type == KeyType.RSA:
        return spki_from_rsa(public[Attribute.MODULUS], public[Attribute.PUBLIC_EXPONENT])
    raise HsmError(
        f"HSM key has type {getattr(key_type, 'name', key_type)}, which Signet does not use"
    )
