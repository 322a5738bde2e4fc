"""A running signer keeps its start-up objects out of the cyclic collector and collects the
young generation less often, but still collects it (signer.server.tune_gc,
docs/adr/0013)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from signer.server import GC_YOUNG_THRESHOLD, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


class Node:
    """A reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.mark.usefixtures("restored_gc")
def test_start_up_objects_are_frozen_and_the_young_threshold_raised() -> None:
    _, middle, old = gc.get_threshold()
    start_up = [object()]
    tune_gc()
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, middle, old)
    assert all(start_up is not tracked for tracked in gc.get_objects())


@pytest.mark.usefixtures("restored_gc")
def test_cycles_made_after_tuning_are_collected_once_enough_is_allocated() -> None:
    tune_gc()
    gc.collect()
    cycle = Node()
    gone = weakref.ref(cycle)
    del cycle
    few = [[] for _ in range(GC_YOUNG_THRESHOLD // 2)]
    assert gone() is not None  # not yet: the old 700 would have collected it by now
    many = [[] for _ in range(GC_YOUNG_THRESHOLD)]
    assert gone() is None
    assert len(few) + len(many) > GC_YOUNG_THRESHOLD
