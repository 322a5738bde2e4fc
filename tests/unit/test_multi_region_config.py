"""The ``multi_region:`` section of the signer's config: request-id window and group linger."""

from __future__ import annotations

from typing import Any

import pytest

from kms.errors import InvalidArgument
from signer.config import ServerConfig
from tests.unit.config_helpers import server_config


def config(**multi_region: Any) -> ServerConfig:
    return server_config(multi_region=multi_region)


def test_the_request_group_linger_defaults_to_5_ms_and_may_be_off() -> None:
    assert config().multi_region.request_group_linger_ms == 5.0
    assert config(request_group_linger_ms=0).multi_region.request_group_linger_ms == 0.0
    assert config(request_group_linger_ms=2.5).multi_region.request_group_linger_ms == 2.5


@pytest.mark.parametrize("value", [-1, 101, "5", True, None])
def test_a_request_group_linger_out_of_range_is_refused_with_the_range(value: Any) -> None:
    with pytest.raises(InvalidArgument, match=r"request_group_linger_ms must be from 0 "):
        config(request_group_linger_ms=value)


def test_an_unknown_multi_region_setting_is_refused_with_the_known_ones() -> None:
    with pytest.raises(InvalidArgument, match="request_group_linger_ms"):
        config(request_linger=5)
