"""Box: the bytes one source supplies for one (tensor, segment, unit range), as byte runs.

On each side the box is affine in every axis except the token axis, whose offsets come from
the block table. We find the largest inner chunk contiguous on BOTH sides (merging innermost
axes while stride == chunk on both), split the token axis into runs where both sides advance
by exactly the chunk, and enumerate the remaining outer indices by broadcasting. No Python loop
touches tokens or blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BoxAxis:
    extent: int         # elements in the box along this axis
    src_stride: int     # bytes
    dst_stride: int     # bytes


def box_runs(axes: list[BoxAxis], itemsize: int, tok_src: np.ndarray, tok_dst: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src_offset, dst_offset, nbytes) of the box's runs.

    tok_src / tok_dst (int64, same length): byte offset of each token (state tensors: one
    entry, the state block) on each side, including the box origin.
    """
    chunk, rest = _inner_chunk(axes, itemsize)
    ts, td, tn = _token_runs(tok_src, tok_dst, chunk)
    outer_src, outer_dst = np.zeros(1, np.int64), np.zeros(1, np.int64)
    for a in rest:       # (outer..., this axis) grid, flattened in the same order on both sides
        idx = np.arange(a.extent, dtype=np.int64)
        outer_src = (outer_src[:, None] + idx * a.src_stride).ravel()
        outer_dst = (outer_dst[:, None] + idx * a.dst_stride).ravel()
    src = (ts[:, None] + outer_src[None, :]).ravel()
    dst = (td[:, None] + outer_dst[None, :]).ravel()
    return src, dst, np.repeat(tn, len(outer_src))


def _inner_chunk(axes: list[BoxAxis], itemsize: int) -> tuple[int, list[BoxAxis]]:
    """Largest chunk contiguous on both sides, and the axes left outside it."""
    chunk, rest = itemsize, [a for a in axes if a.extent > 1]
    merged = True
    while merged:
        merged = False
        for a in rest:
            if a.src_stride == chunk and a.dst_stride == chunk:
                chunk *= a.extent
                rest.remove(a)
                merged = True
                break
    return chunk, rest


def _token_runs(tok_src: np.ndarray, tok_dst: np.ndarray, chunk: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge consecutive tokens whose chunks are adjacent on both sides."""
    n = len(tok_src)
    if n <= 1:
        return tok_src, tok_dst, np.full(n, chunk, np.int64)
    adjacent = (np.diff(tok_src) == chunk) & (np.diff(tok_dst) == chunk)
    if not adjacent.any():
        return tok_src, tok_dst, np.full(n, chunk, np.int64)
    starts = np.flatnonzero(np.concatenate(([True], ~adjacent)))
    lengths = np.diff(np.append(starts, n))
    return tok_src[starts], tok_dst[starts], lengths.astype(np.int64) * chunk
