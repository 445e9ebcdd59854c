"""The server's frozen heap: start-up objects leave the collector's scans, and a closed model's
reference cycles are still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from pagedserve.heap import FrozenHeap

from .conftest import repository_manager


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()  # the test process's own heap is not ours to keep frozen
    gc.set_threshold(*thresholds)


def test_a_heap_nobody_froze_is_left_alone() -> None:
    before = gc.get_freeze_count()
    heap = FrozenHeap()
    heap.after_load()
    heap.after_close()
    assert gc.get_freeze_count() == before and not heap.frozen
    assert gc.get_threshold()[0] < 10_000


def test_freezing_moves_live_objects_out_of_the_scans_and_frees_garbage_first() -> None:
    kept, dropped = Node(), Node()
    gone = weakref.ref(dropped)
    del dropped
    FrozenHeap().freeze()
    assert gone() is None  # collected before the freeze, not frozen with the rest
    assert gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects())  # frozen: no generation lists it
    assert gc.get_threshold()[0] == 10_000  # young collections only every 10,000 net allocations


def test_a_cycle_frozen_with_a_model_is_collected_when_the_model_closes() -> None:
    manager = repository_manager()
    manager.load("simple")
    instance = manager.resolve("simple").policy.model.instances[0]
    instance.cycle = Node()
    cycle = weakref.ref(instance.cycle)
    del instance
    manager.heap.freeze()
    manager.load("repeat_int32")  # a later load is frozen too
    assert manager.heap.frozen and gc.get_freeze_count() > 0
    manager.unload("simple", timeout=10)
    assert cycle() is None
    manager.shutdown(timeout=10)
