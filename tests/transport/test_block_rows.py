"""read_rows (a `direct` pull through block rows prepared once) against its references: the
request's DIRECT plan read as a read list, on NIXL (two agents in one process) and on the
local transport (which expands the index pairs to runs). Same bytes, same places; rows or
indices outside what was registered are refused before anything moves."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from pdbridge.model.default_model import CONFIG
from pdbridge.plan import PlanCache, RequestBlocks, Strategy
from pdbridge.plan.block_table import OFFSET, index_bounds
from pdbridge.spec import CacheConfig, EngineLayout, load_model_spec
from pdbridge.transport.copies import start_plan, start_reads
from pdbridge.transport.local import LocalTransport
from pdbridge.transport.transport import TransferError, XferState

SPEC = load_model_spec(dict(CONFIG))
PREFILL = EngineLayout(SPEC, 1, CacheConfig(num_blocks=24))
DECODE = EngineLayout(SPEC, 2, CacheConfig(num_blocks=20))


def _requests(rng, count):
    bt = PREFILL.block_tokens
    for i in range(count):
        n = int(rng.integers(1, 8 * bt))
        nb = -(-n // bt)
        if i % 3 == 0:          # contiguous ids: NIXL merges a run's neighbouring blocks
            pb, db = tuple(range(2, 2 + nb)), tuple(range(5, 5 + nb))
        else:
            pb = tuple(int(b) for b in rng.choice(PREFILL.num_blocks, nb, replace=False))
            db = tuple(int(b) for b in rng.choice(DECODE.num_blocks, nb, replace=False))
        yield (RequestBlocks(n, pb, int(rng.integers(0, PREFILL.num_blocks))),
               RequestBlocks(n, db, int(rng.integers(0, DECODE.num_blocks))))


def _drive(src, dst, handles, timeout_s=20.0):
    """Wait for the reads, progressing the passive agent meanwhile; release them."""
    deadline = time.monotonic() + timeout_s
    for h in handles:
        while (s := dst.poll(h)).state is XferState.PENDING and time.monotonic() < deadline:
            src.get_notifications()
        assert s.state is XferState.DONE, s.reason
        dst.release(h)


def _pair(kind, rank):
    rng = np.random.default_rng(rank)
    src = [rng.integers(0, 256, r.nbytes, dtype=np.uint8) for r in PREFILL.rank(0).regions]
    dst = [np.zeros(r.nbytes, np.uint8) for r in DECODE.rank(rank).regions]
    if kind == "nixl":
        pytest.importorskip("nixl")
        from pdbridge.transport.nixl import NixlTransport
        p, d = NixlTransport(f"rows-P{rank}"), NixlTransport(f"rows-D{rank}")
    else:
        p, d = LocalTransport(f"rows-P{rank}"), LocalTransport(f"rows-D{rank}")
    p.register_regions(src)
    d.register_regions(dst)
    d.add_peer(p.name, p.metadata())
    return p, d, src, dst


@pytest.mark.parametrize("kind", ["nixl", "local"])
@pytest.mark.parametrize("rank", [0, 1])
def test_rows_land_what_the_plan_lands(kind, rank):
    p, d, _, dst = _pair(kind, rank)
    try:
        cache = PlanCache()
        for pb, db in _requests(np.random.default_rng(7 + rank), 24):
            plan, _ = cache.plan(PREFILL, DECODE, rank, pb, db, Strategy.DIRECT)
            for b in dst:
                b[:] = 0
            _drive(p, d, start_plan(d, plan, {0: p.name}))
            expected = [b.copy() for b in dst]
            for b in dst:
                b[:] = 0
            reads = cache.block_reads(PREFILL, DECODE, rank, pb, db, Strategy.DIRECT)
            _drive(p, d, start_reads(d, reads, {0: p.name}))
            for region, (got, want) in enumerate(zip(dst, expected)):
                assert np.array_equal(got, want), (pb, db, region)
            assert sum(int(np.count_nonzero(b)) for b in expected) > 0
    finally:
        d.close()
        p.close()


@pytest.mark.parametrize("kind", ["nixl", "local"])
def test_rows_or_indices_outside_the_regions_are_refused(kind):
    p, d, _, _ = _pair(kind, 1)
    try:
        cache = PlanCache()
        pb, db = RequestBlocks(40, (1, 2, 3), 4), RequestBlocks(40, (6, 7, 8), 9)
        rows, idx, nbytes = cache.block_reads(PREFILL, DECODE, 1, pb, db,
                                              Strategy.DIRECT).reads[0]
        for shift in ([[0], [10 ** 6]], [[-10 ** 6], [0]], [[10 ** 6], [0]]):
            bad_idx = idx + np.array(shift, np.int32)
            for bounds in (None, index_bounds(bad_idx)):    # walked here, or made ahead
                with pytest.raises(TransferError, match="outside"):
                    d.read_rows(p.name, rows, bad_idx, nbytes, bounds=bounds)
        # Rows made for a bigger decode engine than the one registered: refused whole.
        local = rows.local.copy()
        local[:, OFFSET] += DECODE.rank(1).regions[0].nbytes
        bad = dataclasses.replace(rows, key=rows.key + ("moved",), local=local)
        with pytest.raises(TransferError, match="outside"):
            d.read_rows(p.name, bad, idx, nbytes)
    finally:
        d.close()
        p.close()
