"""Run a test step with a bound: a hang becomes a test failure instead of a stuck suite (the
bound is generous; it is never a timing assertion)."""
from __future__ import annotations

import threading


def run_bounded(fn, bound_s: float = 120.0):
    """fn() in a thread; its value, or its exception re-raised here; AssertionError on a hang."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:      # re-raised in the test's thread
            box["error"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(bound_s)
    assert not t.is_alive(), f"still running after {bound_s} s: a hang"
    if "error" in box:
        raise box["error"]
    return box.get("value")
