"""PlanCache: one decode rank's plans, made fast and kept.

Exact inputs: a cache keyed by every input of `plan_transfer` (both layouts' digests, the
decode rank, both block tables, the strategy) serves a request asked again (ChooseStrategy,
then Pull). An `auto` plan is also kept under the concrete strategy it chose: planning with
that strategy builds the same plan (planner.py builds each candidate exactly as a fixed
strategy would).

New inputs: planning a request fresh costs 1-3 ms here (issue 10), most of it in
direct_reads' per-tensor work, which depends on the layouts, not on the request. So the
direct runs are assembled instead (_BlockRuns): the runs of a request with all its tokens in
block 0, and of one with one token at row 0 of block 0 (its state in state block 0), are
computed once per layout pair and rank; a request's runs are those of its whole blocks and of
each token of its last block, moved to its block ids and token rows (kernel blocks x the
tensor's block stride + rows x its token stride, on each side), and the state runs moved to its
state blocks. Offsets are affine in the block ids and rows (EngineLayout.token_slots), and
coalescing, which merges runs adjacent on both sides in one canonical order, makes the same
reads of those finer runs as of direct_reads' (the strategy rewrite, coalescing and `auto`'s
choice then run as in plan_transfer: planner.plan_from_direct). Where the engines' block sizes
differ, plan_transfer plans. plan_transfer stays the reference; tests compare the two.

Everything of that assembly but the block ids is kept (_Moves): the runs of w whole blocks
and of a last block's t tokens, at block id 0, with how far each run moves per block id on each
side; a request's runs are those moved by its ids, two multiply-adds a side (issue 10). A
`direct` plan (what `auto` mostly chooses) is made from them in one pass over one matrix
(_BlockRuns.direct_plan; plan_from_direct over direct() is its reference). A pull needs no
plan at all where it is `direct`: block_reads gives its reads as index pairs into rows made
once per layout pair from the same kept runs (block_table.py), which the transport prepares
once; the plan stays for every other strategy and for verified (checksummed) pulls.
"""
from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict

import numpy as np

from pdbridge.spec import BLOCK, TOKEN, EngineLayout
from pdbridge.spec.layout import ZONE_ALIGN

from .block_table import BlockReads, BlockTable
from .direct_reads import DirectReads, GroupInfo, direct_reads, minimal_nbytes
from .planner import parse_strategy, plan_from_direct, plan_transfer
from .run_list import RunList
from .transfer_plan import ReadGroup, RequestBlocks, Strategy, TransferPlan
from .validation import check_geometry, check_request, used_attn_blocks

Key = tuple[str, str, int, RequestBlocks, RequestBlocks, Strategy]
KEEP_MOVES = 1024          # kept _Moves per kind (whole blocks, tails), and group tables


class PlanCache:
    def __init__(self, max_plans: int = 64):
        if max_plans < 1:
            raise ValueError(f"max_plans must be >= 1, got {max_plans}")
        self.max_plans = max_plans
        self._plans: OrderedDict[Key, TransferPlan] = OrderedDict()
        self._runs: OrderedDict[tuple[str, str, int], _BlockRuns] = OrderedDict()
        self.hits = self.misses = 0

    def plan(self, prefill: EngineLayout, decode: EngineLayout, decode_rank: int,
             prefill_blocks: RequestBlocks, decode_blocks: RequestBlocks,
             strategy: Strategy | str) -> tuple[TransferPlan, bool]:
        """plan_transfer's plan for these inputs, and whether it came from the cache."""
        strategy = parse_strategy(strategy)
        key = (prefill.digest, decode.digest, decode_rank, prefill_blocks, decode_blocks, strategy)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            self.hits += 1
            return plan, True
        self.misses += 1
        runs = self._block_runs(prefill, decode, decode_rank, prefill_blocks)
        if runs is None:
            plan = plan_transfer(prefill, decode, decode_rank, prefill_blocks, decode_blocks,
                                 strategy)
        else:
            check_request(prefill, decode, decode_rank, prefill_blocks, decode_blocks)
            chosen = self._chosen(runs, prefill_blocks, decode_blocks, strategy)
            if chosen is Strategy.DIRECT:
                plan = runs.direct_plan(prefill_blocks, decode_blocks)
            else:
                plan = plan_from_direct(runs.direct(prefill_blocks, decode_blocks), prefill,
                                        prefill_blocks, decode_rank, chosen)
        self._put(key, plan)
        if strategy is Strategy.AUTO:
            self._put(key[:-1] + (plan.strategy,), plan)
        return plan, False

    def block_reads(self, prefill: EngineLayout, decode: EngineLayout, decode_rank: int,
                    prefill_blocks: RequestBlocks, decode_blocks: RequestBlocks,
                    strategy: Strategy) -> BlockReads | None:
        """The request's reads as index pairs into the layout pair's BlockTable, where its
        plan would be `direct` (asked for, or what `auto` chooses): the same bytes as that
        plan with no plan built (block_table.py). None where plan() must plan (another
        strategy, `auto` choosing another, engines of other block sizes). Raises what plan()
        raises for a request that cannot be planned."""
        if strategy is not Strategy.AUTO and strategy is not Strategy.DIRECT:
            return None
        runs = self._block_runs(prefill, decode, decode_rank, prefill_blocks)
        if runs is None:
            return None
        check_request(prefill, decode, decode_rank, prefill_blocks, decode_blocks)
        if self._chosen(runs, prefill_blocks, decode_blocks, strategy) is not Strategy.DIRECT:
            return None
        return runs.table().reads(prefill_blocks, decode_blocks)

    @staticmethod
    def _chosen(runs: "_BlockRuns", prefill_blocks: RequestBlocks,
                decode_blocks: RequestBlocks, strategy: Strategy) -> Strategy:
        """The strategy the assembled plan takes: `strategy`, or what `auto` chooses where
        it can be chosen on the state runs alone (else `auto`: plan_from_direct chooses)."""
        if strategy is not Strategy.AUTO or not runs.kinds_apart:
            return strategy
        # Strategies differ only in the state runs, and no state run can merge with an
        # attention run (other regions): `auto`'s choice, made on the state runs alone, is
        # the choice over whole plans; the whole plan is built once. The state runs of state
        # block b + period are those of b moved by whole pages, zone origins included
        # (_BlockRuns.state_period): the same choice.
        blocks = (prefill_blocks.state_block % runs.state_period[0],
                  decode_blocks.state_block % runs.state_period[1])
        chosen = runs.state_choice.get(blocks)
        if chosen is None:
            alone = dataclasses.replace(runs.direct(prefill_blocks, decode_blocks),
                                        paged=RunList.empty())
            chosen = runs.state_choice[blocks] = plan_from_direct(
                alone, runs.prefill, prefill_blocks, runs.rank, Strategy.AUTO).strategy
            if len(runs.state_choice) > 4096:
                runs.state_choice.clear()
        return chosen

    def _put(self, key: Key, plan: TransferPlan) -> None:
        self._plans[key] = plan
        self._plans.move_to_end(key)
        while len(self._plans) > self.max_plans:
            self._plans.popitem(last=False)

    def __len__(self) -> int:
        return len(self._plans)

    def _block_runs(self, prefill: EngineLayout, decode: EngineLayout, decode_rank: int,
                    blocks: RequestBlocks) -> "_BlockRuns | None":
        """The layout pair's one-block runs, or None where they do not apply."""
        if prefill.block_tokens != decode.block_tokens or blocks.num_tokens < 1:
            return None
        key = (prefill.digest, decode.digest, decode_rank)
        runs = self._runs.get(key)
        if runs is None:
            if not 0 <= decode_rank < decode.tp_size:
                return None             # plan_transfer refuses it, naming the field
            check_geometry(prefill, decode)
            runs = self._runs[key] = _BlockRuns(prefill, decode, decode_rank)
            while len(self._runs) > 8:
                self._runs.popitem(last=False)
        return runs


class _BlockRuns:
    """direct_reads of any request, assembled from one-block requests (module docstring)."""

    def __init__(self, prefill: EngineLayout, decode: EngineLayout, decode_rank: int):
        self.prefill, self.decode, self.rank = prefill, decode, decode_rank
        self.block_tokens = decode.block_tokens
        full = self._one(self.block_tokens)
        self.full, self.state, self.groups = full.paged, full.state, full.groups
        self.token = self._one(1).paged         # one token, row 0 of kernel block 0
        # Per group and side: bytes a read moves per kernel block and per token row.
        steps = []
        for layout, rank_of in ((prefill, lambda g: g.prefill_rank), (decode, lambda g: decode_rank)):
            block, token = [], []
            for g in full.groups:
                tl = layout.rank(rank_of(g)).tensor(g.layer, g.tensor)
                block.append(tl.axis(BLOCK).stride)
                token.append(tl.axis(TOKEN).stride if tl.tensor.paged else 0)
            steps.append((np.asarray(block, np.int64), np.asarray(token, np.int64),
                          layout.kernel_blocks_per_block, layout.kernel_block_tokens))
        self._steps = steps
        # Kept runs (_Moves): of w whole blocks, of a last block's t tokens, of the state
        # (which moves by whole state blocks); and per group, bytes per block, token, state.
        self._state_moves = self._moves_of(self.state, None, (1, 1), slot=-1)
        self._whole: dict[int, _Moves] = {}
        self._tails: dict[int, _Moves] = {}
        self._group_info: dict[int, tuple] = {}        # num_tokens -> (groups, minimal)
        self._full_g, self._token_g, self._state_g = (
            np.bincount(r.group, weights=r.nbytes, minlength=len(self.groups)).astype(np.int64)
            for r in (self.full, self.token, self.state))
        self.state_choice: dict[tuple[int, int], Strategy] = {}    # `auto` by state blocks
        self._table: BlockTable | None = None
        # The decode shard's bytes are affine in the token count (paged tensors: bytes per
        # token; state: whole pages): minimal_nbytes(n) = _minimal[0] + n * _minimal[1].
        m0 = minimal_nbytes(decode, decode_rank, 0)
        self._minimal = (m0, minimal_nbytes(decode, decode_rank, 1) - m0)
        # Per side, the state blocks after which the zone origins (RankLayout.zone_origins:
        # each page's tensor slabs, rounded down to ZONE_ALIGN) repeat, moved by whole pages.
        self.state_period = tuple(
            math.lcm(1, *(ZONE_ALIGN // math.gcd(r.page_nbytes(layout.num_blocks), ZONE_ALIGN)
                          for rl in ranks for r in rl.regions if not r.paged))
            for layout, ranks in ((prefill, [prefill.rank(p) for p in range(prefill.tp_size)]),
                                  (decode, [decode.rank(decode_rank)])))
        # No region on either side holds both attention and state tensors.
        self.kinds_apart = all(
            len({tl.tensor.paged for tl in rl.tensors if tl.region == r}) <= 1
            for rl in [decode.rank(decode_rank), *(prefill.rank(p) for p in
                                                   range(prefill.tp_size))]
            for r in range(len(rl.regions)))

    def table(self) -> BlockTable:
        """Every direct read of this layout pair and rank as rows (block_table.py), made at
        the first ask and kept."""
        if self._table is None:
            self._table = BlockTable((self.prefill.digest, self.decode.digest, self.rank),
                                     self.block_tokens, self.full, self.token, self.state,
                                     self._steps, (self.prefill.num_blocks,
                                                   self.decode.num_blocks))
        return self._table

    def _one(self, tokens: int) -> DirectReads:
        blocks = RequestBlocks(tokens, (0,), 0)
        return direct_reads(self.prefill, self.decode, self.rank, blocks, blocks)

    def direct(self, prefill_blocks: RequestBlocks, decode_blocks: RequestBlocks) -> DirectReads:
        """The request's direct runs: the kept runs of its whole blocks, of its last block's
        tokens and of its state moved to its block ids (direct_slow, which assembles them
        afresh, is the reference; tests compare the two)."""
        n, bt = prefill_blocks.num_tokens, self.block_tokens
        nb = -(-n // bt)
        tail = n - (nb - 1) * bt
        whole = nb if tail == bt else nb - 1
        ids = [np.asarray(used_attn_blocks(layout, blocks), np.int64) for layout, blocks in
               ((self.prefill, prefill_blocks), (self.decode, decode_blocks))]
        parts = []
        if len(ids[0]):                 # the model has attention: nb blocks on each side
            if whole and len(self.full):
                parts.append(self._kept(self._whole, whole, self._whole_moves)
                             .apply(ids[0], ids[1]))
            if whole < nb and len(self.token):
                parts.append(self._kept(self._tails, tail, self._tail_moves)
                             .apply(int(ids[0][nb - 1]), int(ids[1][nb - 1])))
        paged = RunList.concat(parts)
        state = self._state_moves.apply(prefill_blocks.state_block, decode_blocks.state_block)
        groups = self._group_info.get(n)
        if groups is None:
            if len(self._group_info) >= KEEP_MOVES:
                self._group_info.clear()
            groups = self._group_info[n] = self._groups_of(
                self._state_g + (whole * self._full_g if len(ids[0]) else 0)
                + (self._token_g * tail if len(ids[0]) and whole < nb else 0), n)
        return DirectReads(paged, state, *groups)

    def direct_plan(self, prefill_blocks: RequestBlocks, decode_blocks: RequestBlocks
                    ) -> TransferPlan:
        """plan_from_direct(direct(...), ..., DIRECT), its reference (tests compare the two),
        in one pass over one matrix: the kept runs' packed rows (_Moves.packed) of the
        request's whole blocks, last block and state side by side, each run's offsets moved
        by its own block id on each side (its slot in `ids`: a whole block's index, -2 the
        last block, -1 the state block), then sorted and merged as RunList.coalesced does.
        The same arithmetic as direct() + coalesced() in a third of their numpy calls; a
        rank woken for a pull runs on a cold core, which pays per call, not per element
        (paired runs of `pdbridge up`, P TP=1 -> D TP=2: a rank's plan 0.63 -> 0.53 and
        0.70 -> 0.57 ms)."""
        n, bt = prefill_blocks.num_tokens, self.block_tokens
        nb = -(-n // bt)
        tail = n - (nb - 1) * bt
        whole = nb if tail == bt else nb - 1
        used = [used_attn_blocks(layout, blocks) for layout, blocks in
                ((self.prefill, prefill_blocks), (self.decode, decode_blocks))]
        attn = len(used[0]) > 0         # the model has attention: nb blocks on each side
        parts = []
        if attn:
            if whole and len(self.full):
                parts.append(self._kept(self._whole, whole, self._whole_moves).packed)
            if whole < nb and len(self.token):
                parts.append(self._kept(self._tails, tail, self._tail_moves).packed)
        if len(self.state):
            parts.append(self._state_moves.packed)
        if parts:
            m = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0].copy()
            ids = np.array(((*used[0], prefill_blocks.state_block),
                            (*used[1], decode_blocks.state_block)), np.int64)
            m[_OFFSETS] += np.take(ids, m[_SLOT], axis=1) * m[_STEPS]
            if m.shape[1] > 1:
                m = m[:, np.lexsort(m[_SORT_KEYS])]
                joins = ((m[_SAME, 1:] == m[_SAME, :-1]).all(axis=0)
                         & (m[_OFFSETS, 1:] == m[_OFFSETS, :-1] + m[_NBYTES, :-1]).all(axis=0))
                if joins.any():
                    heads = np.flatnonzero(np.concatenate(([True], ~joins)))
                    nbytes = np.add.reduceat(m[_NBYTES], heads)
                    m = m[:, heads]
                    m[_NBYTES] = nbytes
            counts = np.bincount(m[_GROUP], minlength=len(self.groups))
        else:
            m = np.zeros((_ROWS, 0), np.int64)
            counts = np.zeros(len(self.groups), np.int64)
        group_nbytes = self._state_g.copy()
        if attn:
            group_nbytes += whole * self._full_g
            if whole < nb:
                group_nbytes += tail * self._token_g
        groups = tuple(ReadGroup(g.layer, g.tensor, g.segment, g.prefill_rank, g.global_range,
                                 b, c) for g, b, c in zip(self.groups, group_nbytes.tolist(),
                                                          counts.tolist()))
        i32 = m[_SAME].astype(np.int32)
        return TransferPlan(decode_rank=self.rank, strategy=Strategy.DIRECT,
                            src_rank=i32[_SRC_RANK], src_region=i32[_SRC_REGION],
                            src_offset=m[_SRC_OFFSET], dst_region=i32[_DST_REGION],
                            dst_offset=m[_DST_OFFSET], nbytes=m[_NBYTES],
                            groups=groups, minimal_nbytes=self._minimal[0] + n * self._minimal[1])

    @staticmethod
    def _kept(store: dict, key: int, make) -> "_Moves":
        moves = store.get(key)
        if moves is None:
            if len(store) >= KEEP_MOVES:
                store.clear()
            moves = store[key] = make(key)
        return moves

    def _whole_moves(self, whole: int) -> "_Moves":
        """The runs of `whole` whole blocks at block 0, and which block each run is of."""
        return self._moves_of(self._moved(self.full, [0, 0], [0, 0], whole),
                              np.repeat(np.arange(whole, dtype=np.int64), len(self.full)))

    def _tail_moves(self, tail: int) -> "_Moves":
        """The runs of a last block's `tail` tokens, that block at block id 0."""
        t = np.repeat(np.arange(tail, dtype=np.int64), len(self.token))
        return self._moves_of(self._moved(self.token, [t // kbt for _, _, _, kbt in self._steps],
                                          [t % kbt for _, _, _, kbt in self._steps], tail), None)

    def _moves_of(self, runs: RunList, index: np.ndarray | None, per_block=None,
                  slot: int = -2) -> "_Moves":
        """runs at block id 0 and each run's bytes per block id on each side: kernel blocks
        per block x the block stride (state runs: the block stride, per state block); and
        all of it as one matrix (packed) with each run's slot in direct_plan's block ids:
        `index`, or `slot` for runs of one id (-2 a last block, -1 the state block)."""
        (sb, _, mp, _), (db, _, md, _) = self._steps
        mp, md = per_block or (mp, md)
        steps = [sb[runs.group] * mp, db[runs.group] * md]
        slots = index if index is not None else np.full(len(runs), slot, np.int64)
        packed = np.stack([runs.dst_region, runs.src_rank, runs.src_region, runs.src_offset,
                           runs.dst_offset, runs.nbytes, runs.group, slots, *steps]
                          ).astype(np.int64)
        for a in (*(getattr(runs, f.name) for f in dataclasses.fields(runs)), *steps, packed):
            a.flags.writeable = False   # shared by every request's plan: never written
        return _Moves(runs, index, steps[0], steps[1], packed)

    def _groups_of(self, nbytes: np.ndarray, n: int) -> tuple[tuple[GroupInfo, ...], int]:
        return (tuple(GroupInfo(g.layer, g.tensor, g.segment, g.prefill_rank, g.global_range,
                                int(b)) for g, b in zip(self.groups, nbytes.tolist())),
                minimal_nbytes(self.decode, self.rank, n))

    def direct_slow(self, prefill_blocks: RequestBlocks, decode_blocks: RequestBlocks
                    ) -> DirectReads:
        """direct(), assembled afresh from the one-block runs (its reference)."""
        n, bt = prefill_blocks.num_tokens, self.block_tokens
        nb = -(-n // bt)
        ids = [np.asarray(used_attn_blocks(layout, blocks), np.int64) for layout, blocks in
               ((self.prefill, prefill_blocks), (self.decode, decode_blocks))]
        parts = []
        if len(ids[0]):                 # the model has attention: nb blocks on each side
            tail = n - (nb - 1) * bt
            whole = nb if tail == bt else nb - 1
            if whole and len(self.full):        # each whole block: the one-block runs moved
                parts.append(self._moved(self.full, [np.repeat(i[:whole], len(self.full)) * m
                                                     for i, (_, _, m, _) in zip(ids, self._steps)],
                                         [0, 0], whole))
            if whole < nb and len(self.token):  # the last block's tokens, one by one
                t = np.repeat(np.arange(tail, dtype=np.int64), len(self.token))
                kb = [i[nb - 1] * m + t // kbt for i, (_, _, m, kbt) in zip(ids, self._steps)]
                rows = [t % kbt for _, _, _, kbt in self._steps]
                parts.append(self._moved(self.token, kb, rows, tail))
        paged = RunList.concat(parts)
        k = len(self.state)
        state = self._moved(self.state, [np.full(k, prefill_blocks.state_block),
                                         np.full(k, decode_blocks.state_block)], [0, 0], 1)
        everything = RunList.concat([paged, state])
        nbytes = np.bincount(everything.group, weights=everything.nbytes,
                             minlength=len(self.groups)) if len(everything) else \
            np.zeros(len(self.groups))
        groups = tuple(GroupInfo(g.layer, g.tensor, g.segment, g.prefill_rank, g.global_range,
                                 int(b)) for g, b in zip(self.groups, nbytes.tolist()))
        return DirectReads(paged, state, groups, minimal_nbytes(self.decode, self.rank, n))

    def _moved(self, runs: RunList, blocks: list, rows: list, copies: int) -> RunList:
        """`copies` copies of runs, each run of the result moved by blocks[side] kernel
        blocks and rows[side] token rows (arrays, one entry per run of the result)."""
        tile = (lambda a: np.tile(a, copies)) if copies > 1 else (lambda a: a)
        group = tile(runs.group)
        (sb, st, _, _), (db, dt, _, _) = self._steps
        return RunList(tile(runs.src_rank), tile(runs.src_region),
                       tile(runs.src_offset) + blocks[0] * sb[group] + rows[0] * st[group],
                       tile(runs.dst_region),
                       tile(runs.dst_offset) + blocks[1] * db[group] + rows[1] * dt[group],
                       tile(runs.nbytes), group)


# The rows of _Moves.packed, ordered so that direct_plan takes each set it needs as one slice
# (a view), not a gather: the fields runs merge only when equal, the two offsets, the sort keys
# (lexsort's last key sorts first: src rank, region, offset, then dst offset, RunList.coalesced's
# order), then the run's group, the slot of the block id that moves it (direct_plan's `ids`: a
# whole block's index, -2 the last block, -1 the state block) and its bytes per block id on
# each side.
(_DST_REGION, _SRC_RANK, _SRC_REGION, _SRC_OFFSET, _DST_OFFSET, _NBYTES, _GROUP, _SLOT,
 _SRC_STEP, _DST_STEP) = range(10)
_ROWS = 10
_SAME = slice(_DST_REGION, _SRC_REGION + 1)             # equal in runs that merge: int32
_OFFSETS = slice(_SRC_OFFSET, _DST_OFFSET + 1)
_SORT_KEYS = slice(_DST_OFFSET, _DST_REGION, -1)        # dst offset, src offset, region, rank
_STEPS = slice(_SRC_STEP, _DST_STEP + 1)


@dataclasses.dataclass(frozen=True)
class _Moves:
    """Runs kept at block id 0 (read-only arrays, shared by every request's plan), each
    run's bytes per block id on each side, and which of the request's blocks each run is of
    (`index`; None: all of one block)."""
    runs: RunList
    index: np.ndarray | None
    src_step: np.ndarray
    dst_step: np.ndarray
    packed: np.ndarray      # rows _DST_REGION.._DST_STEP above, one column per run

    def apply(self, prefill_ids, decode_ids) -> RunList:
        """The runs moved to the request's block ids (arrays indexed by `index`), or to one
        block id per side."""
        r = self.runs
        if self.index is not None:
            prefill_ids, decode_ids = prefill_ids[self.index], decode_ids[self.index]
        return RunList(r.src_rank, r.src_region, r.src_offset + prefill_ids * self.src_step,
                       r.dst_region, r.dst_offset + decode_ids * self.dst_step, r.nbytes,
                       r.group)
