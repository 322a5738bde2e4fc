"""One ``C_SignInit`` + ``C_Sign`` through the module's own function list (ctypes).

python-pkcs11 asks ``C_Sign`` for the output size first and then signs: two ``C_Sign`` calls per
signature. SoftHSM re-reads a token object's generation file (open, fcntl locks, read, close) on
every call that touches it, so for a token key the size query costs almost as much as the
signature. Measured on the 2-core development machine, ECDSA P-256, one thread: python-pkcs11
86-88 µs of CPU per signature with a token key (49-52 µs with a session key); this path 61-63 µs
(docs/adr/0013).

Only mechanisms without parameters go this way (``CKM_ECDSA``, ``CKM_EDDSA``); RSA-PSS, at
≈1.5 ms per signature, keeps python-pkcs11. Any return value other than ``CKR_OK`` gives
``None``: the caller signs again through python-pkcs11, which raises the precise exception
(``C_Sign`` ends the operation on every error but ``CKR_BUFFER_TOO_SMALL``, which a 512-byte
buffer never meets for these mechanisms, and which is answered with a larger buffer: nothing is
left half-done).

Callers hold the runtime's lock (``kms.hsm.pkcs11``): the module runs without its own locks.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

CKM_ECDSA = 0x1041
CKM_EDDSA = 0x1057

_CK_ULONG = ctypes.c_ulong
# Positions in CK_FUNCTION_LIST after its CK_VERSION (PKCS#11 v2.40 §5.13; a v3.0 module's
# C_GetFunctionList returns this same v2.x-layout list).
_C_SIGN_INIT = 42
_C_SIGN = 43
_OUTPUT_SIZE = 512
_CKR_BUFFER_TOO_SMALL = 0x150


class _Mechanism(ctypes.Structure):
    _fields_ = [("mechanism", _CK_ULONG), ("parameter", ctypes.c_void_p),
                ("parameter_len", _CK_ULONG)]


_SignInit = ctypes.CFUNCTYPE(_CK_ULONG, _CK_ULONG, ctypes.POINTER(_Mechanism), _CK_ULONG)
_Sign = ctypes.CFUNCTYPE(_CK_ULONG, _CK_ULONG, ctypes.c_char_p, _CK_ULONG, ctypes.c_char_p,
                         ctypes.POINTER(_CK_ULONG))


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class _FunctionListHead(ctypes.Structure):
    """CK_FUNCTION_LIST up to C_Sign: the version, then one pointer per function."""

    _fields_ = [("version", _Version), ("functions", ctypes.c_void_p * (_C_SIGN + 1))]


class DirectSigner:
    """Signs with parameterless mechanisms through one module's function list. Not
    thread-safe on its own: one instance per module, used under the runtime's lock."""

    def __init__(self, module_path: str) -> None:
        """Raises ``OSError`` if the module cannot be loaded or ``C_GetFunctionList`` fails;
        the caller then keeps python-pkcs11 for everything."""
        # The same path python-pkcs11 loaded: dlopen returns that instance, initialised.
        module = ctypes.CDLL(module_path)
        pointer = ctypes.POINTER(_FunctionListHead)()
        rv = module.C_GetFunctionList(ctypes.byref(pointer))
        if rv != 0 or not pointer:
            raise OSError(f"C_GetFunctionList of {module_path} returned {rv:#x}")
        head = pointer.contents
        if head.version.major not in (2, 3):
            raise OSError(f"{module_path} has PKCS#11 function list version "
                          f"{head.version.major}.{head.version.minor}")
        self._module = module  # keeps the library loaded while the pointers are in use
        self._sign_init = _SignInit(head.functions[_C_SIGN_INIT])
        self._sign = _Sign(head.functions[_C_SIGN])
        self._mechanisms = {m: _Mechanism(m, None, 0) for m in (CKM_ECDSA, CKM_EDDSA)}
        self._output = ctypes.create_string_buffer(_OUTPUT_SIZE)
        self._length = _CK_ULONG()

    def sign(self, session: int, key: int, mechanism: int, data: bytes) -> bytes | None:
        """The signature, or None when the module refused (sign again another way to learn
        why). ``mechanism`` is ``CKM_ECDSA`` or ``CKM_EDDSA``."""
        if self._sign_init(session, ctypes.byref(self._mechanisms[mechanism]), key) != 0:
            return None
        self._length.value = _OUTPUT_SIZE
        rv = self._sign(session, data, len(data), self._output, ctypes.byref(self._length))
        if rv == _CKR_BUFFER_TOO_SMALL:  # the operation is still active: finish it
            output = ctypes.create_string_buffer(self._length.value)
            rv = self._sign(session, data, len(data), output, ctypes.byref(self._length))
            return output.raw[:self._length.value] if rv == 0 else None
        if rv != 0:
            return None
        return self._output.raw[:self._length.value]

    def sign_all(self, session: int, key: int, mechanism: int,
                 digests: Sequence[bytes]) -> list[bytes | None]:
        """``sign`` for each digest in order, with the per-call lookups done once: in a
        ``SignBatch`` this loop is the whole time the worker spends per signature outside
        the module."""
        sign_init, sign, output = self._sign_init, self._sign, self._output
        mechanism_ref = ctypes.byref(self._mechanisms[mechanism])
        length = self._length
        length_ref = ctypes.byref(length)
        results: list[bytes | None] = []
        append = results.append
        for data in digests:
            if sign_init(session, mechanism_ref, key) != 0:
                append(None)
                continue
            length.value = _OUTPUT_SIZE
            rv = sign(session, data, len(data), output, length_ref)
            if rv == 0:
                append(output.raw[:length.value])
            elif rv == _CKR_BUFFER_TOO_SMALL:  # finish the operation the slow way
                bigger = ctypes.create_string_buffer(length.value)
                rv = sign(session, data, len(data), bigger, length_ref)
                append(bigger.raw[:length.value] if rv == 0 else None)
            else:
                append(None)
        return results
