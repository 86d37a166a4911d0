"""The thread that drives an `Engine` for concurrent callers (the HTTP server).

    runner = Runner(engine, max_pending=64).start()
    rid = runner.submit(Request(...), on_event)   # from any thread; on_event(Event) is called
                                                  # on the runner thread for every token
    runner.cancel(rid)
    runner.close()                                # stop accepting, finish what is in flight

`submit` checks the request (ValueError, a client error), refuses it with `Overloaded` when
`max_pending` requests are already waiting or running (HTTP 429) and with `ShuttingDown` once
`close` has begun (HTTP 503). `close(drain=True)` lets every accepted request run to its end: no
accepted request is lost on shutdown. If the engine itself fails, every pending request gets an
Event with finish "error" and the runner stops accepting.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable

from lm_jax.serving.engine import Engine, Event, Request

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Flags `--serve.<field>` (experiments/serve.py)."""

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = ""  # the id in /v1/models and responses ('' = from the source)
    max_pending: int = 64  # requests waiting or running before new ones get 429
    chat_template: str = ""  # '' = the tokenizer's own; or chatml | llama3 | gemma
    drain_timeout: float = 600.0  # seconds SIGTERM waits for in-flight requests


class Overloaded(RuntimeError):
    """Too many requests pending: retry later (HTTP 429)."""


class ShuttingDown(RuntimeError):
    """The server is draining and takes no new requests (HTTP 503)."""


class Runner:
    def __init__(self, engine: Engine, max_pending: int = 64):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}.")
        self.engine, self.max_pending = engine, max_pending
        self._cond = threading.Condition()
        self._inbox: list[tuple[int, Request]] = []
        self._cancels: list[int] = []
        self._callbacks: dict[int, Callable[[Event], None]] = {}
        self._next = 0
        self._engine_ids: dict[int, int] = {}  # runner id -> engine id
        self._closing = False
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="lm_jax-engine", daemon=True)

    def start(self) -> Runner:
        self._thread.start()
        return self

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._callbacks)

    @property
    def accepting(self) -> bool:
        return not self._closing and self._failed is None

    def submit(self, req: Request, on_event: Callable[[Event], None]) -> int:
        self.engine.check(req)  # ValueError: the request's own fault
        with self._cond:
            if self._failed is not None:
                raise ShuttingDown(f"the engine failed ({self._failed}); restart the server.")
            if self._closing:
                raise ShuttingDown("the server is shutting down; retry on another replica.")
            if len(self._callbacks) >= self.max_pending:
                raise Overloaded(
                    f"{len(self._callbacks)} requests pending (--serve.max_pending="
                    f"{self.max_pending}); retry later."
                )
            rid = self._next
            self._next += 1
            self._callbacks[rid] = on_event
            self._inbox.append((rid, req))
            self._cond.notify()
        return rid

    def cancel(self, rid: int) -> None:
        """Stop a request (e.g. its client went away); its callback gets finish "cancelled"."""
        with self._cond:
            if rid in self._callbacks:
                self._cancels.append(rid)
                self._cond.notify()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with drain, wait until the accepted ones finish, then stop."""
        with self._cond:
            self._closing = True
            if not drain:
                self._cancels.extend(self._callbacks)
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        eng = self.engine
        by_engine: dict[int, int] = {}  # engine id -> runner id
        while True:
            with self._cond:
                while not (self._inbox or self._cancels or eng.busy or self._closing):
                    self._cond.wait()
                if self._closing and not (self._inbox or self._callbacks):
                    return
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
            for rid, req in inbox:
                eid = eng.add(req)
                by_engine[eid] = rid
                self._engine_ids[rid] = eid
            for rid in cancels:
                eid = self._engine_ids.get(rid)
                if eid is not None:
                    eng.cancel(eid)
            if not eng.busy:
                continue
            try:
                events = eng.step()
            except Exception as e:  # the engine is broken: fail everything pending, loudly
                log.exception("engine step failed")
                with self._cond:
                    self._failed = e
                    callbacks, self._callbacks = self._callbacks, {}
                for rid, cb in callbacks.items():
                    cb(Event(rid, -1, 0.0, (), "error"))
                return
            for ev in events:
                rid = by_engine.get(ev.rid)
                if rid is None:
                    continue
                with self._cond:
                    cb = self._callbacks.get(rid)
                    if ev.finish is not None:
                        self._callbacks.pop(rid, None)
                        self._engine_ids.pop(rid, None)
                        by_engine.pop(ev.rid, None)
                if cb is not None:
                    cb(ev._replace(rid=rid))
