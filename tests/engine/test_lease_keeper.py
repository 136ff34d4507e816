"""LeaseKeeper: a pull is renewed when it is due, whatever the thread was waiting for when
the pull started (it is woken only for pulls due before its current wait ends)."""
import time

from pdbridge.engine.lease_keeper import LeaseKeeper


def _wait_for(cond, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "no renewal in time"
        time.sleep(0.01)


def test_a_pull_due_sooner_than_the_current_wait_is_renewed():
    keeper = LeaseKeeper("decode-x", 0)
    renewed = []
    keeper._renew = lambda r: renewed.append(r.msg.request_id)
    try:
        keeper.start("long", ["unused"], 3600.0)        # the thread now waits an hour
        time.sleep(0.05)
        keeper.start("short", ["unused"], 0.05)         # due long before that: wakes it
        _wait_for(lambda: renewed.count("short") >= 2)
        keeper.stop("short")
        n = len(renewed)
        keeper.start("later", ["unused"], 1800.0)       # due after the wait ends: no wake
        time.sleep(0.3)
        assert len(renewed) == n and "long" not in renewed and "later" not in renewed
    finally:
        keeper.close()


def test_short_pulls_are_never_renewed():
    keeper = LeaseKeeper("decode-x", 0)
    renewed = []
    keeper._renew = lambda r: renewed.append(r.msg.request_id)
    try:
        for i in range(50):
            keeper.start(f"r{i}", ["unused"], 0.5)
            keeper.stop(f"r{i}")
        time.sleep(0.8)
        assert renewed == []
    finally:
        keeper.close()


def test_pulls_of_the_usual_period_do_not_wake_an_idle_keeper():
    """After its first pull the keeper wakes every renew period on its own, so later pulls of
    that period are never due before its next wake: none wakes it (each wake-up would cost
    the pull a GIL hand-over on its critical path)."""
    keeper = LeaseKeeper("decode-x", 0)
    keeper._renew = lambda r: None
    try:
        keeper.start("first", ["unused"], 0.2)          # the thread slept until woken
        keeper.stop("first")
        assert keeper.woken == 1
        time.sleep(0.5)                                 # "first" was due and is gone: idle
        for i in range(20):
            keeper.start(f"r{i}", ["unused"], 0.2)
            keeper.stop(f"r{i}")
        assert keeper.woken == 1
        keeper.start("sooner", ["unused"], 0.01)        # a shorter period still wakes it
        keeper.stop("sooner")
        assert keeper.woken == 2
    finally:
        keeper.close()
