"""Keeping the garbage collector's full collections off the request path.

A serving process holds a large heap that lives as long as it does: imported modules, protobuf
descriptors, loaded models. CPython's full collection walks all of it, and requests in flight make
one due every few thousand requests: on the ``/infer`` benchmark a 95 ms pause about every 16,000
requests at concurrency 16, ~6 µs a request. Once the start-up models are loaded, the server moves
everything then alive into the collector's permanent generation (``gc.freeze``, as vLLM's and
SGLang's servers do), so later collections walk only what came after.

The youngest generation's threshold goes up too, from 700 to 10,000 net allocations: sixteen
requests in flight alone hold about 700 young objects, so at the default every burst of requests
paid a young collection (~33 µs each, ~2 µs a request at concurrency 16). Those collections only
ever find the cycles that reference counting leaves; they still come, less often.

Frozen objects are still freed by reference counting, but a reference cycle among them would never
be: after a model version closes, the heap is thawed, collected once and frozen again (one full
collection per unload, what the collector did every few thousand requests before). A model loaded
later is frozen once its load ends.
"""

from __future__ import annotations

import gc
import threading

_YOUNG_THRESHOLD = 10_000


class FrozenHeap:
    """Off until :meth:`freeze` (the server's start-up calls it, and each LLM engine process once its
    engine is built; a library user's process is left alone); then kept frozen across model loads
    and unloads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.frozen = False

    def freeze(self) -> None:
        with self._lock:
            gc.collect()  # what start-up left as garbage is freed, not frozen
            gc.freeze()
            if not self.frozen:
                _, middle, oldest = gc.get_threshold()
                gc.set_threshold(_YOUNG_THRESHOLD, middle, oldest)
            self.frozen = True

    def after_load(self) -> None:
        """A model's objects join the permanent generation (its load's garbage collected first)."""
        if self.frozen:
            self.freeze()

    def after_close(self) -> None:
        """A closed model's cycles can be collected only once thawed."""
        if not self.frozen:
            return
        with self._lock:
            gc.unfreeze()
            gc.collect()
            gc.freeze()
