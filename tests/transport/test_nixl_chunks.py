"""ChunkTable / split_runs (the NIXL index scheme) against a byte-level oracle, without NIXL."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pdbridge.transport.chunks import ChunkTable, layout_zones, split_runs
from pdbridge.transport.transport import TransferError

sys.path.insert(0, os.path.dirname(__file__))


def descriptor_of(table: ChunkTable, index: int) -> tuple[int, int, int]:
    """(region, offset, nbytes) of one index, decoded from the table's rows (the oracle)."""
    rows = table.rows(list(table.region_base[:-1].tolist()), [0] * len(table.region_nbytes))
    counts = rows[:, 4].astype(np.int64)
    row = int(np.searchsorted(np.cumsum(counts), index, side="right"))
    k = index - int(np.cumsum(counts)[row] - counts[row])
    glob = int(rows[row, 0]) + k * int(rows[row, 3])    # addresses are the virtual region bases
    region = int(table.zone_region[int(np.searchsorted(table.zone_start, glob, side="right") - 1)])
    return region, glob - int(table.region_base[region]), int(rows[row, 1])


def replay(src: ChunkTable, dst: ChunkTable, si, di, src_bytes, dst_bytes):
    for s, d in zip(si.tolist(), di.tolist()):
        sr, so, sn = descriptor_of(src, s)
        dr, do, dn = descriptor_of(dst, d)
        assert sn == dn, "paired chunks differ in length"
        dst_bytes[dr][do:do + dn] = src_bytes[sr][so:so + sn]


@st.composite
def cases(draw):
    # Each side its own grain (a large registration coarsens one side only) and zone origins
    # anywhere, on or off either grain: origins off the grain once produced chunks below the
    # smallest level (issue 13).
    grain_s, grain_d = draw(st.sampled_from([1, 2, 8])), draw(st.sampled_from([1, 2, 8]))
    grain = max(grain_s, grain_d)
    sizes_s = [draw(st.integers(1, 40)) * grain * 8 for _ in range(draw(st.integers(1, 3)))]
    sizes_d = [draw(st.integers(1, 40)) * grain * 8 for _ in range(draw(st.integers(1, 3)))]
    def zones(n):
        extra = draw(st.lists(st.integers(1, n - 1), max_size=3)) if n > 1 else []
        return tuple(sorted({0} | set(extra)))
    zs = tuple(zones(n) for n in sizes_s)
    zd = tuple(zones(n) for n in sizes_d)
    runs = []
    for _ in range(draw(st.integers(1, 5))):
        r, q = draw(st.integers(0, len(sizes_s) - 1)), draw(st.integers(0, len(sizes_d) - 1))
        n = draw(st.integers(1, min(sizes_s[r], sizes_d[q]) // grain)) * grain
        a = draw(st.integers(0, (sizes_s[r] - n) // grain)) * grain
        b = draw(st.integers(0, (sizes_d[q] - n) // grain)) * grain
        runs.append((r, a, q, b, n))
    return (grain_s, grain_d), sizes_s, zs, sizes_d, zd, runs


def check_moves_exactly(src: ChunkTable, dst: ChunkTable, runs) -> None:
    rng = np.random.default_rng(0)
    sb = [rng.integers(0, 256, n, dtype=np.uint8) for n in src.region_nbytes]
    got = [np.zeros(n, np.uint8) for n in dst.region_nbytes]
    want = [np.zeros(n, np.uint8) for n in dst.region_nbytes]
    r, a, q, b, n = (np.asarray(c, np.int64) for c in zip(*runs))
    si, di = split_runs(src, r, a, dst, q, b, n)
    assert si.min() >= 0 and si.max() < src.num_descriptors
    assert di.min() >= 0 and di.max() < dst.num_descriptors
    for rr, aa, qq, bb, nn in runs:
        want[qq][bb:bb + nn] = sb[rr][aa:aa + nn]
    replay(src, dst, si, di, sb, got)
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_split_runs_moves_exactly_the_runs(case):
    (grain_s, grain_d), sizes_s, zs, sizes_d, zd, runs = case
    check_moves_exactly(ChunkTable(tuple(sizes_s), grain_s, zs),
                        ChunkTable(tuple(sizes_d), grain_d, zd), runs)


def test_zone_origin_off_the_grain():
    # Issue 13, reduced: an agent registering over 1 GiB gets a 4-byte grain; a layer-
    # interleaved conv slab starts 6 B after the previous one. Zone-relative offsets were
    # then 2 mod 4, their chunks 2 B, the level index -1: indices of other descriptors,
    # which NIXL refused as a length mismatch (NIXL_ERR_INVALID_PARAM).
    src = ChunkTable((4096,), 4, ((0, 6, 12, 138),))
    dst = ChunkTable((4096,), 2, ((0, 6, 12, 138),))
    check_moves_exactly(src, dst, [(0, 8, 0, 8, 64), (0, 140, 0, 1000, 2000),
                                   (0, 1200, 0, 144, 96)])


def test_a_chunk_outside_its_zone_levels_is_refused():
    t = ChunkTable((4096,), 4)
    with pytest.raises(TransferError, match="fits no level"):
        t.index(np.zeros(1, np.int64), np.zeros(1, np.int64), np.asarray([2], np.int64))


def test_congruent_runs_need_few_indices():
    # 1 MiB at offsets equal modulo 1 MiB: one chunk; shifted by 64 B: a head and tail only.
    t = ChunkTable((4 << 20,), 1)
    one = lambda v: np.asarray([v], np.int64)  # noqa: E731
    si, _ = split_runs(t, one(0), one(1 << 20), t, one(0), one(2 << 20), one(1 << 20))
    assert len(si) == 1
    si, _ = split_runs(t, one(0), one(64), t, one(0), one((2 << 20) + 64), one(1 << 20))
    assert len(si) <= 2 * 21


def test_zones_restore_congruence():
    # Same tensor at different bases (as TP changes a page's layout): zones make it one chunk.
    src = ChunkTable((1 << 20,), 1, ((0, 61440),))
    dst = ChunkTable((1 << 20,), 1, ((0, 30720),))
    one = lambda v: np.asarray([v], np.int64)  # noqa: E731
    si, _ = split_runs(src, one(0), one(61440 + 65536), dst, one(0), one(30720), one(65536))
    assert len(si) == 1


def test_empty_regions_have_no_rows():
    t = ChunkTable((4096, 0), 1)        # e.g. no scratch buffer: an empty last region
    assert t.rows([100, 0], [0, 0])[:, 0].min() == 100


def test_misaligned_run_is_refused():
    t = ChunkTable((4096,), 4)
    one = lambda v: np.asarray([v], np.int64)  # noqa: E731
    with pytest.raises(TransferError, match="grain"):
        split_runs(t, one(0), one(2), t, one(0), one(0), one(8))


def test_layout_zones_start_each_slab():
    from xfer_case import Case
    from pdbridge.spec.layout import ZONE_ALIGN
    p, _ = Case(1, 2).layouts()
    zones = layout_zones(p.rank(0))
    for tl in p.rank(0).tensors:
        if not tl.tensor.paged:
            page = tl.axes[0].stride
            want = {(tl.base + b * page) // ZONE_ALIGN * ZONE_ALIGN for b in range(p.num_blocks)}
            assert want <= set(zones[tl.region])


def test_empty_runs_off_alignment_emit_nothing():
    # Only empty runs took the greedy branch (offset 3 is off the common alignment): the
    # numpy path failed to unpack its pieces; it now emits no chunks.
    t = ChunkTable((4096,), 1)
    one = lambda v: np.asarray([v], np.int64)  # noqa: E731
    si, di = split_runs(t, one(0), one(3), t, one(0), one(3), one(0))
    assert len(si) == len(di) == 0
