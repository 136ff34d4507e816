"""The `staging` and `permute` strategies (DESIGN.md section 4), as rewrites of the direct
state runs. Paged (attention) runs always stay direct.

staging: per (source rank, state region) read the used part of the request's page in one
    descriptor into the decode staging buffer, then copy each direct run out of it.
permute: each source rank first gathers the runs this decode rank needs into its scratch, in
    destination order; the decode rank reads each source's scratch in one descriptor, then
    restores from staging (runs adjacent in the destination collapse into one copy).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pdbridge.spec import BLOCK, EngineLayout

from .run_list import RunList
from .transfer_plan import SCRATCH, CopyList

_I32, _I64 = np.int32, np.int64


@dataclass(frozen=True)
class StateRewrite:
    reads: RunList                          # replaces the direct state runs
    restore: RunList                        # decode: staging -> regions
    staging_nbytes: int
    reorder: dict[int, CopyList]            # prefill rank -> its gather into scratch
    scratch_nbytes: dict[int, int]


def _page_spans(prefill: EngineLayout, rank: int) -> dict[int, tuple[int, int]]:
    """Per state region of one rank: (page stride, bytes used by its tensors in a page)."""
    spans: dict[int, tuple[int, int]] = {}
    for tl in prefill.rank(rank).tensors:
        if tl.tensor.paged:
            continue
        stride, used = spans.get(tl.region, (tl.axis(BLOCK).stride, 0))
        spans[tl.region] = (stride, max(used, tl.base + tl.block_nbytes))
    return spans


def staging(state: RunList, prefill: EngineLayout, state_block: int) -> StateRewrite:
    if not len(state):
        return StateRewrite(RunList.empty(), RunList.empty(), 0, {}, {})
    key = state.src_rank.astype(_I64) * (1 << 32) + state.src_region
    pages, page_of_run = np.unique(key, return_inverse=True)
    spans = {p: _page_spans(prefill, p) for p in np.unique(state.src_rank).tolist()}
    rank, region = (pages >> 32).astype(_I32), (pages & 0xFFFFFFFF).astype(_I32)
    stride_used = np.array([spans[p][r] for p, r in zip(rank.tolist(), region.tolist())], _I64)
    start = state_block * stride_used[:, 0]
    used = stride_used[:, 1]
    stage_base = np.concatenate(([0], np.cumsum(used)[:-1])).astype(_I64)
    first_group = np.full(len(pages), np.iinfo(_I32).max, _I32)
    np.minimum.at(first_group, page_of_run, state.group)
    reads = RunList(rank, region, start, np.full(len(pages), SCRATCH, _I32), stage_base, used,
                    first_group)
    restore = RunList(np.zeros(len(state), _I32), np.full(len(state), SCRATCH, _I32),
                      stage_base[page_of_run] + state.src_offset - start[page_of_run],
                      state.dst_region, state.dst_offset, state.nbytes, state.group)
    return StateRewrite(reads, restore.coalesced(), int(used.sum()), {}, {})


def permute(state: RunList) -> StateRewrite:
    if not len(state):
        return StateRewrite(RunList.empty(), RunList.empty(), 0, {}, {})
    runs = state.take(np.lexsort((state.dst_offset, state.dst_region, state.src_rank)))
    ranks, first, counts = np.unique(runs.src_rank, return_index=True, return_counts=True)
    csum = np.cumsum(runs.nbytes)
    rank_total = np.add.reduceat(runs.nbytes, first)
    rank_begin = np.repeat(csum[first] - runs.nbytes[first], counts)   # bytes before each rank
    scratch_off = csum - runs.nbytes - rank_begin        # offset in its source's scratch
    stage_base = np.concatenate(([0], np.cumsum(rank_total)[:-1])).astype(_I64)
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
    return StateRewrite(reads, restore.coalesced(), int(rank_total.sum()), reorder, scratch)
