"""DirectReads: every byte run one decode rank needs, straight from a source into place.

This is the `direct` strategy before coalescing and the input of every other strategy.
Tensors whose layout differs only by region (the same tensor in every Mamba layer, say) are
planned once as a template and repeated over their layers with numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pdbridge.spec import BLOCK, TOKEN, EngineLayout, TensorLayout

from .box import BoxAxis, box_runs
from .run_list import RunList
from .source_choice import choose_sources
from .transfer_plan import RequestBlocks
from .validation import used_attn_blocks


class GroupInfo(NamedTuple):
    """One (layer, tensor, segment, source, unit range) slice of the decode shard (a
    NamedTuple: cheap to make, see ReadGroup)."""
    layer: int
    tensor: str
    segment: str
    prefill_rank: int
    global_range: tuple[int, int]   # [start, stop) in the segment's units
    nbytes: int                     # bytes of the decode shard this slice supplies


@dataclass(frozen=True)
class DirectReads:
    paged: RunList          # attention KV runs (group ids index `groups`)
    state: RunList          # recurrent / conv state runs
    groups: tuple[GroupInfo, ...]
    minimal_nbytes: int


@dataclass(frozen=True)
class _Template:
    """Region-relative runs of one tensor structure, and the slices they come from."""
    src_rank: np.ndarray
    src_offset: np.ndarray
    dst_offset: np.ndarray
    nbytes: np.ndarray
    local_group: np.ndarray
    slices: tuple[tuple[str, int, tuple[int, int], int], ...]   # (segment, p, range, nbytes)


class _TokenOffsets:
    """Byte offset of every transferred token (or of the state block) on one side, cached by
    the (block stride, token stride) pair that decides it."""

    def __init__(self, layout: EngineLayout, blocks: RequestBlocks):
        self.kernel_block, self.kernel_token = layout.token_slots(
            used_attn_blocks(layout, blocks), blocks.num_tokens)
        self.state_block = blocks.state_block
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def of(self, tl: TensorLayout) -> np.ndarray:
        block_stride = tl.axis(BLOCK).stride
        if not tl.tensor.paged:
            return np.array([self.state_block * block_stride], dtype=np.int64)
        key = (block_stride, tl.axis(TOKEN).stride)
        if key not in self._cache:
            self._cache[key] = self.kernel_block * key[0] + self.kernel_token * key[1]
        return self._cache[key]


def direct_reads(prefill: EngineLayout, decode: EngineLayout, decode_rank: int,
                 prefill_blocks: RequestBlocks, decode_blocks: RequestBlocks) -> DirectReads:
    d_rank = decode.rank(decode_rank)
    p_ranks = [prefill.rank(p) for p in range(prefill.tp_size)]
    tok_p, tok_d = _TokenOffsets(prefill, prefill_blocks), _TokenOffsets(decode, decode_blocks)
    batches: dict[tuple, list[TensorLayout]] = {}
    for tl in d_rank.tensors:
        sources = tuple(pr.tensor(*tl.key) for pr in p_ranks)
        key = (_structure(tl), tuple(_structure(s) for s in sources))
        batches.setdefault(key, []).append(tl)
    paged, state, groups = [], [], []
    for tls in batches.values():
        rep = tls[0]
        sources = [pr.tensor(*rep.key) for pr in p_ranks]
        tpl = _template(rep, sources, tok_p, tok_d, decode_rank)
        # A tensor's region index is the same on every prefill rank (same tensor groups).
        runs = _repeat(tpl, tls, [p_ranks[0].tensor(*tl.key).region for tl in tls], len(groups))
        groups.extend(GroupInfo(tl.tensor.layer, tl.tensor.name, seg, p, rng, nb)
                      for tl in tls for seg, p, rng, nb in tpl.slices)
        (paged if rep.tensor.paged else state).append(runs)
    return DirectReads(RunList.concat(paged), RunList.concat(state), tuple(groups),
                       minimal_nbytes(decode, decode_rank, decode_blocks.num_tokens))


def minimal_nbytes(decode: EngineLayout, decode_rank: int, num_tokens: int) -> int:
    """Bytes of one request's decode shard on this rank: what a perfect plan moves."""
    return sum(_shard_nbytes(tl, num_tokens, decode) for tl in decode.rank(decode_rank).tensors)


def _structure(tl: TensorLayout) -> tuple:
    """Everything about a tensor's bytes except its layer and region."""
    t = tl.tensor
    return (t.name, t.dims, t.segments, t.dtype, t.paged, tl.base, tl.axes, tl.seg_units,
            tl.seg_offsets)


def _shard_nbytes(tl: TensorLayout, num_tokens: int, layout: EngineLayout) -> int:
    if tl.tensor.paged:
        return tl.block_nbytes // layout.kernel_block_tokens * num_tokens
    return tl.block_nbytes


def _template(dst: TensorLayout, sources: list[TensorLayout], tok_p: _TokenOffsets,
              tok_d: _TokenOffsets, decode_rank: int) -> _Template:
    t = dst.tensor
    if t.paged and len(tok_d.kernel_block) == 0:
        return _Template(*(np.zeros(0, np.int64) for _ in range(5)), ())
    need = list(dst.seg_units)
    held = [[s.seg_units[i] for s in sources] for i in range(len(t.segments))]
    choice = choose_sources(need, held, decode_rank)
    cols: list[list[np.ndarray]] = [[], [], [], [], []]
    slices = []
    for i, seg in enumerate(t.segments):
        for p, (u0, u1) in choice[i]:
            src = sources[p]
            src_off, dst_off, nbytes = _segment_box(src, dst, i, u0, u1, tok_p.of(src), tok_d.of(dst))
            for col, v in zip(cols, (np.full(len(nbytes), p), src_off, dst_off, nbytes,
                                     np.full(len(nbytes), len(slices)))):
                col.append(v)
            slices.append((seg.name, p, (u0, u1), int(nbytes.sum())))
    arrays = [np.concatenate(c).astype(np.int64) for c in cols]
    return _Template(*arrays, tuple(slices))


def _segment_box(src: TensorLayout, dst: TensorLayout, seg: int, u0: int, u1: int,
                 tok_src: np.ndarray, tok_dst: np.ndarray):
    """Runs for units [u0, u1) of segment `seg`, from tensor `src` into tensor `dst`."""
    t = dst.tensor
    unit_size = t.segments[seg].unit_size
    sharded = t.sharded_dim
    e_src = src.seg_offsets[seg] + (u0 - src.seg_units[seg][0]) * unit_size
    e_dst = dst.seg_offsets[seg] + (u0 - dst.seg_units[seg][0]) * unit_size
    axes = [BoxAxis((u1 - u0) * unit_size if a.name == sharded else a.extent,
                    src.axis(a.name).stride, a.stride)
            for a in dst.axes if a.name not in (BLOCK, TOKEN)]
    origin_src = src.base + e_src * src.axis(sharded).stride
    origin_dst = dst.base + e_dst * dst.axis(sharded).stride
    return box_runs(axes, dst.itemsize, tok_src + origin_src, tok_dst + origin_dst)


def _repeat(tpl: _Template, tls: list[TensorLayout], src_regions: list[int],
            group_base: int) -> RunList:
    """The template's runs once per layer: only regions and group ids change."""
    n_layers, n_runs, n_groups = len(tls), len(tpl.nbytes), len(tpl.slices)
    dst_regions = np.array([tl.region for tl in tls], dtype=np.int32)
    layer_group = group_base + np.arange(n_layers, dtype=np.int64) * n_groups
    return RunList(
        src_rank=np.tile(tpl.src_rank, n_layers).astype(np.int32),
        src_region=np.repeat(np.array(src_regions, dtype=np.int32), n_runs),
        src_offset=np.tile(tpl.src_offset, n_layers),
        dst_region=np.repeat(dst_regions, n_runs),
        dst_offset=np.tile(tpl.dst_offset, n_layers),
        nbytes=np.tile(tpl.nbytes, n_layers),
        group=(np.repeat(layer_group, n_runs) + np.tile(tpl.local_group, n_layers)).astype(np.int32),
    )
