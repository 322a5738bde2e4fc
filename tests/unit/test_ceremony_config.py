"""``ceremonies:`` in the signer config: ``required`` and ``retention_seconds``."""

from __future__ import annotations

import pytest

from kms.errors import InvalidArgument
from signer.config import DEFAULT_CEREMONY_RETENTION_SECONDS
from tests.unit.test_worker_config import config


def test_closed_proposals_are_kept_thirty_days_by_default() -> None:
    assert config().ceremony_retention_seconds == DEFAULT_CEREMONY_RETENTION_SECONDS == 2592000
    assert config(ceremonies={"required": True}).ceremony_retention_seconds == 2592000


def test_retention_is_configurable() -> None:
    assert config(ceremonies={"retention_seconds": 15}).ceremony_retention_seconds == 15
    assert config(ceremonies={"retention_seconds": 0.5}).ceremony_retention_seconds == 0.5


@pytest.mark.parametrize("bad", [-1, "30d", True, None])
def test_bad_retention_is_refused(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="retention_seconds"):
        config(ceremonies={"retention_seconds": bad})


def test_unknown_ceremony_settings_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="'required', 'retention_seconds' and"):
        config(ceremonies={"retain": 1})
