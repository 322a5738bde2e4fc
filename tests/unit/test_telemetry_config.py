"""``telemetry.enabled``: the switch that removes the per-call telemetry (bench/README.md)."""

from __future__ import annotations

from typing import Any

import pytest

from kms.errors import InvalidArgument
from signer.config import ServerConfig
from tests.unit.config_helpers import server_config


def config(telemetry: dict[str, Any]) -> ServerConfig:
    return server_config(telemetry=telemetry)


def test_telemetry_is_on_unless_switched_off() -> None:
    assert config({}).telemetry.enabled
    assert not config({"enabled": False}).telemetry.enabled
    # Metrics endpoint without per-call telemetry still serves the state gauges.
    assert config({"enabled": False, "metrics_listen": "127.0.0.1:9464"}).telemetry.metrics_listen


@pytest.mark.parametrize(("telemetry", "message"), [
    ({"enabled": "no"}, "telemetry.enabled must be true or false"),
    ({"enabled": False, "otlp_endpoint": "collector:4317"}, "no traces to export"),
    ({"enabled": False, "console_traces": True}, "no traces to export"),
])
def test_contradictory_telemetry_settings_are_refused(telemetry: dict[str, Any],
                                                      message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        config(telemetry)
