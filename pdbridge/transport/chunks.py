"""ChunkTable: arbitrary byte runs as indices into descriptor lists prepared once.

NIXL's fast path (`make_prepped_xfer`) takes two lists of indices into descriptor lists that
were prepared once (`prep_xfer_dlist`) and pairs them entry by entry; paired descriptors
must have equal lengths. Our plans, though, read arbitrary runs: (region, offset, nbytes)
whose boundaries come from head ranges, conv segments, page paddings and per-request scratch
offsets. A fixed scheme must therefore let any aligned run be written as a few indices.

The scheme: every region is prepared at power-of-two *levels*: level k is the list of all
chunks of `grain * 2**k` bytes at multiples of that size (one compressed Nx5 row per
(region, level) for prep_xfer_dlist, so preparation costs O(regions * levels), measured at
a few microseconds, whatever the region size). A run from source offset a to destination
offset b of n bytes is cut into chunks that are aligned on *both* sides: with
M = the largest power of two dividing (a - b) (capped by the largest level both regions
have), the run is a head of at most log2(M / grain) shrinking-alignment chunks, then n / M
chunks of M bytes, then a tail of at most log2(M / grain) chunks. make_prepped_xfer merges
descriptors adjacent on both sides (REFERENCE.md, NIXL 1.5), so every run still goes on the
wire as one descriptor; what the scheme costs is indices, about 0.04 us each.

Why not one descriptor per (layer, block, segment) as established connectors do: that fixes
the run structure at preparation time (a heterogeneous-TP pair, a staging buffer or a
permute scratch each need their own lists) and its index count grows with blocks. Why not a
fixed chunk: a fine chunk makes every large run thousands of indices, a coarse one cannot
express conv segment boundaries. With levels, the index count of a run is
O(log(n) + n / M): whenever source and destination offsets agree modulo a large power of two
(whole pages, head-major KV with contiguous blocks, 4 KiB-aligned scratch offsets) a
multi-megabyte run is a handful of indices. Runs whose offsets differ by an odd multiple of
a small power of two degrade gracefully to n / M indices; still correct, never rebuilt.

Offsets count from *zone origins*, not region starts: a zone is where one tensor slab starts
(a state page's conv or SSM tensor, a (kv, head) row of head-major KV;
`RankLayout.zone_origins`, via `layout_zones`). Origins are rounded down to ZONE_ALIGN
(64 B, or the grain if larger) on every table, so that zone-relative offsets stay on the
grain and two tables of different grains agree on where zones start.
The same tensor sits at different bases on engines of different TP (a TP=1 SSM tensor at
61440 B into its page, a TP=2 one at 30720 B), so region-relative offsets agree only modulo
2 KiB, while zone-relative ones agree modulo the head range: measured on nemotron-h-8b
P=1 -> D=2, 25,000 indices per decode rank without zones, 236 with them. Runs crossing a
zone origin are cut there first (NIXL merges the pieces back).

`grain` must divide every offset and length; it is the smallest power of two that keeps all
indices of one list below 2**31 (make_prepped_xfer takes int32), i.e. 1 byte up to 1 GiB
of registered memory. Runs not aligned to the grain raise TransferError.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pdbridge.spec.layout import ZONE_ALIGN

from .transport import TransferError

MAX_INDEX = 2**31 - 1
MAX_CHUNK_NBYTES = 1 << 30      # the largest level; bigger runs are several such chunks


def default_grain(total_nbytes: int) -> int:
    """Smallest power-of-two grain whose level lists stay within int32 indices."""
    grain = 1
    while 2 * total_nbytes // grain > MAX_INDEX // 2:
        grain *= 2
    return grain


def _log2(x: np.ndarray) -> np.ndarray:
    """log2 of exact powers of two (int64 array)."""
    return np.round(np.log2(x.astype(np.float64))).astype(np.int64)


def _high_pow2(x: np.ndarray) -> np.ndarray:
    """The largest power of two <= x, for x >= 1."""
    return np.left_shift(np.int64(1), np.floor(np.log2(x.astype(np.float64))).astype(np.int64))


def _low_bit(x: np.ndarray) -> np.ndarray:
    return x & -x


@dataclass(frozen=True, eq=False)
class ChunkTable:
    """The level layout of one descriptor list: region lengths (scratch last), the zone
    origins of each region (offsets where the chunk grid restarts; 0 always) and the grain."""
    region_nbytes: tuple[int, ...]
    grain_nbytes: int
    zones: tuple[tuple[int, ...], ...] = ()     # per region; () means one zone per region

    def __post_init__(self):
        g = self.grain_nbytes
        if g < 1 or g & (g - 1):
            raise TransferError(f"grain_nbytes must be a power of two, got {g}")
        zones = self.zones or tuple((0,) for _ in self.region_nbytes)
        if len(zones) != len(self.region_nbytes):
            raise TransferError(f"{len(zones)} zone lists for {len(self.region_nbytes)} regions")
        region_base = np.concatenate(([0], np.cumsum(self.region_nbytes, dtype=np.int64)))
        # The grid may restart only on the grain: from an origin off it (a layer-interleaved
        # slab 6 B from the last, once a large registration makes the grain 4 B) every
        # zone-relative offset is off the grain too and chunks fall below the smallest level
        # (issue 13: NIXL_ERR_INVALID_PARAM, "length mismatch"). Both sides of a read must
        # round alike although their grains differ, hence ZONE_ALIGN, which spec origins
        # already keep; a grain above it (registrations over 32 GiB) rounds further.
        snap = max(ZONE_ALIGN, g)
        starts, lengths, owner = [], [], []
        for r, (n, zs) in enumerate(zip(self.region_nbytes, zones)):
            zs = np.asarray(zs, np.int64)
            if len(zs) == 0 or zs[0] != 0 or (np.diff(zs) <= 0).any() or (n and zs[-1] >= n):
                raise TransferError(f"region {r}: zone origins must start at 0 and increase "
                                    f"within its {n} bytes")
            zs = np.unique(zs // snap * snap)
            starts.append(region_base[r] + zs)
            lengths.append(np.diff(np.append(zs, n)))
            owner.append(np.full(len(zs), r, np.int64))
        start, length = np.concatenate(starts), np.concatenate(lengths)
        levels = np.array([self._num_levels(int(n)) for n in length], np.int64)
        counts = [[int(n) // (g << k) for k in range(lv)] for n, lv in zip(length, levels)]
        base = np.zeros((len(levels), max(int(levels.max(initial=0)), 1)), np.int64)
        flat = np.cumsum([0] + [c for cs in counts for c in cs])
        i = 0
        for z, cs in enumerate(counts):
            base[z, :len(cs)] = flat[i:i + len(cs)]
            i += len(cs)
        if flat[-1] > MAX_INDEX:
            raise TransferError(f"{flat[-1]} descriptors exceed int32 indices; use a grain of "
                                f"at least {default_grain(sum(self.region_nbytes))} bytes")
        for name, v in (("region_base", region_base), ("zone_start", start), ("zone_nbytes", length),
                        ("zone_region", np.concatenate(owner)),
                        ("levels", levels), ("base", base), ("num_descriptors", int(flat[-1]))):
            object.__setattr__(self, name, v)

    def _num_levels(self, nbytes: int) -> int:
        k = 0
        while (self.grain_nbytes << k) <= min(nbytes, MAX_CHUNK_NBYTES):
            k += 1
        return k

    def zone_of(self, region: np.ndarray, offset: np.ndarray) -> np.ndarray:
        pos = self.region_base[region] + offset
        return np.searchsorted(self.zone_start, pos, side="right") - 1

    def max_chunk(self, zone: np.ndarray) -> np.ndarray:
        """Largest chunk (bytes) a zone holds, per entry; 0 where it has no level."""
        lv = self.levels[zone]
        return np.where(lv > 0, np.left_shift(np.int64(self.grain_nbytes), np.maximum(lv - 1, 0)), 0)

    def rows(self, addrs: list[int], devices: list[int]) -> np.ndarray:
        """Nx5 (addr, len, device, stride, count) rows, one per (zone, level), in index order."""
        out = []
        for z, (r, st, n) in enumerate(zip(self.zone_region.tolist(), self.zone_start.tolist(),
                                           self.zone_nbytes.tolist())):
            addr = addrs[r] + st - int(self.region_base[r])
            for k in range(int(self.levels[z])):
                c = self.grain_nbytes << k
                out.append((addr, c, devices[r], c, n // c))
        return np.asarray(out, np.uint64).reshape(-1, 5)

    def index(self, zone: np.ndarray, rel_offset: np.ndarray, chunk: np.ndarray) -> np.ndarray:
        level = _log2(chunk) - int(np.log2(self.grain_nbytes))
        # A level outside the zone's would index another zone's (or no) descriptors, which
        # NIXL reports only as a length mismatch: refuse it here, naming the chunk.
        bad = (level < 0) | (level >= self.levels[zone]) | (rel_offset % chunk != 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise TransferError(f"chunk of {int(chunk[i])} bytes at zone offset "
                                f"{int(rel_offset[i])} fits no level of a "
                                f"{self.grain_nbytes}-byte-grain zone")
        return self.base[zone, level] + rel_offset // chunk


def _cut_at_zones(src: ChunkTable, sr: np.ndarray, a: np.ndarray, dst: ChunkTable,
                  dr: np.ndarray, b: np.ndarray, n: np.ndarray):
    """Split runs where either side crosses a zone origin: (run id, position in run, length)."""
    cuts = [np.zeros(len(n), np.int64)]
    runs = [np.arange(len(n), dtype=np.int64)]
    for t, region, off in ((src, sr, a), (dst, dr, b)):
        g = t.region_base[region] + off
        lo = np.searchsorted(t.zone_start, g, side="right")
        hi = np.searchsorted(t.zone_start, g + n, side="left")
        cnt = np.maximum(hi - lo, 0)
        if cnt.sum():
            rid = np.repeat(np.arange(len(n), dtype=np.int64), cnt)
            k = np.arange(len(rid)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            runs.append(rid)
            cuts.append(t.zone_start[np.repeat(lo, cnt) + k] - g[rid])
    rid, pos = np.concatenate(runs), np.concatenate(cuts)
    order = np.lexsort((pos, rid))
    rid, pos = rid[order], pos[order]
    keep = np.ones(len(rid), bool)
    keep[1:] = (rid[1:] != rid[:-1]) | (pos[1:] != pos[:-1])
    rid, pos = rid[keep], pos[keep]
    end = np.append(pos[1:], 0)
    last = np.append(rid[1:] != rid[:-1], True)
    end = np.where(last, n[rid], end)
    return rid, pos, end - pos


def split_runs(src: ChunkTable, src_region: np.ndarray, src_offset: np.ndarray,
               dst: ChunkTable, dst_region: np.ndarray, dst_offset: np.ndarray,
               nbytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(src indices, dst indices), int32, pairing equal chunks in run order.

    Region arguments index the tables' regions (scratch already mapped to the last one).
    """
    a, b, n = (np.asarray(v, np.int64) for v in (src_offset, dst_offset, nbytes))
    sr, dr = np.asarray(src_region, np.int64), np.asarray(dst_region, np.int64)
    grain = max(src.grain_nbytes, dst.grain_nbytes)
    bad = (a % grain != 0) | (b % grain != 0) | (n % grain != 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise TransferError(f"run {i} (src offset {int(a[i])}, dst offset {int(b[i])}, "
                            f"{int(n[i])} bytes) is not aligned to the {grain}-byte grain")
    rid, pos, n = _cut_at_zones(src, sr, a, dst, dr, b, n)
    sr, dr, a, b = sr[rid], dr[rid], a[rid] + pos, b[rid] + pos
    sz, dz = src.zone_of(sr, a), dst.zone_of(dr, b)
    a = a - (src.zone_start[sz] - src.region_base[sr])       # zone-relative offsets
    b = b - (dst.zone_start[dz] - dst.region_base[dr])
    cap = np.minimum(src.max_chunk(sz), dst.max_chunk(dz))
    if (cap < grain).any():
        raise TransferError("a run targets a zone smaller than the grain")
    pr, pos, chunk = _pieces(a, b, n, cap)
    si = src.index(sz[pr], a[pr] + pos, chunk)
    di = dst.index(dz[pr], b[pr] + pos, chunk)
    return si.astype(np.int32), di.astype(np.int32)


def _pieces(a: np.ndarray, b: np.ndarray, n: np.ndarray, cap: np.ndarray):
    """Chunks aligned on both sides, in run order: (run, position in run, chunk bytes).

    With m the common alignment, a run is: the set bits of h = (-a) mod m, ascending (each
    lands aligned, since a + h is m-aligned), then n // m chunks of m, then the set bits of
    the remainder, descending. A constant number of numpy calls whatever the runs; runs too
    short to reach alignment take the greedy loop.
    """
    diff = _low_bit(a ^ b)
    m = np.where(diff == 0, cap, np.minimum(diff, cap))      # common alignment of both sides
    run = np.arange(len(n), dtype=np.int64)
    h = (-a) % m
    short = n < h
    long_ = ~short
    pieces = [_greedy(run[short], a[short], n[short])] if short.any() else []
    rl, hl, ml = run[long_], h[long_], m[long_]
    rest = n[long_] - hl
    cnt, tail = rest // ml, rest % ml
    pieces.append(_bits(rl, hl, np.zeros_like(hl), ascending=True))
    if cnt.sum():
        i = np.repeat(np.arange(len(rl)), cnt)
        k = np.arange(len(i), dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        pieces.append((rl[i], hl[i] + k * ml[i], ml[i]))
    pieces.append(_bits(rl, tail, hl + cnt * ml, ascending=False))
    pr, pos, chunk = (np.concatenate(p) for p in zip(*pieces))
    order = np.lexsort((pos, pr))
    return pr[order], pos[order], chunk[order]


def _bits(run: np.ndarray, value: np.ndarray, start: np.ndarray, ascending: bool):
    """One chunk per set bit of `value`, laid end to end from `start` (per run)."""
    k = np.arange(MAX_CHUNK_NBYTES.bit_length(), dtype=np.int64)
    if not ascending:
        k = k[::-1]
    rows, col = np.nonzero((value[:, None] >> k[None, :]) & 1)
    size = np.left_shift(np.int64(1), k[col])
    if not len(size):
        return run[rows], size.copy(), size
    before = np.cumsum(size) - size                              # bytes before each piece
    first = np.minimum(np.searchsorted(rows, np.arange(len(value))), len(size) - 1)
    pos = start[rows] + before - before[first][rows]
    return run[rows], pos, size


def _greedy(run: np.ndarray, a: np.ndarray, n: np.ndarray):
    """Runs that never reach their common alignment: chunks of the current alignment."""
    out: list[tuple[np.ndarray, ...]] = []
    x, rem, idx = np.zeros_like(n), n.copy(), np.arange(len(n))
    while (rem > 0).any():
        i = idx[rem > 0]
        c = np.minimum(_low_bit(a[i] + x[i]), _high_pow2(rem[i]))
        out.append((run[i], x[i].copy(), c))
        x[i] += c
        rem[i] -= c
    if not out:                 # only empty runs: nothing to emit (zip(*[]) has no columns)
        return run[:0], n[:0], n[:0]
    return tuple(np.concatenate(p) for p in zip(*out))


def layout_zones(rank_layout) -> tuple[tuple[int, ...], ...]:
    """Zone origins of every region of one EngineLayout rank (RankLayout.zone_origins, the
    one definition the staging planner also aligns to), as register_regions takes them."""
    return tuple(tuple(z.tolist()) for z in rank_layout.zone_origins)
