"""How many workers ``signet serve`` runs, and what each worker's config changes."""

from __future__ import annotations

from typing import Any

import pytest

from kms.errors import InvalidArgument
from signer.config import ServerConfig
from signer.workers import worker_config
from tests.unit.config_helpers import server_config


def config(**changes: Any) -> ServerConfig:
    return server_config(**changes)


def test_default_is_one_worker_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert config().worker_count() == 6
    assert config(workers=3).worker_count() == 3
    assert config(workers=3).worker_count(override=1) == 1


def test_port_zero_runs_one_worker_unless_more_are_asked_for() -> None:
    assert config(listen="127.0.0.1:0").worker_count() == 1
    assert config(listen="127.0.0.1:0", workers=1).worker_count() == 1
    with pytest.raises(InvalidArgument, match="cannot share listen port 0"):
        config(listen="127.0.0.1:0", workers=2).worker_count()
    with pytest.raises(InvalidArgument, match="cannot share listen port 0"):
        config(listen="127.0.0.1:0").worker_count(override=2)


@pytest.mark.parametrize("bad", [0, -1, 257, 1.5, "2", True])
def test_bad_worker_counts_are_refused(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="workers"):
        config(workers=bad)


def test_only_worker_zero_serves_the_tuf_http_port() -> None:
    base = config()
    assert worker_config(base, 0) == base
    assert worker_config(base, 1).trust.http_listen == ""
    assert worker_config(base, 1).listen == base.listen
