"""RFC 7512 URIs for custodian keys in PKCS#11 tokens: the subset Signet parses, and what it
refuses (PINs on the command line above all)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kms.errors import InvalidArgument
from signer.custodian_keys import Pkcs11KeyUri, is_pkcs11_uri


def test_a_full_uri_is_parsed() -> None:
    uri = Pkcs11KeyUri.parse("pkcs11:token=My%20Token;object=approvals;type=private"
                             "?module-path=/usr/lib/softhsm/libsofthsm2.so"
                             "&pin-source=file:/home/c/.pin")
    assert uri == Pkcs11KeyUri("My Token", "approvals", None,
                               "/usr/lib/softhsm/libsofthsm2.so", Path("/home/c/.pin"))
    assert uri.describe() == "pkcs11:token=My Token;object=approvals"


def test_an_id_may_name_the_key_and_file_urls_work() -> None:
    uri = Pkcs11KeyUri.parse("pkcs11:token=t;id=%01%a2?pin-source=file:///run/pin")
    assert uri.object_id == b"\x01\xa2"
    assert uri.object_label is None
    assert uri.module_path is None
    assert uri.pin_file == Path("/run/pin")


@pytest.mark.parametrize(("text", "says"), [
    ("pkcs11:token=t;object=o?pin-value=1234", "pin-source=file:"),
    ("pkcs11:token=t;object=o;pin-value=1234", "not supported"),
    ("pkcs11:object=o?pin-source=file:/p", "token="),
    ("pkcs11:token=t?pin-source=file:/p", "object="),
    ("pkcs11:token=t;object=o", "pin-source"),
    ("pkcs11:token=t;object=o;type=public?pin-source=file:/p", "type=private"),
    ("pkcs11:token=t;token=u;object=o?pin-source=file:/p", "repeated"),
    ("pkcs11:token=t;object=o?pin-source=file:/p&slot=1", "not supported"),
    ("file:/key.pem", "pkcs11:"),
])
def test_what_is_refused(text: str, says: str) -> None:
    with pytest.raises(InvalidArgument, match=says):
        Pkcs11KeyUri.parse(text)


def test_only_pkcs11_uris_are_uris() -> None:
    assert is_pkcs11_uri("pkcs11:token=t")
    assert not is_pkcs11_uri("custodian-1.pem")
