"""The ``hsm:`` section of the signer's config: where signatures are made (docs/adr/0013)."""

from __future__ import annotations

from typing import Any

import pytest

from kms.errors import InvalidArgument
from signer.config import ServerConfig
from tests.unit.config_helpers import server_config


def config(**hsm: Any) -> ServerConfig:
    return server_config(hsm={"token_label": "t", "pin_env": "PIN", **hsm})


def test_signing_mode_defaults_to_auto_and_takes_the_documented_modes() -> None:
    assert config().hsm.signing == "auto"
    for mode in ("auto", "inline", "thread"):
        assert config(signing=mode).hsm.signing == mode


def test_an_unknown_signing_mode_is_refused_with_the_choices() -> None:
    with pytest.raises(InvalidArgument, match=r"hsm\.signing must be one of auto, inline, thread"):
        config(signing="fast")
