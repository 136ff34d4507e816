"""The brute-force oracle for the planner (STYLE.md habit 6): element by element, through
`EngineLayout.offset` only, on tiny specs. Never used outside tests; far too slow for real ones.

An element's GLOBAL coordinate is (layer, tensor, segment, unit, element, inner, token): the
same on every rank that holds it, so replicas agree, and on the decode side it says which
value must land where.
"""
from __future__ import annotations

import itertools
import zlib
from typing import Iterator, NamedTuple

from pdbridge.spec import BLOCK, TOKEN, EngineLayout, TensorLayout

from .transfer_plan import RequestBlocks

Coord = tuple  # (layer, tensor, segment, unit, element, inner (tuple of (dim, index)), token)


class Element(NamedTuple):
    region: int
    offset: int         # bytes from the region's start
    itemsize: int
    coord: Coord


def held_elements(layout: EngineLayout, rank: int, blocks: RequestBlocks,
                  num_tokens: int | None = None) -> Iterator[Element]:
    """Every element of the request that `rank` holds: paged tensors for tokens
    [0, num_tokens) (default: the request's), state tensors at the state block (token -1)."""
    n = blocks.num_tokens if num_tokens is None else num_tokens
    bt = layout.block_tokens
    for tl in layout.rank(rank).tensors:
        t = tl.tensor
        if t.paged:
            positions = [(blocks.attn_blocks[i // bt], i % bt, i) for i in range(n)]
        else:
            positions = [(blocks.state_block, 0, -1)]
        for seg, unit, element, inner in _elements_of(tl):
            for block, token, global_token in positions:
                region, off = layout.offset(rank, t.layer, t.name, block, seg, unit, element,
                                            token, dict(inner))
                yield Element(region, off, tl.itemsize,
                              (t.layer, t.name, seg, unit, element, inner, global_token))


def _elements_of(tl: TensorLayout) -> Iterator[tuple[str, int, int, tuple]]:
    t = tl.tensor
    others = [(d.name, tl.axis(d.name).extent) for d in t.dims
              if d.name not in (BLOCK, TOKEN, t.sharded_dim)]
    for s, seg in enumerate(t.segments):
        u0, u1 = tl.seg_units[s]
        for unit in range(u0, u1):
            for element in range(seg.unit_size):
                for idx in itertools.product(*(range(e) for _, e in others)):
                    yield seg.name, unit, element, tuple((nm, i) for (nm, _), i in zip(others, idx))


class ElementCopy(NamedTuple):
    src_rank: int
    src_region: int
    src_offset: int
    dst_region: int
    dst_offset: int
    nbytes: int


def reference_reads(prefill: EngineLayout, decode: EngineLayout, decode_rank: int,
                    prefill_blocks: RequestBlocks, decode_blocks: RequestBlocks
                    ) -> list[ElementCopy]:
    """One copy per destination element, from the lowest prefill rank that holds it."""
    where: dict[Coord, tuple[int, int, int]] = {}
    for p in reversed(range(prefill.tp_size)):
        for e in held_elements(prefill, p, prefill_blocks):
            where[e.coord] = (p, e.region, e.offset)
    out = []
    for e in held_elements(decode, decode_rank, decode_blocks):
        if e.coord not in where:
            raise AssertionError(f"no prefill rank holds {e.coord}")
        p, region, off = where[e.coord]
        out.append(ElementCopy(p, region, off, e.region, e.offset, e.itemsize))
    return out


def coord_value(coord: Coord, itemsize: int) -> bytes:
    """A value that is a function of the global coordinate only (`itemsize` bytes)."""
    raw = repr(coord).encode()
    out = b""
    salt = 0
    while len(out) < itemsize:
        out += zlib.crc32(raw, salt).to_bytes(4, "little")
        salt += 1
    return out[:itemsize]
