"""EngineLoop: the one thread that owns an engine inside a server process.

The engine (and the node around it) is not thread-safe, and its worker processes answer one
call at a time; so exactly one thread touches it. HTTP handlers (asyncio) hand it work with
`call(fn)` -- fn(owner) runs on the loop thread between steps -- and get a future back. The
thread steps the engine whenever any request has work, so a request that arrives while others
run joins the next batch; per-request sinks (`watch`) get each StepOutput on the loop thread.

Failure: an exception from a step (a dead worker, EngineError) fails every watched request
and every later call; the loop is then `broken` (health reports it) until closed.

The loop thread holds `_owner` whenever it touches the engine; it lets go only while it waits
for calls. `run_now(fn)` runs fn on the caller's thread in such a moment (the engine idle,
no call pending), and otherwise declines: work that needs no step (a decode server
allocating a request's blocks before its transfer) then skips the loop thread's wakeup.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from typing import Any, Callable

from pdbridge.engine.llm_engine import Engine, EngineFull, StepOutput

Sink = Callable[[StepOutput | BaseException], None]


class EngineLoop:
    def __init__(self, owner: Any, engine: Engine, *, name: str = "engine-loop",
                 idle: Callable[[], None] | None = None, idle_every_s: float = 0.005,
                 after_step: Callable[[], None] | None = None,
                 on_broken: Callable[[BaseException], None] | None = None):
        """owner: what `call` functions receive (a PrefillNode, DecodeNode or Engine).
        idle: run at least every `idle_every_s` (the prefill node polls notifications);
        after_step: run after every step (finished prefills are collected there);
        on_broken: told the error once the loop is broken, to fail what waits elsewhere."""
        self.owner, self.engine = owner, engine
        self._idle, self._idle_every_s, self._after_step = idle, idle_every_s, after_step
        self._on_broken = on_broken
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[int, Sink] = {}
        self._stop = threading.Event()
        self._owner = threading.Lock()      # whoever touches the engine (module docstring)
        self.broken: BaseException | None = None
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- any thread ------------------------------------------------------------------

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Run fn(owner) on the loop thread; its result or exception arrives in the future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self.broken is not None or self._stop.is_set():
            fut.set_exception(RuntimeError(f"the engine loop has stopped: {self.broken}"))
            return fut
        self._calls.put((fn, fut))
        return fut

    def run_now(self, fn: Callable[[Any], Any]) -> tuple[bool, Any]:
        """(True, fn(owner)) run on the caller's thread if the loop thread is waiting for
        calls (the engine idle, none pending), holding the engine meanwhile; (False, None)
        otherwise, and then the caller uses call(). The loop thread is not woken: fn must
        leave no work a step has to do now (a decode request awaiting its state does not).
        fn's exception propagates."""
        if self.broken is not None or self._stop.is_set() or not self._calls.empty():
            return False, None
        if not self._owner.acquire(blocking=False):
            return False, None
        try:
            if self.broken is not None or not self._calls.empty() or \
                    self.engine.has_unfinished():
                return False, None
            return True, fn(self.owner)
        finally:
            self._owner.release()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread (pending calls fail); the caller then closes the engine."""
        self._stop.set()
        self._calls.put(None)
        self._thread.join(timeout_s)

    # ---- the loop thread only -------------------------------------------------------

    def watch(self, request_id: int, sink: Sink) -> None:
        """Send the request's StepOutputs to `sink` (on this thread) until it finishes."""
        self._sinks[request_id] = sink

    def unwatch(self, request_id: int) -> None:
        self._sinks.pop(request_id, None)

    def _run(self) -> None:
        next_idle = 0.0
        while not self._stop.is_set():
            with self._owner:
                busy = self.broken is None and self.engine.has_unfinished()
            item = self._next_call(block=not busy, timeout=self._idle_every_s)
            with self._owner:
                stalled = self._iterate(item)
                next_idle = self._idle_if_due(next_idle)
            if stalled:
                time.sleep(self._idle_every_s)
        with self._owner:
            self._fail_calls(RuntimeError("the engine loop was closed"))

    def _iterate(self, item) -> bool:
        """One turn, holding the engine: the call taken (and every other pending), then a
        step. True: the step could not run (blocks held elsewhere); wait before the next."""
        if item is not None:
            self._run_calls(item)
        if self._stop.is_set() or self.broken is not None or not self.engine.has_unfinished():
            return False
        try:
            outputs = self.engine.step()
        except EngineFull:
            return True                 # queued behind held blocks: wait for releases
        except BaseException as e:      # a dead or stuck worker: everything fails
            self._fail(e)
            return False
        if outputs is None:
            return True
        self.steps += 1
        self._dispatch(outputs)
        if self._after_step is not None:
            self._guarded(self._after_step)
        return False

    def _idle_if_due(self, next_idle: float) -> float:
        now = time.monotonic()
        if self._idle is not None and now >= next_idle and self.broken is None \
                and not self._stop.is_set():
            self._guarded(self._idle)
            return now + self._idle_every_s
        return next_idle

    def _next_call(self, block: bool, timeout: float):
        """The next call (or None), waiting for it up to `timeout` when `block`: the one
        moment the loop thread does not hold the engine."""
        try:
            return self._calls.get(timeout=timeout) if block else self._calls.get_nowait()
        except queue.Empty:
            return None

    def _run_calls(self, item) -> None:
        while item is not None:
            fn, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.owner))
                except BaseException as e:
                    fut.set_exception(e)
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if out.finished:
                self._sinks.pop(out.request_id, None)
            if sink is not None:
                sink(out)

    def _guarded(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as e:
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        self.broken = error
        sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            sink(error)
        if self._on_broken is not None:
            self._on_broken(error)
        self._fail_calls(error)

    def _fail_calls(self, error: BaseException) -> None:
        while True:
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[1].set_running_or_notify_cancel():
                item[1].set_exception(RuntimeError(f"the engine loop has stopped: {error}"))
