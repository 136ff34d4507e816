"""PlanCache: the plans one decode rank made lately, so a request is planned once.

A request is planned when its strategy is chosen (ChooseStrategy) and again when it is pulled
(Pull), with the same inputs; a cache keyed by every input of `plan_transfer` (both layouts'
digests, the decode rank, both block tables, the strategy) makes the second one a lookup.
An `auto` plan is also kept under the concrete strategy it chose: planning with that strategy
builds the same plan (planner.py builds each candidate exactly as a fixed strategy would), and
the pull asks with the concrete one. The fresh `plan_transfer` stays the reference; a test
compares the two.
"""
from __future__ import annotations

from collections import OrderedDict

from pdbridge.spec import EngineLayout

from .planner import parse_strategy, plan_transfer
from .transfer_plan import RequestBlocks, Strategy, TransferPlan

Key = tuple[str, str, int, RequestBlocks, RequestBlocks, Strategy]


class PlanCache:
    def __init__(self, max_plans: int = 64):
        if max_plans < 1:
            raise ValueError(f"max_plans must be >= 1, got {max_plans}")
        self.max_plans = max_plans
        self._plans: OrderedDict[Key, TransferPlan] = OrderedDict()
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
        plan = plan_transfer(prefill, decode, decode_rank, prefill_blocks, decode_blocks, strategy)
        self._put(key, plan)
        if strategy is Strategy.AUTO:
            self._put(key[:-1] + (plan.strategy,), plan)
        return plan, False

    def _put(self, key: Key, plan: TransferPlan) -> None:
        self._plans[key] = plan
        self._plans.move_to_end(key)
        while len(self._plans) > self.max_plans:
            self._plans.popitem(last=False)

    def __len__(self) -> int:
        return len(self._plans)
