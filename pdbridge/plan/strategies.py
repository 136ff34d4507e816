"""The `staging` and `permute` strategies (DESIGN.md section 4), as rewrites of the direct
state runs. Paged (attention) runs always stay direct.

Both rewrite only the SMALL state runs (under REWRITE_BELOW_NBYTES, e.g. the three conv
segments of a Mamba layer); large runs (SSM heads) already read at full speed and stay direct,
so no large run is copied twice.

staging: per (source rank, state region) read the span of the request's page that holds the
    small runs, in one descriptor, into the decode staging buffer, then copy each run out of it.
permute: each source rank first gathers the small runs this decode rank needs into its scratch,
    in destination order; the decode rank reads each source's scratch in one descriptor, then
    restores from staging (runs adjacent in the destination collapse into one copy).

Staging offsets are aligned (STAGE_ALIGN) so that a transport splitting runs at power-of-two
boundaries needs few pieces. NIXL's chunk grid restarts at every zone origin of a region
(RankLayout.zone_origins, transport/chunks.py), so a span lands in the staging buffer at the
offset, modulo STAGE_ALIGN, that it has from its zone's origin, not from its region's start:
aligned to the region, the span of nemotron-h-8b P=1 -> D=2 agreed with its zone only modulo
2 B and became ~110,000 chunk indices per decode rank (issue 13, item 2); aligned to the
zone, about ten.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .run_list import RunList
from .transfer_plan import SCRATCH, CopyList

_I32, _I64 = np.int32, np.int64
ZoneOrigins = Callable[[int, int], np.ndarray]     # (source rank, region) -> sorted origins

# REFERENCE.md (NIXL 1.5, same host): descriptors of 256 KiB and up run at memcpy speed; below
# that each costs about one system call. Only runs under this size are worth a local copy.
REWRITE_BELOW_NBYTES = 256 << 10
STAGE_ALIGN = 64 << 10


def split_small(state: RunList) -> tuple[RunList, RunList]:
    """(small runs to rewrite, large runs to keep direct)."""
    small = state.nbytes < REWRITE_BELOW_NBYTES
    return state.take(np.flatnonzero(small)), state.take(np.flatnonzero(~small))


def _aligned_bases(sizes: np.ndarray) -> np.ndarray:
    """Start of each piece in a buffer where pieces follow each other at STAGE_ALIGN."""
    padded = -(-sizes // STAGE_ALIGN) * STAGE_ALIGN
    return np.concatenate(([0], np.cumsum(padded)[:-1])).astype(_I64)


def _anchor_zones(rank: np.ndarray, region: np.ndarray, start: np.ndarray, end: np.ndarray,
                  zone_origins: ZoneOrigins) -> np.ndarray:
    """Per span, the origin of the zone holding most of its bytes: the transport cuts a span
    where it crosses an origin and chunks each piece from its own zone, so only one piece
    can be congruent with the staging buffer; make it the largest (few pages: a loop)."""
    out = np.empty(len(start), _I64)
    for i, (r, g, a, b) in enumerate(zip(rank.tolist(), region.tolist(), start.tolist(),
                                         end.tolist())):
        z = zone_origins(r, g)
        lo, hi = np.searchsorted(z, a, side="right") - 1, np.searchsorted(z, b, side="left")
        cuts = np.concatenate(([a], z[lo + 1:hi], [b]))
        out[i] = z[lo + int(np.argmax(np.diff(cuts)))]
    return out


@dataclass(frozen=True)
class StateRewrite:
    reads: RunList                          # replaces the direct state runs
    restore: RunList                        # decode: staging -> regions
    staging_nbytes: int
    reorder: dict[int, CopyList]            # prefill rank -> its gather into scratch
    scratch_nbytes: dict[int, int]


def staging(state: RunList, zone_origins: ZoneOrigins) -> StateRewrite:
    """`zone_origins(rank, region)`: the sorted zone origins of a source region."""
    if not len(state):
        return StateRewrite(RunList.empty(), RunList.empty(), 0, {}, {})
    key = state.src_rank.astype(_I64) * (1 << 32) + state.src_region
    pages, page_of_run = np.unique(key, return_inverse=True)
    rank, region = (pages >> 32).astype(_I32), (pages & 0xFFFFFFFF).astype(_I32)
    start = np.full(len(pages), np.iinfo(_I64).max, _I64)
    end = np.zeros(len(pages), _I64)
    np.minimum.at(start, page_of_run, state.src_offset)
    np.maximum.at(end, page_of_run, state.src_offset + state.nbytes)
    span = end - start                      # one read covering the page's runs
    # Each span lands at the offset modulo STAGE_ALIGN that it has from its zone's origin.
    lead = (start - _anchor_zones(rank, region, start, end, zone_origins)) % STAGE_ALIGN
    stage_base = _aligned_bases(span + lead) + lead
    first_group = np.full(len(pages), np.iinfo(_I32).max, _I32)
    np.minimum.at(first_group, page_of_run, state.group)
    reads = RunList(rank, region, start, np.full(len(pages), SCRATCH, _I32), stage_base, span,
                    first_group)
    restore = RunList(np.zeros(len(state), _I32), np.full(len(state), SCRATCH, _I32),
                      stage_base[page_of_run] + state.src_offset - start[page_of_run],
                      state.dst_region, state.dst_offset, state.nbytes, state.group)
    staging_nbytes = int(stage_base[-1] + span[-1])
    return StateRewrite(reads, restore.coalesced(), staging_nbytes, {}, {})


def permute(state: RunList) -> StateRewrite:
    if not len(state):
        return StateRewrite(RunList.empty(), RunList.empty(), 0, {}, {})
    runs = state.take(np.lexsort((state.dst_offset, state.dst_region, state.src_rank)))
    ranks, first, counts = np.unique(runs.src_rank, return_index=True, return_counts=True)
    csum = np.cumsum(runs.nbytes)
    rank_total = np.add.reduceat(runs.nbytes, first)
    rank_begin = np.repeat(csum[first] - runs.nbytes[first], counts)   # bytes before each rank
    scratch_off = csum - runs.nbytes - rank_begin        # offset in its source's scratch
    stage_base = _aligned_bases(rank_total)
    n = len(ranks)
    reads = RunList(ranks.astype(_I32), np.full(n, SCRATCH, _I32), np.zeros(n, _I64),
                    np.full(n, SCRATCH, _I32), stage_base, rank_total.astype(_I64),
                    runs.group[first])
    restore = RunList(np.zeros(len(runs), _I32), np.full(len(runs), SCRATCH, _I32),
                      np.repeat(stage_base, counts) + scratch_off, runs.dst_region,
                      runs.dst_offset, runs.nbytes, runs.group)
    reorder, scratch = {}, {}
    for p, a, c, total in zip(ranks.tolist(), first.tolist(), counts.tolist(), rank_total.tolist()):
        sl = np.arange(a, a + c)
        gather = RunList(np.zeros(c, _I32), runs.src_region[sl], runs.src_offset[sl],
                         np.full(c, SCRATCH, _I32), scratch_off[sl], runs.nbytes[sl], runs.group[sl])
        reorder[p] = gather.coalesced().as_copy_list()
        scratch[p] = int(total)
    return StateRewrite(reads, restore.coalesced(), int(stage_base[-1] + rank_total[-1]),
                        reorder, scratch)
