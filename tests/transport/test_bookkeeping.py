"""LeaseTable: unit cases, and random event sequences against a shadow model."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdbridge.transport.bookkeeping import LeaseTable, ReleaseReason
from pdbridge.transport.messages import LeaseRenew, ReadDone, decode, encode

D0, D1 = ("d", 0), ("d", 1)


# ---- LeaseTable ---------------------------------------------------------------------------

def test_release_after_all_readers_exactly_once():
    lt = LeaseTable(lease_s=10.0)
    assert lt.register("r1", ["b1"], now=0.0, readers=[D0, D1]) == 10.0
    assert lt.notify("r1", D0) is None and lt.outstanding("r1") == {D1}
    assert lt.notify("r1", D0) is None          # duplicate
    rel = lt.notify("r1", D1, ok=False)
    assert (rel.request_id, rel.blocks, rel.reason) == ("r1", ["b1"], ReleaseReason.READ)
    assert rel.failed_readers == {D1} and rel.missing_readers == frozenset()
    assert lt.notify("r1", D1) is None and lt.expire(math.inf) == [] and len(lt) == 0
    assert lt.ignored == 2


def test_wire_notifications_drive_the_table():
    lt = LeaseTable(lease_s=10.0)
    lt.register("r1", "blocks", now=0.0, readers=[D0, D1])
    assert lt.apply(decode(encode(LeaseRenew("r1", "d", 1))), now=5.0) is None
    assert lt.deadline("r1") == 15.0
    for reader in (D0, D1):     # each decode rank's pull finishes and notifies
        rel = lt.apply(decode(encode(ReadDone("r1", *reader, True, ""))), now=6.0)
    assert rel is not None and rel.reason is ReleaseReason.READ and rel.blocks == "blocks"


def test_lease_expiry_and_renewal():
    lt = LeaseTable(lease_s=10.0, max_lease_s=25.0)
    lt.register("r1", "blocks", now=0.0, readers=[D0, D1])
    lt.notify("r1", D0)
    assert lt.renew("r1", now=8.0, reader=D1) and lt.deadline("r1") == 18.0
    assert not lt.renew("r1", now=9.0, reader=D0)      # D0 is done: its renewal is late
    assert lt.renew("r1", now=17.0) and lt.deadline("r1") == 25.0   # capped
    assert lt.expire(24.9) == []
    (rel,) = lt.expire(25.0)
    assert rel.reason is ReleaseReason.EXPIRED and rel.missing_readers == {D1}
    assert not lt.renew("r1", now=25.0) and lt.notify("r1", D1) is None


def test_expired_lease_cannot_be_renewed_even_before_expire_runs():
    lt = LeaseTable(lease_s=1.0)
    lt.register("r1", 1, now=0.0, readers=[D0])
    assert not lt.renew("r1", now=1.0)
    assert [r.request_id for r in lt.expire(1.0)] == ["r1"]


def test_readers_named_after_notifications():
    lt = LeaseTable(lease_s=10.0)
    lt.register("r1", 7, now=0.0)
    assert lt.outstanding("r1") is None
    assert lt.notify("r1", D0) is None and lt.notify("r1", D1) is None   # nobody expected yet
    rel = lt.expect("r1", [D0, D1])
    assert rel is not None and rel.reason is ReleaseReason.READ and rel.blocks == 7


def test_stranger_notification_is_ignored():
    lt = LeaseTable(lease_s=10.0)
    lt.register("r1", 7, now=0.0, readers=[D0])
    assert lt.notify("r1", ("other", 0)) is None and "r1" in lt
    with pytest.raises(ValueError, match="expects"):
        lt.expect("r1", [D0, D1])
    with pytest.raises(ValueError, match="already"):
        lt.register("r1", 8, now=0.0)


# Random event sequences: every registered request is released exactly once, with its own
# blocks, never before all expected readers notified unless its lease (as a shadow model
# computes it) has expired.
READERS = [D0, D1, ("e", 0)]
lease_event = st.one_of(
    st.tuples(st.just("register"), st.integers(0, 3), st.sets(st.integers(0, 2), min_size=1),
              st.booleans()),
    st.tuples(st.just("expect"), st.integers(0, 3)),
    st.tuples(st.just("notify"), st.integers(0, 3), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("renew"), st.integers(0, 3), st.one_of(st.none(), st.integers(0, 2))),
    st.tuples(st.just("tick"), st.floats(0.0, 6.0)),
    st.tuples(st.just("expire"),),
)


class Shadow:
    """What the table should do, written the obvious way."""

    def __init__(self, lease_s, max_lease_s):
        self.lease_s, self.max_lease_s = lease_s, max_lease_s
        self.live = {}          # req -> dict(readers, named, heard, deadline, cap, blocks)
        self.released = {}      # req -> blocks (requests ids are never reused here)

    def check_release(self, rel, now):
        s = self.live.pop(rel.request_id)
        assert rel.request_id not in self.released, "released twice"
        assert rel.blocks is s["blocks"]
        if rel.reason is ReleaseReason.READ:
            assert s["named"] and s["readers"] <= s["heard"]
        else:
            assert now >= s["deadline"], "expired early"
        self.released[rel.request_id] = rel.blocks


def _run_lease_events(events, lease_s=2.0, max_lease_s=3.0):
    lt, sh, now, registered = LeaseTable(lease_s, max_lease_s), Shadow(lease_s, max_lease_s), 0.0, set()
    for ev in events:
        kind, rels = ev[0], []
        if kind == "register":
            req = f"r{ev[1]}"
            if req in registered:
                continue
            readers, name_now = frozenset(READERS[i] for i in ev[2]), ev[3]
            registered.add(req)
            sh.live[req] = dict(readers=readers, named=name_now, heard=set(), blocks=object(),
                                deadline=now + lease_s, cap=now + max_lease_s)
            lt.register(req, sh.live[req]["blocks"], now, readers if name_now else None)
        elif kind == "expect" and f"r{ev[1]}" in sh.live:
            s = sh.live[f"r{ev[1]}"]
            s["named"] = True
            rels = [lt.expect(f"r{ev[1]}", s["readers"])]
        elif kind == "notify":
            req, reader = f"r{ev[1]}", READERS[ev[2]]
            s = sh.live.get(req)
            if s and (not s["named"] or reader in s["readers"]):
                s["heard"].add(reader)
            rels = [lt.notify(req, reader, ev[3])]
        elif kind == "renew":
            req, reader = f"r{ev[1]}", None if ev[2] is None else READERS[ev[2]]
            s = sh.live.get(req)
            ok = lt.renew(req, now, reader)
            want = bool(s) and now < s["deadline"] and reader not in s["heard"] and (
                reader is None or not s["named"] or reader in s["readers"])
            assert ok == want
            if ok:
                s["deadline"] = max(s["deadline"], min(now + lease_s, s["cap"]))
        elif kind == "tick":
            now += ev[1]
        elif kind == "expire":
            rels = lt.expire(now)
        for rel in rels:
            if rel is not None:
                sh.check_release(rel, now)
        for req, s in sh.live.items():
            assert lt.deadline(req) == s["deadline"]
    for rel in lt.expire(math.inf):
        sh.check_release(rel, math.inf)
    assert set(sh.released) == registered and len(lt) == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(lease_event, max_size=40))
def test_lease_table_random_events(events):
    _run_lease_events(events)


def test_lease_shadow_catches_a_double_release():
    # The harness must be able to fail: a table that releases twice is caught.
    class Leaky(LeaseTable):
        def expire(self, now):
            out = super().expire(now)
            return out + out
    lt = Leaky(1.0)
    sh = Shadow(1.0, None)
    blocks = object()
    sh.live["r"] = dict(readers={D0}, named=True, heard=set(), blocks=blocks, deadline=1.0,
                        cap=math.inf)
    lt.register("r", blocks, 0.0, [D0])
    rels = lt.expire(1.0)
    sh.check_release(rels[0], 1.0)
    with pytest.raises((AssertionError, KeyError)):
        sh.check_release(rels[1], 1.0)
