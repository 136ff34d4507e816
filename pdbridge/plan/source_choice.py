"""Which prefill rank supplies each unit a decode rank needs (DESIGN.md section 2).

Every rule gives each rank one contiguous unit range per segment, so this is interval
intersection. Where several prefill ranks hold the same units (replication: GQA KV heads,
Mamba B/C groups with n_groups < TP), exactly one is picked:
  1. prefer ranks this tensor must read from anyway (the only holders of some unit), so a
     decode rank talks to as few prefill ranks as possible (fewer pages for `staging`);
  2. among those, the rank with the decode rank's own index if it is one (identical layouts
     then read rank j -> rank j, whole pages);
  3. otherwise round-robin by decode rank, which spreads replicated reads over the replicas.
"""
from __future__ import annotations

Range = tuple[int, int]


def elementary_intervals(need: Range, held: list[Range]) -> list[tuple[Range, list[int]]]:
    """Split `need` at every boundary of `held`; each piece with the ranks holding all of it."""
    lo, hi = need
    cuts = sorted({lo, hi} | {x for a, b in held for x in (a, b) if lo < x < hi})
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        holders = [p for p, (x, y) in enumerate(held) if x <= a and b <= y]
        if not holders:
            raise ValueError(f"no prefill rank holds units [{a}, {b})")
        out.append(((a, b), holders))
    return out


def choose_sources(need_per_segment: list[Range], held_per_segment: list[list[Range]],
                   decode_rank: int) -> list[list[tuple[int, Range]]]:
    """Per segment: [(prefill_rank, [u0, u1))] covering the needed range once, in unit order."""
    pieces = [elementary_intervals(n, h) for n, h in zip(need_per_segment, held_per_segment)]
    forced = {hs[0] for seg in pieces for _, hs in seg if len(hs) == 1}
    out = []
    for seg in pieces:
        chosen: list[tuple[int, Range]] = []
        for (a, b), holders in seg:
            p = _pick(holders, forced, decode_rank)
            if chosen and chosen[-1][0] == p and chosen[-1][1][1] == a:
                chosen[-1] = (p, (chosen[-1][1][0], b))
            else:
                chosen.append((p, (a, b)))
        out.append(chosen)
    return out


def _pick(holders: list[int], forced: set[int], decode_rank: int) -> int:
    pool = [p for p in holders if p in forced] or holders
    if decode_rank in pool:
        return decode_rank
    return pool[decode_rank % len(pool)]
