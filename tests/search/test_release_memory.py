"""What a reused worker does before each trial (``release_freed_memory``): the first call
freezes the objects alive then, so that later full collections skip them, and a task copy
alive at that moment is still freed by reference counting when its trial drops it."""

from __future__ import annotations

import gc
import pickle
import weakref

import pytest

from tdsearch.search.trial import release_freed_memory


@pytest.fixture
def unfrozen():
    """The test process's objects unfrozen before and after: a frozen pytest session would
    keep every later cycle the tests make."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_the_first_release_freezes_and_a_task_copy_frozen_alive_is_still_freed(
    unfrozen, digits_task
):
    copy = pickle.loads(pickle.dumps(digits_task))  # what a worker receives per trial
    model = copy.dense_model()
    assert gc.get_freeze_count() == 0
    release_freed_memory()
    frozen = gc.get_freeze_count()
    assert frozen > 0
    alive = weakref.ref(copy), weakref.ref(model)
    gc.disable()  # reference counting alone, as after the freeze the collector never looks
    try:
        del copy, model
        assert [ref() for ref in alive] == [None, None]
    finally:
        gc.enable()
    after = gc.get_freeze_count()
    assert after < frozen  # the copy's objects left the frozen set as they were freed
    release_freed_memory()  # later calls collect but do not freeze again
    assert gc.get_freeze_count() == after


def test_objects_made_after_the_freeze_are_still_collected_in_cycles(unfrozen):
    release_freed_memory()

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the collector frees it
    ref = weakref.ref(a)
    del a, b
    release_freed_memory()
    assert ref() is None
