"""Request bookkeeping of the pull model (DESIGN.md section 5), pure: no I/O, no clock.

Decode side, `PullTracker`: one pull per request; it is DONE when every prefill rank it
reads from has delivered, FAILED at the first source failure, TIMED_OUT at its deadline.
While pending it says which lease renewals are due.

Prefill side, `LeaseTable`: a request's blocks stay put until every expected decode reader
has notified or the lease expires; decode readers renew the lease while they read. Each
registered request is released exactly once (its blocks returned to the caller once), and
late or duplicate notifications and renewals are ignored.

Time is a float the caller passes in (`now`, `deadline`), in one clock of its choosing.
A peer is `(engine_id, rank)`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Generic, Iterable, TypeVar

from .messages import LeaseRenew, ReadDone

Peer = tuple[str, int]      # (engine id, rank)
B = TypeVar("B")            # whatever the caller keeps per request (e.g. RequestBlocks)


# ---- decode side -------------------------------------------------------------------------

class PullStatus(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


@dataclass(slots=True)
class PullHandle:
    """One request's pull. Owned and updated by its PullTracker; read it, do not set it."""
    request_id: str
    sources: frozenset[Peer]
    deadline: float
    last_renewal: float
    status: PullStatus = PullStatus.PENDING
    reason: str = ""
    done: set[Peer] = field(default_factory=set)
    failed: dict[Peer, str] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status is not PullStatus.PENDING

    @property
    def outstanding(self) -> frozenset[Peer]:
        return self.sources - self.done - self.failed.keys()

    def read_done(self, decode_engine_id: str, decode_rank: int) -> dict[Peer, ReadDone]:
        """The notification each source gets once the pull has finished: ok only if DONE,
        so a prefill rank frees its blocks early whatever happened here."""
        if not self.finished:
            raise ValueError(f"request {self.request_id!r} is still pending")
        ok = self.status is PullStatus.DONE
        return {s: ReadDone(self.request_id, decode_engine_id, decode_rank, ok, self.reason)
                for s in sorted(self.sources)}


class PullTracker:
    def __init__(self, renew_interval_s: float):
        if renew_interval_s <= 0:
            raise ValueError(f"renew_interval_s must be > 0, got {renew_interval_s}")
        self.renew_interval_s = renew_interval_s
        self._pulls: dict[str, PullHandle] = {}

    def pull(self, request_id: str, sources: Iterable[Peer], deadline: float,
             now: float) -> PullHandle:
        if request_id in self._pulls:
            raise ValueError(f"request {request_id!r} is already being pulled")
        h = PullHandle(request_id, frozenset(sources), deadline, last_renewal=now)
        if not h.sources:
            h.status = PullStatus.DONE      # nothing to read
        self._pulls[request_id] = h
        return h

    def source_done(self, request_id: str, source: Peer) -> PullHandle | None:
        """Record that every read from `source` completed. None for an unknown request."""
        h = self._live(request_id, source)
        if h is not None and h.status is PullStatus.PENDING:
            h.done.add(source)
            if not h.outstanding:
                h.status = PullStatus.DONE
        return h

    def source_failed(self, request_id: str, source: Peer, reason: str) -> PullHandle | None:
        """The first failure fails the whole pull (decode then recomputes or errors)."""
        h = self._live(request_id, source)
        if h is not None and h.status is PullStatus.PENDING and source not in h.done:
            h.failed[source] = reason
            h.status = PullStatus.FAILED
            h.reason = f"source {source[0]} rank {source[1]}: {reason}"
        return h

    def expire(self, now: float) -> list[PullHandle]:
        """Pending pulls whose deadline has passed become TIMED_OUT; returns them."""
        out = []
        for h in self._pulls.values():
            if h.status is PullStatus.PENDING and now >= h.deadline:
                h.status = PullStatus.TIMED_OUT
                missing = ", ".join(f"{e} rank {r}" for e, r in sorted(h.outstanding))
                h.reason = f"deadline {h.deadline:g} passed waiting for {missing}"
                out.append(h)
        return out

    def renewals_due(self, now: float) -> list[tuple[str, Peer]]:
        """(request, source) pairs to send a LeaseRenew to now; marks them renewed."""
        out = []
        for h in self._pulls.values():
            if h.status is PullStatus.PENDING and now - h.last_renewal >= self.renew_interval_s:
                h.last_renewal = now
                out.extend((h.request_id, s) for s in sorted(h.outstanding))
        return out

    def get(self, request_id: str) -> PullHandle | None:
        return self._pulls.get(request_id)

    def pending(self) -> list[str]:
        return [r for r, h in self._pulls.items() if h.status is PullStatus.PENDING]

    def finish(self, request_id: str) -> PullHandle:
        """Forget a finished pull (the caller has acted on its status)."""
        h = self._pulls[request_id]
        if not h.finished:
            raise ValueError(f"request {request_id!r} is still pending")
        return self._pulls.pop(request_id)

    def _live(self, request_id: str, source: Peer) -> PullHandle | None:
        h = self._pulls.get(request_id)
        if h is not None and source not in h.sources:
            raise ValueError(f"request {request_id!r} does not read from {source}")
        return h

    def __len__(self) -> int:
        return len(self._pulls)


# ---- prefill side ------------------------------------------------------------------------

class ReleaseReason(enum.Enum):
    READ = "read"           # every expected reader notified
    EXPIRED = "expired"     # the lease ran out first


@dataclass(frozen=True)
class Release(Generic[B]):
    request_id: str
    blocks: B
    reason: ReleaseReason
    failed_readers: frozenset[Peer] = frozenset()   # notified ok=False
    missing_readers: frozenset[Peer] = frozenset()  # expected, never notified (EXPIRED)


@dataclass(slots=True)
class _Lease(Generic[B]):
    blocks: B
    deadline: float
    latest_deadline: float              # renewals never extend past this
    readers: frozenset[Peer] | None     # None: not known yet (see LeaseTable.expect)
    notified: dict[Peer, bool] = field(default_factory=dict)   # reader -> ok


class LeaseTable(Generic[B]):
    """Blocks held for decode readers. Every method is O(1) but expire (O(held))."""

    def __init__(self, lease_s: float, max_lease_s: float | None = None):
        if lease_s <= 0 or (max_lease_s is not None and max_lease_s < lease_s):
            raise ValueError(f"need 0 < lease_s <= max_lease_s, got {lease_s}, {max_lease_s}")
        self.lease_s, self.max_lease_s = lease_s, max_lease_s
        self._leases: dict[str, _Lease[B]] = {}
        self.ignored = 0    # late, duplicate or stray notifications and renewals

    def register(self, request_id: str, blocks: B, now: float,
                 readers: Iterable[Peer] | None = None) -> float:
        """Hold `blocks` for request_id; returns the lease deadline. `readers` may be given
        later with `expect` (when the decode engine is chosen after prefill)."""
        if request_id in self._leases:
            raise ValueError(f"request {request_id!r} already holds a lease")
        cap = now + self.max_lease_s if self.max_lease_s is not None else float("inf")
        self._leases[request_id] = _Lease(blocks, now + self.lease_s, cap, None)
        if readers is not None:
            self.expect(request_id, readers)
        return self._leases[request_id].deadline

    def expect(self, request_id: str, readers: Iterable[Peer]) -> Release[B] | None:
        """Name the decode ranks that will read; releases at once if all already notified."""
        lease = self._leases.get(request_id)
        if lease is None:
            self.ignored += 1
            return None
        readers = frozenset(readers)
        if lease.readers is not None and lease.readers != readers:
            raise ValueError(f"request {request_id!r} expects {sorted(lease.readers)}, "
                             f"not {sorted(readers)}")
        if not readers:
            raise ValueError(f"request {request_id!r}: readers must not be empty")
        lease.readers = readers
        return self._release_if_read(request_id, lease)

    def notify(self, request_id: str, reader: Peer, ok: bool = True) -> Release[B] | None:
        """A reader is done (ok or not). Returns the Release if this was the last one."""
        lease = self._leases.get(request_id)
        if lease is None or reader in lease.notified or (
                lease.readers is not None and reader not in lease.readers):
            self.ignored += 1
            return None
        lease.notified[reader] = ok
        return self._release_if_read(request_id, lease)

    def renew(self, request_id: str, now: float, reader: Peer | None = None) -> bool:
        """Extend a live lease to now + lease_s (capped by max_lease_s). A lease whose
        deadline has passed stays expired, so expiry does not depend on when expire runs."""
        lease = self._leases.get(request_id)
        if lease is None or now >= lease.deadline or reader in lease.notified or (
                reader is not None and lease.readers is not None and reader not in lease.readers):
            self.ignored += 1
            return False
        lease.deadline = max(lease.deadline, min(now + self.lease_s, lease.latest_deadline))
        return True

    def apply(self, msg: ReadDone | LeaseRenew, now: float) -> Release[B] | None:
        """Act on a decoded notification (Transport.get_notifications payloads)."""
        reader = (msg.decode_engine_id, msg.decode_rank)
        if isinstance(msg, ReadDone):
            return self.notify(msg.request_id, reader, msg.ok)
        self.renew(msg.request_id, now, reader)
        return None

    def expire(self, now: float) -> list[Release[B]]:
        gone = [r for r, lease in self._leases.items() if now >= lease.deadline]
        return [self._release(r, ReleaseReason.EXPIRED) for r in gone]

    def deadline(self, request_id: str) -> float | None:
        lease = self._leases.get(request_id)
        return None if lease is None else lease.deadline

    def outstanding(self, request_id: str) -> frozenset[Peer] | None:
        """Expected readers not heard from; None if unknown request or readers not known."""
        lease = self._leases.get(request_id)
        if lease is None or lease.readers is None:
            return None
        return lease.readers - lease.notified.keys()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._leases

    def __len__(self) -> int:
        return len(self._leases)

    def _release_if_read(self, request_id: str, lease: _Lease[B]) -> Release[B] | None:
        if lease.readers is not None and lease.readers <= lease.notified.keys():
            return self._release(request_id, ReleaseReason.READ)
        return None

    def _release(self, request_id: str, reason: ReleaseReason) -> Release[B]:
        lease = self._leases.pop(request_id)     # popped: a second release cannot happen
        readers = lease.readers if lease.readers is not None else lease.notified.keys()
        failed = frozenset(p for p, ok in lease.notified.items() if not ok and p in readers)
        missing = frozenset(readers - lease.notified.keys())
        return Release(request_id, lease.blocks, reason, failed, missing)
