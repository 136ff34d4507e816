"""BlockTable: every read a `direct` plan can make, as descriptor rows prepared once per
layout pair, and a request's reads as indices into them (BlockReads).

A direct plan's runs are the kept one-block runs of plan_cache._BlockRuns moved by the
request's block ids: run r of a whole block at block id b starts at offset_r + b x step_r on
each side, run r of a last block's token row t at its own offset + b x step_r, a state run at
its offset + state block x its step. So the runs any request can read are known once the
layouts are: one row (region, offset, nbytes, stride, count) per kept run, per token row of a
token run, and per side, whose `count` entries lie `stride` apart; NIXL prepares such rows
once (prep_xfer_dlist takes them compressed, as the chunk tables'). A request's reads from one
prefill rank are then two index lists, row start + block id on each side, a few numpy calls;
make_prepped_xfer pairs them and merges descriptors adjacent on both sides (rows are ordered
run-major, so a run's consecutive blocks and token rows are neighbours in the lists).

Per pull that replaces the plan (moving, sorting, merging, groups), the read list, the range
checks and the descriptors built twice on each side (issue 10: a rank woken for a pull runs
on a cold core, which pays per call; side by side in one process, a cold pull of the default
model's P TP=1 -> D TP=2 requests took 0.68 instead of 1.33 ms).

Safety: the transport checks each row's whole extent against its region once, when it
prepares the rows; a request's block ids are checked by check_request (0 <= id < num_blocks),
so row start + id stays inside the row. `runs()` expands indices back to runs: LocalTransport
reads through it, and tests compare its coalesced runs with plan_transfer's DIRECT plan.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .run_list import RunList
from .transfer_plan import RequestBlocks, Strategy

ROW_FIELDS = ("region", "offset", "nbytes", "stride", "count")     # a row's columns
REGION, OFFSET, NBYTES, STRIDE, COUNT = range(5)


@dataclass(frozen=True)
class BlockRows:
    """The rows of one (layout pair, decode rank, prefill rank): `remote` on the prefill
    rank's regions, `local` on the decode rank's, row i of one pairing with row i of the
    other (entry k of a row with entry k). int64 (N, 5) arrays, ROW_FIELDS; `key` names them
    for a transport that prepares them once."""
    key: tuple
    prefill_rank: int
    remote: np.ndarray
    local: np.ndarray
    group: np.ndarray               # each row's plan group (reports and tests)

    def runs(self, indices: np.ndarray) -> RunList:
        """The runs the index pairs (indices[0] remote, indices[1] local) read, in order:
        the reference expansion of what make_prepped_xfer pairs."""
        sides = []
        for rows, idx in ((self.remote, indices[0]), (self.local, indices[1])):
            first = _row_starts(rows)
            row = np.searchsorted(first, idx, side="right") - 1
            sides.append((row, rows[row, REGION], rows[row, OFFSET] +
                          (idx - first[row]) * rows[row, STRIDE], rows[row, NBYTES]))
        (row, src_region, src_offset, nbytes), (_, dst_region, dst_offset, dst_nbytes) = sides
        if not np.array_equal(nbytes, dst_nbytes):
            raise ValueError("block rows: paired entries differ in length")
        n = len(nbytes)
        return RunList(np.full(n, self.prefill_rank, np.int32), src_region.astype(np.int32),
                       src_offset, dst_region.astype(np.int32), dst_offset, nbytes,
                       self.group[row].astype(np.int32))

    @property
    def entries(self) -> tuple[int, int]:
        """Entries of all rows: (remote, local); an index pair stays below these."""
        return int(self.remote[:, COUNT].sum()), int(self.local[:, COUNT].sum())


@dataclass(frozen=True)
class BlockReads:
    """One request's direct reads on one decode rank: per prefill rank its rows and the
    (2, n) int32 index pairs into them (row 0 remote, row 1 local), and its bytes; and per
    read its indices' index_bounds, made with them (the transport checks those: no array
    walked on the transfer's path)."""
    reads: tuple[tuple[BlockRows, np.ndarray, int], ...]    # (rows, indices, nbytes)
    bounds: tuple[tuple[int, int, int], ...] = ()

    strategy = Strategy.DIRECT

    def source_ranks(self) -> list[int]:
        return [rows.prefill_rank for rows, _, _ in self.reads]

    @property
    def total_nbytes(self) -> int:
        return sum(nbytes for _, _, nbytes in self.reads)

    @property
    def num_descriptors(self) -> int:
        """Index pairs given to the transport (NIXL merges the adjacent ones)."""
        return sum(idx.shape[1] for _, idx, _ in self.reads)

    def runs(self) -> RunList:
        return RunList.concat([rows.runs(idx) for rows, idx, _ in self.reads])


class BlockTable:
    """The rows of one layout pair and decode rank, per prefill rank it reads from, with
    each kept run's row start on each side; made from _BlockRuns' kept runs and steps."""

    def __init__(self, key: tuple, block_tokens: int, full: RunList, token: RunList,
                 state: RunList, steps, num_blocks: tuple[int, int]):
        """steps: per side (block stride per group, token stride per group, kernel blocks
        per block, kernel block tokens), as _BlockRuns keeps them; num_blocks: per side."""
        self.block_tokens = block_tokens
        bt = block_tokens
        t = np.arange(bt, dtype=np.int64)
        self._sources: list[tuple[BlockRows, np.ndarray, np.ndarray, np.ndarray,
                                  tuple[int, int, int]]] = []
        ranks = np.unique(np.concatenate([full.src_rank, token.src_rank, state.src_rank]))
        for p in ranks.tolist():
            f, k, s = (r.take(np.flatnonzero(r.src_rank == p)) for r in (full, token, state))
            sides = []
            for side, (block, tok, kb_per_block, kb_tokens) in enumerate(steps):
                region = [f.src_region, k.src_region, s.src_region] if side == 0 else \
                    [f.dst_region, k.dst_region, s.dst_region]
                offset = [f.src_offset, k.src_offset, s.src_offset] if side == 0 else \
                    [f.dst_offset, k.dst_offset, s.dst_offset]
                nb = num_blocks[side]
                # token run r at row t of a block: rows run-major (r, t), t = 0..bt-1
                tok_offset = (offset[1][:, None] + (t[None, :] // kb_tokens) * block[k.group][:, None]
                              + (t[None, :] % kb_tokens) * tok[k.group][:, None]).ravel()
                rows = np.concatenate([
                    _rows(region[0], offset[0], f.nbytes, block[f.group] * kb_per_block, nb),
                    _rows(np.repeat(region[1], bt), tok_offset, np.repeat(k.nbytes, bt),
                          np.repeat(block[k.group] * kb_per_block, bt), nb),
                    _rows(region[2], offset[2], s.nbytes, block[s.group], nb)])
                sides.append(rows)
            group = np.concatenate([f.group, np.repeat(k.group, bt), s.group]).astype(np.int64)
            rows = BlockRows(key + (p,), p, sides[0], sides[1], group)
            for a in (rows.remote, rows.local, rows.group):
                a.flags.writeable = False
            # Row starts per side: whole-block runs (2, Rf), token rows (2, Rk, bt), state (2, Rs)
            starts = np.stack([_row_starts(r) for r in sides])
            nf, nk = len(f), len(k) * bt
            self._sources.append((rows, starts[:, :nf], starts[:, nf:nf + nk].reshape(2, len(k), bt),
                                  starts[:, nf + nk:],
                                  (int(f.nbytes.sum()), int(k.nbytes.sum()), int(s.nbytes.sum()))))

    def reads(self, prefill_blocks: RequestBlocks, decode_blocks: RequestBlocks) -> BlockReads:
        """The request's index pairs per prefill rank. The blocks must have passed
        check_request (every id inside its layout's blocks): nothing here checks them."""
        n, bt = prefill_blocks.num_tokens, self.block_tokens
        nb = -(-n // bt)
        tail = n - (nb - 1) * bt
        whole = nb if tail == bt else nb - 1
        attn = len(prefill_blocks.attn_blocks) > 0     # the model has attention
        ids = np.array((prefill_blocks.attn_blocks[:nb], decode_blocks.attn_blocks[:nb]),
                       np.int64) if attn else None
        state_ids = np.array(((prefill_blocks.state_block,), (decode_blocks.state_block,)),
                             np.int64)
        out = []
        for rows, full, token, state, (full_nb, token_nb, state_nb) in self._sources:
            parts, nbytes = [], state_nb
            if attn:
                if whole and full.shape[1]:
                    parts.append((full[:, :, None] + ids[:, None, :whole]).reshape(2, -1))
                    nbytes += whole * full_nb
                if whole < nb and token.shape[1]:
                    parts.append(token[:, :, :tail].reshape(2, -1) + ids[:, nb - 1:])
                    nbytes += tail * token_nb
            if state.shape[1]:
                parts.append(state + state_ids)
            if parts:
                idx = (np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
                       ).astype(np.int32)
                out.append((rows, idx, nbytes))
        return BlockReads(tuple(out), tuple(index_bounds(idx) for _, idx, _ in out))


def index_bounds(indices: np.ndarray) -> tuple[int, int, int]:
    """(2, n) index pairs' least index, and the greatest of each row (0 for none)."""
    if not indices.shape[1]:
        return 0, 0, 0
    hi = indices.max(axis=1).tolist()
    return int(indices.min()), hi[0], hi[1]


def _row_starts(rows: np.ndarray) -> np.ndarray:
    """Each row's first entry index in its prepared list."""
    return np.concatenate(([0], np.cumsum(rows[:, COUNT])[:-1]))


def _rows(region, offset, nbytes, stride, count: int) -> np.ndarray:
    n = len(nbytes)
    out = np.empty((n, 5), np.int64)
    out[:, REGION], out[:, OFFSET], out[:, NBYTES] = region, offset, nbytes
    out[:, STRIDE], out[:, COUNT] = stride, count
    return out
