"""Request bookkeeping of the pull model (DESIGN.md section 5), pure: no I/O, no clock.

`LeaseTable` (the prefill side): a request's blocks stay put until every expected decode reader
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
