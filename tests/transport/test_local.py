"""LocalTransport: the full (p, d) x strategy x conv-layout matrix in-process, and its failures."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from xfer_case import Case, run_local  # noqa: E402

from pdbridge.transport.local import LocalTransport
from pdbridge.transport.transport import ReadList, TransferError, XferState

PAIRS = [(1, 2), (2, 1), (2, 4), (4, 2), (1, 4), (3, 2)]
MATRIX = [Case(p, d, s, c) for p, d in PAIRS for s in ("direct", "staging", "permute")
          for c in ("DS", "SD")]


@pytest.mark.parametrize("case", MATRIX, ids=Case.label)
def test_local_transfer_matches_oracle(case):
    """Cheap in-process: the whole matrix in the default run."""
    assert run_local(case) == []


def _one(region, off, dregion, doff, n) -> ReadList:
    a = lambda v, dt: np.asarray([v], dt)  # noqa: E731
    return ReadList(a(region, np.int32), a(off, np.int64), a(dregion, np.int32), a(doff, np.int64),
                    a(n, np.int64))


@pytest.fixture
def pair():
    p, d = LocalTransport("lt-P"), LocalTransport("lt-D")
    p.register_regions([np.arange(64, dtype=np.uint8)], np.full(8, 7, np.uint8))
    d.register_regions([np.zeros(32, np.uint8)])
    d.add_peer("lt-P", p.metadata())
    yield p, d
    p.close()
    d.close()


def test_read_copies_and_notifies(pair):
    p, d = pair
    h = d.read("lt-P", _one(0, 10, 0, 3, 5), notify=b"req-1")
    assert d.wait(h, 1.0).state is XferState.DONE
    assert d._regions[0][3:8].tolist() == [10, 11, 12, 13, 14]
    assert p.get_notifications() == [("lt-D", b"req-1")]
    assert p.get_notifications() == []


def test_scratch_source(pair):
    p, d = pair
    d.wait(d.read("lt-P", _one(-1, 2, 0, 0, 4)), 1.0)
    assert d._regions[0][:4].tolist() == [7] * 4


@pytest.mark.parametrize("reads, match", [
    (_one(0, 60, 0, 0, 8), "outside"),      # source past its region
    (_one(0, 0, 0, 30, 8), "outside"),      # destination past its region
    (_one(3, 0, 0, 0, 8), "does not exist"),
    (_one(0, 0, -1, 0, 8), "outside"),      # decode has no scratch
])
def test_bad_reads_raise(pair, reads, match):
    with pytest.raises(TransferError, match=match):
        pair[1].read("lt-P", reads)


def test_unknown_and_gone_peers(pair):
    p, d = pair
    with pytest.raises(TransferError, match="unknown peer"):
        d.read("nobody", _one(0, 0, 0, 0, 4))
    p.close()
    h = d.read("lt-P", _one(0, 0, 0, 0, 4))
    assert d.poll(h).state is XferState.FAILED
    with pytest.raises(TransferError, match="gone"):
        d.wait(h, 1.0)
    with pytest.raises(TransferError, match="gone"):
        d.notify("lt-P", b"x")


def test_close_is_idempotent_and_final(pair):
    p, d = pair
    d.close()
    d.close()
    with pytest.raises(TransferError, match="closed"):
        d.read("lt-P", _one(0, 0, 0, 0, 4))


def test_corruption_is_detected():
    """The case check can fail: a transfer that skips one read leaves wrong bytes."""
    from xfer_case import decode_buffers, decode_errors, decode_plan
    case = Case(1, 2)
    plan = decode_plan(case, 0)
    bufs, _ = decode_buffers(case, 0, plan)
    assert decode_errors(case, 0, bufs)


def test_write_pushes_into_the_peer_and_notifies():
    """Push mode: the same runs, source here and destination on the peer."""
    p, d = LocalTransport("lw-P"), LocalTransport("lw-D")
    try:
        p.register_regions([np.arange(64, dtype=np.uint8)])
        dst = np.zeros(32, np.uint8)
        d.register_regions([dst])
        p.add_peer("lw-D", d.metadata())
        h = p.write("lw-D", _one(0, 10, 0, 4, 6), b"pushed")
        assert p.wait(h, 1.0).state is XferState.DONE
        assert dst[4:10].tolist() == list(range(10, 16)) and not dst[:4].any() and not dst[10:].any()
        assert d.get_notifications() == [("lw-P", b"pushed")]
        with pytest.raises(TransferError, match="destination region 0 bytes"):
            p.write("lw-D", _one(0, 0, 0, 30, 6))
        d.close()
        assert p.poll(p.write("lw-D", _one(0, 0, 0, 0, 1))).state is XferState.FAILED
    finally:
        p.close()
        d.close()
