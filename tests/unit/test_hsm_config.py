"""The ``hsm:`` section of the signer's config: where signatures are made (docs/adr/0013)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kms.errors import InvalidArgument
from signer.config import ServerConfig

BASE: dict[str, Any] = {
    "region": "r1", "listen": "127.0.0.1:7443", "insecure": True,
    "etcd": {"endpoints": ["127.0.0.1:2379"]},
    "trust": {"http_listen": "127.0.0.1:8443"},
}


def config(**hsm: Any) -> ServerConfig:
    return ServerConfig.from_dict({**BASE, "hsm": {"token_label": "t", "pin_env": "PIN", **hsm}},
                                  base=Path("/etc/signet"))


def test_signing_mode_defaults_to_auto_and_takes_the_documented_modes() -> None:
    assert config().hsm.signing == "auto"
    for mode in ("auto", "inline", "thread"):
        assert config(signing=mode).hsm.signing == mode


def test_an_unknown_signing_mode_is_refused_with_the_choices() -> None:
    with pytest.raises(InvalidArgument, match=r"hsm\.signing must be one of auto, inline, thread"):
        config(signing="fast")
