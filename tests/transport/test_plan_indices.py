"""What NIXL is handed per strategy: the chunk indices (chunks.py) of real-size plans on
registrations zoned as a PrefillRank or DecodeRank registers them, counted without NIXL.

Staging reads one span per source page into the staging buffer; it is fast only if the span
lands congruent with its source zone. Aligned to the region instead (issue 13, item 2), its
span on nemotron-h-8b P=1 -> D=2 agreed with the zone modulo 2 B only: ~110,000 indices per
decode rank against direct's ~100, and 0.4-0.6 of the single-read limit.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from pdbridge.plan import SCRATCH, RequestBlocks, TransferPlan, plan_transfer
from pdbridge.spec import CacheConfig, EngineLayout, RankLayout, get_preset
from pdbridge.transport.chunks import ChunkTable, layout_zones, split_runs

TOKENS = 512


def layout(model: str, tp: int, interleave: bool, conv: str) -> EngineLayout:
    """The bench's layout (bench_transfer.BenchConfig.layouts): TOKENS plus a state block."""
    cache = CacheConfig(num_blocks=1, conv_layout=conv, attn_layout="heads_across_blocks",
                        page_padding=True, layer_interleave=interleave)
    blocks = -(-TOKENS // EngineLayout(get_preset(model), tp, cache).block_tokens) + 1
    return EngineLayout(get_preset(model), tp, CacheConfig(
        num_blocks=blocks, conv_layout=conv, attn_layout="heads_across_blocks",
        page_padding=True, layer_interleave=interleave))


def request(lay: EngineLayout) -> RequestBlocks:
    return RequestBlocks(TOKENS, tuple(range(lay.num_blocks - 1)), lay.num_blocks - 1)


def table(rank: RankLayout, scratch_nbytes: int, grain: int) -> ChunkTable:
    """As NixlTransport.register_regions builds it: layout zones, scratch last."""
    sizes = tuple(r.nbytes for r in rank.regions) + (max(scratch_nbytes, 1),)
    return ChunkTable(sizes, grain, layout_zones(rank) + ((0,),))


def num_indices(plan: TransferPlan, p: EngineLayout, d: EngineLayout, grain: int) -> int:
    dst = table(d.rank(plan.decode_rank), plan.staging_nbytes, grain)
    total = 0
    for r in plan.source_ranks():
        i = plan.src_rank == r
        src = table(p.rank(r), plan.prefill_scratch_nbytes.get(r, 0), grain)
        sr = np.where(plan.src_region[i] == SCRATCH, len(src.region_nbytes) - 1, plan.src_region[i])
        dr = np.where(plan.dst_region[i] == SCRATCH, len(dst.region_nbytes) - 1, plan.dst_region[i])
        si, _ = split_runs(src, sr, plan.src_offset[i], dst, dr, plan.dst_offset[i], plan.nbytes[i])
        total += len(si)
    return total


CASES = [("nemotron-h-8b", p, d, il, conv) for (p, d), il, conv in itertools.product(
    [(1, 2), (2, 1), (1, 8), (4, 2)], [True, False], ["DS", "SD"])]
CASES += [("granite-4.0-h-small", 1, 4, True, "DS"), ("qwen3-next-80b-a3b", 2, 4, True, "SD")]


@pytest.mark.parametrize("model,prefill_tp,decode_tp,interleave,conv", CASES)
def test_staging_needs_no_more_indices_than_direct(model, prefill_tp, decode_tp, interleave, conv):
    p, d = (layout(model, t, interleave, conv) for t in (prefill_tp, decode_tp))
    # grain 2: up to 1 GiB registered per agent; 4: up to 2 GiB (a coarser grid).
    for rank, grain in itertools.product(range(decode_tp), (2, 4)):
        counts = {s: num_indices(plan_transfer(p, d, rank, request(p), request(d), s), p, d, grain)
                  for s in ("direct", "staging")}
        assert counts["staging"] <= counts["direct"], (rank, grain, counts)
