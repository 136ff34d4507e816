"""EngineLoop on a fake engine: calls run on its one thread, outputs reach their sinks, a
failing step breaks the loop and fails every waiter, EngineFull only waits."""
from __future__ import annotations

import threading

import pytest

from pdbridge.engine.llm_engine import EngineError, EngineFull, StepOutput
from pdbridge.engine.request import FinishReason
from pdbridge.serve.engine_loop import EngineLoop


class FakeEngine:
    def __init__(self):
        self.queue: list = []           # what the next steps return or raise
        self.thread = None

    def has_unfinished(self):
        return bool(self.queue)

    def step(self):
        self.thread = threading.current_thread()
        item = self.queue.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


def out(rid, tok, done=False):
    return StepOutput(rid, (tok,), done, FinishReason.LENGTH if done else None)


def test_calls_run_on_the_loop_thread_and_return_or_raise():
    loop = EngineLoop("owner", FakeEngine())
    try:
        assert loop.call(lambda o: (o, threading.current_thread().name)).result(10) == \
            ("owner", "engine-loop")
        with pytest.raises(ZeroDivisionError):
            loop.call(lambda o: 1 / 0).result(10)
    finally:
        loop.close()


def test_outputs_reach_their_sinks_until_finished():
    eng = FakeEngine()
    loop = EngineLoop(None, eng)
    got, done = {1: [], 2: []}, threading.Event()
    try:
        def start(_):
            loop.watch(1, got[1].append)
            loop.watch(2, lambda o: (got[2].append(o), o.finished and done.set()))
            eng.queue += [[out(1, 10), out(2, 20)], [out(1, 11, True)], [out(1, 99), out(2, 21, True)]]
        loop.call(start).result(10)
        assert done.wait(10)
        assert [o.new_token_ids for o in got[1]] == [(10,), (11,)]     # none after it finished
        assert [o.new_token_ids for o in got[2]] == [(20,), (21,)]
        assert eng.thread.name == "engine-loop"
    finally:
        loop.close()


def test_a_failing_step_breaks_the_loop_and_fails_every_waiter():
    eng = FakeEngine()
    told = []
    loop = EngineLoop(None, eng, on_broken=told.append)
    got = []
    try:
        boom = EngineError("worker 1 died")
        loop.call(lambda _: (loop.watch(7, got.append), eng.queue.append(boom))).result(10)
        for _ in range(1000):
            if loop.broken is not None:
                break
            threading.Event().wait(0.01)
        assert loop.broken is boom and got == [boom] and told == [boom]
        with pytest.raises(RuntimeError, match="stopped"):
            loop.call(lambda _: None).result(10)            # refused at once, not queued
    finally:
        loop.close()


def test_engine_full_waits_without_breaking():
    eng = FakeEngine()
    loop = EngineLoop(None, eng)
    got, done = [], threading.Event()
    try:
        loop.call(lambda _: (loop.watch(3, lambda o: (got.append(o), done.set())),
                             eng.queue.extend([EngineFull("held"), EngineFull("held"),
                                               [out(3, 5, True)]]))).result(10)
        assert done.wait(10) and loop.broken is None and got[0].new_token_ids == (5,)
    finally:
        loop.close()


def test_run_now_runs_here_only_while_the_loop_waits_idle():
    """run_now: on the caller's thread while the loop thread waits for calls with nothing to
    step; declined (for call()) while a call runs or the engine has work; never at once
    with the loop thread."""
    eng = FakeEngine()
    loop = EngineLoop("owner", eng, idle_every_s=0.001)
    inside, release = threading.Event(), threading.Event()
    try:
        here = threading.current_thread().name
        assert loop.run_now(lambda o: (o, threading.current_thread().name)) == \
            (True, ("owner", here))
        with pytest.raises(ZeroDivisionError):
            loop.run_now(lambda o: 1 / 0)

        def held(_):                        # the loop thread holds the engine
            inside.set()
            release.wait(10)
        fut = loop.call(held)
        assert inside.wait(10)
        assert loop.run_now(lambda o: "ran") == (False, None)
        release.set()
        fut.result(10)
        eng.queue += [None] * 10 ** 6       # work to step (each step stalls): declined
        for _ in range(20):
            assert loop.run_now(lambda o: "ran") == (False, None)
    finally:
        release.set()
        loop.close()
