"""Execute a TransferPlan with plain numpy copies and check it against the oracle.

Prefill regions hold, at every element of the request, a value that depends only on the
element's global coordinate (so replicas agree), random bytes everywhere else. Decode regions
start as random sentinels. After the plan ran, every destination element must hold its value
and every other decode byte must be unchanged; every read must lie inside its source region
(or scratch) and inside the request's source blocks.
"""
from __future__ import annotations

import numpy as np

from pdbridge.plan import SCRATCH, RequestBlocks, TransferPlan, plan_transfer
from pdbridge.plan.reference import coord_value, held_elements
from pdbridge.spec import BLOCK, EngineLayout


class Sources:
    """Filled prefill buffers of every rank, and the byte mask of the request's blocks."""

    def __init__(self, layout: EngineLayout, blocks: RequestBlocks, rng: np.random.Generator):
        self.layout = layout
        self.buffers, self.allowed = {}, {}
        used = -(-blocks.num_tokens // layout.block_tokens)
        for p in range(layout.tp_size):
            regions = layout.rank(p).regions
            bufs = [rng.integers(0, 256, r.nbytes, dtype=np.uint8) for r in regions]
            allowed = [np.zeros(r.nbytes, bool) for r in regions]
            for e in held_elements(layout, p, blocks):
                bufs[e.region][e.offset:e.offset + e.itemsize] = np.frombuffer(
                    coord_value(e.coord, e.itemsize), np.uint8)
            # Any byte of the request's blocks may be read (whole tokens of its last block).
            for e in held_elements(layout, p, blocks, num_tokens=used * layout.block_tokens):
                allowed[e.region][e.offset:e.offset + e.itemsize] = True
            for tl in layout.rank(p).tensors:
                if not tl.tensor.paged:
                    stride = tl.axis(BLOCK).stride
                    allowed[tl.region][blocks.state_block * stride:(blocks.state_block + 1) * stride] = True
                    # A placed tensor (spec Placement) may sit anywhere in a shared buffer.
                    start = tl.base + blocks.state_block * stride
                    allowed[tl.region][start:start + tl.block_nbytes] = True
            self.buffers[p], self.allowed[p] = bufs, allowed


def _copy(src: np.ndarray, s: int, dst: np.ndarray, d: int, n: int, what: str) -> None:
    assert 0 <= s and s + n <= len(src), f"{what}: source [{s}, {s + n}) outside {len(src)} bytes"
    assert 0 <= d and d + n <= len(dst), f"{what}: dest [{d}, {d + n}) outside {len(dst)} bytes"
    assert n > 0, f"{what}: empty run"
    dst[d:d + n] = src[s:s + n]


def execute(plan: TransferPlan, sources: Sources, decode_bufs: list[np.ndarray]) -> None:
    scratch = {p: np.zeros(n, np.uint8) for p, n in plan.prefill_scratch_nbytes.items()}
    for p, cl in plan.prefill_reorder.items():
        for sr, so, dr, do, n in zip(cl.src_region, cl.src_offset, cl.dst_region, cl.dst_offset, cl.nbytes):
            assert sr != SCRATCH and dr == SCRATCH
            assert so + n <= len(sources.allowed[p][sr]) and sources.allowed[p][sr][so:so + n].all()
            _copy(sources.buffers[p][sr], so, scratch[p], do, n, f"reorder on P{p}")
    staging = np.zeros(plan.staging_nbytes, np.uint8)
    for p, sr, so, dr, do, n in zip(plan.src_rank, plan.src_region, plan.src_offset,
                                    plan.dst_region, plan.dst_offset, plan.nbytes):
        if sr == SCRATCH:
            src = scratch[p]
        else:
            src = sources.buffers[p][sr]
            assert so + n <= len(src) and sources.allowed[p][sr][so:so + n].all(), \
                f"read P{p} region {sr} [{so}, {so + n}) leaves the request's blocks"
        dst = staging if dr == SCRATCH else decode_bufs[dr]
        _copy(src, so, dst, do, n, f"read from P{p}")
    r = plan.decode_restore
    for sr, so, dr, do, n in zip(r.src_region, r.src_offset, r.dst_region, r.dst_offset, r.nbytes):
        assert sr == SCRATCH and dr != SCRATCH
        _copy(staging, so, decode_bufs[dr], do, n, "restore")


def check_rank(prefill: EngineLayout, decode: EngineLayout, decode_rank: int, pb: RequestBlocks,
               db: RequestBlocks, strategy, sources: Sources, rng: np.random.Generator
               ) -> TransferPlan:
    plan = plan_transfer(prefill, decode, decode_rank, pb, db, strategy)
    regions = decode.rank(decode_rank).regions
    bufs = [rng.integers(0, 256, r.nbytes, dtype=np.uint8) for r in regions]
    before = [b.copy() for b in bufs]
    execute(plan, sources, bufs)
    touched = [np.zeros(r.nbytes, bool) for r in regions]
    for e in held_elements(decode, decode_rank, db):
        got = bufs[e.region][e.offset:e.offset + e.itemsize].tobytes()
        assert got == coord_value(e.coord, e.itemsize), f"D{decode_rank} wrong value at {e.coord}"
        touched[e.region][e.offset:e.offset + e.itemsize] = True
    for i, (b, b0, t) in enumerate(zip(bufs, before, touched)):
        changed = np.flatnonzero((b != b0) & ~t)
        assert not len(changed), f"D{decode_rank} region {i} byte {changed[0]} changed outside the request"
    written = int(plan.nbytes[plan.dst_region != SCRATCH].sum()) + int(plan.decode_restore.nbytes.sum())
    assert written == plan.minimal_nbytes == sum(int(t.sum()) for t in touched)
    assert sum(g.nbytes for g in plan.groups) == plan.minimal_nbytes
    assert sum(g.descriptors for g in plan.groups) == plan.num_descriptors
    return plan


def check_all_ranks(prefill: EngineLayout, decode: EngineLayout, pb: RequestBlocks,
                    db: RequestBlocks, strategy, seed: int = 0) -> list[TransferPlan]:
    rng = np.random.default_rng(seed)
    sources = Sources(prefill, pb, rng)
    return [check_rank(prefill, decode, j, pb, db, strategy, sources, rng)
            for j in range(decode.tp_size)]
