"""Batches prepared ahead on a background thread, with the iterator state that follows each.

`Prefetcher(it, transform, depth)` reads `next(it)` and `it.get_state()` on a thread, applies
`transform` (e.g. the host-to-device transfer of `jax.make_array_from_process_local_data`), and
queues `(transformed, host batch)` pairs `depth` deep. `get_state()` is the state after the last
batch handed out, not after the ones read ahead, so checkpoints stay exact; `set_state()` stops
the thread, rewinds the iterator and starts again on the next `next()`.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_DONE = object()


class Prefetcher:
    """Wraps a resumable iterator (`get_state`/`set_state`); see the module docstring."""

    def __init__(self, it: Iterator, transform: Callable[[Any], Any] = lambda b: b, depth=2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.it, self.transform, self.depth = it, transform, depth
        self._state = copy.deepcopy(it.get_state())
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None

    def __iter__(self):
        return self

    def __next__(self):
        """(transformed batch, host batch)."""
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if item is _DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        out, host, self._state = item
        return out, host

    def get_state(self):
        return self._state

    def set_state(self, state) -> None:
        self.close()
        self.it.set_state(state)
        self._state = copy.deepcopy(state)

    @property
    def stats(self):
        return self.it.stats

    def _start(self) -> None:
        self._queue, self._stop = queue.Queue(self.depth), threading.Event()
        # the worker holds no reference to `self`: a dropped Prefetcher is collected and its
        # __del__ stops the thread (no thread outlives the object that owns it)
        self._thread = threading.Thread(
            target=_work, args=(self.it, self.transform, self._queue, self._stop), daemon=True,
            name="lm_jax-prefetch",
        )  # fmt: skip
        self._thread.start()

    def __del__(self):
        try:
            if self._stop is not None:
                self._stop.set()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def close(self) -> None:
        """Stop the thread and rewind the wrapped iterator to what was handed out."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread = self._queue = self._stop = None
        self.it.set_state(self._state)


def _work(it, transform, q: queue.Queue, stop: threading.Event) -> None:
    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    try:
        while not stop.is_set():
            try:
                host = next(it)
            except StopIteration:
                put(_DONE)
                return
            state = copy.deepcopy(it.get_state())
            if not put((transform(host), host, state)):
                return
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
        put(e)
