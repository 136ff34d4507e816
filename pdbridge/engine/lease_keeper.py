"""LeaseKeeper: one decode rank's renewals of the prefill leases on the requests it is reading.

A pull that could outlive its lease must renew it (DESIGN.md section 5, step 3). One thread,
started once with the rank and stopped in close(), renews every pull that has run for
`renew_every_s` since it started or last renewed (a LeaseRenew to each source rank's metadata
server); pulls shorter than that (nearly all) cost two dictionary updates, not a thread, and
do not wake the thread either unless they are due before it next wakes (a wake-up costs the
pull a GIL hand-over on its critical path; issue 10). With nothing to renew the thread still
wakes every `renew_every_s` (the shortest asked so far), so a pull that asks the same period
is never due before that wake and never wakes it; an idle thread that slept until woken was
woken by every pull.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from pdbridge.transport.handshake import request
from pdbridge.transport.messages import LeaseRenew
from pdbridge.transport.side_channel_key import SideChannelKey


@dataclass
class _Reading:
    msg: LeaseRenew
    endpoints: list[str]
    every_s: float
    due: float                      # monotonic time of the next renewal


class LeaseKeeper:
    def __init__(self, engine_id: str, rank: int, key: SideChannelKey | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._engine_id, self._rank, self._key, self._clock = engine_id, rank, key, clock
        self._reading: dict[str, _Reading] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._wakes_at = float("inf")      # when the thread's current wait ends
        self._idle_s = float("inf")        # its wait with nothing to renew: the shortest every_s
        self.sent = 0
        self.woken = 0                      # pulls that had to wake the thread
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"pd-lease-{engine_id}-{rank}")
        self._thread.start()

    def start(self, request_id: str, endpoints: list[str], every_s: float) -> None:
        """Renew `request_id`'s lease every `every_s` (> 0) until `stop(request_id)`."""
        if every_s <= 0:
            return
        with self._cond:
            due = self._clock() + every_s
            self._idle_s = min(self._idle_s, every_s)
            self._reading[request_id] = _Reading(LeaseRenew(request_id, self._engine_id,
                                                            self._rank), list(endpoints),
                                                 every_s, due)
            if due < self._wakes_at:
                self.woken += 1
                self._cond.notify()

    def stop(self, request_id: str) -> None:
        with self._cond:
            self._reading.pop(request_id, None)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                due = [r for r in self._reading.values() if r.due <= self._clock()]
                if not due:
                    now = self._clock()
                    nxt = min((r.due for r in self._reading.values()), default=now + self._idle_s)
                    self._wakes_at = nxt
                    self._cond.wait(None if nxt == float("inf") else max(0.0, nxt - now))
                    self._wakes_at = -float("inf")      # awake: it looks at every pull
                    continue
                for r in due:
                    r.due = self._clock() + r.every_s
            for r in due:                   # outside the lock: a pull may start or end
                self._renew(r)

    def _renew(self, r: _Reading) -> None:
        for endpoint in r.endpoints:
            try:
                request(endpoint, r.msg, timeout_s=r.every_s, key=self._key)
                self.sent += 1
            except Exception:
                pass        # a prefill rank that does not answer: its reads will fail too

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(5.0)
