"""PlanCache against plan_transfer, its reference: a cached plan is the plan a fresh call
makes, for every strategy (auto under the concrete strategy it chose too), on random cases."""
import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from plan_cases import cases
from pdbridge.plan import CopyList, PlanCache, RequestBlocks, Strategy, plan_transfer


def same_plan(a, b) -> bool:
    """Field by field: arrays element-wise, copy lists run by run."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            if not np.array_equal(x, y):
                return False
        elif isinstance(x, CopyList):
            if not same_copies(x, y):
                return False
        elif f.name == "prefill_reorder":
            if x.keys() != y.keys() or not all(same_copies(x[k], y[k]) for k in x):
                return False
        elif x != y:
            return False
    return True


def same_copies(x: CopyList, y: CopyList) -> bool:
    return all(np.array_equal(getattr(x, f.name), getattr(y, f.name))
               for f in dataclasses.fields(x))


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cases())
def test_a_cached_plan_is_the_fresh_plan(case):
    cache = PlanCache()
    args = (case.prefill, case.decode, 0, case.prefill_blocks, case.decode_blocks)
    first, hit = cache.plan(*args, case.strategy)
    assert not hit
    again, hit = cache.plan(*args, case.strategy)
    assert hit and again is first
    fresh = plan_transfer(*args, case.strategy)
    assert same_plan(again, fresh)
    # What the pull asks after `auto` chose: the concrete strategy, served from the cache.
    concrete, hit = cache.plan(*args, fresh.strategy)
    assert hit == (case.strategy is Strategy.AUTO or case.strategy is fresh.strategy)
    assert same_plan(concrete, plan_transfer(*args, fresh.strategy))


def test_the_comparison_can_fail():
    """same_plan tells plans apart that differ in one offset."""
    from pdbridge.spec import CacheConfig, EngineLayout, get_preset
    layout = EngineLayout(get_preset("nemotron-h-8b"), 1, CacheConfig(num_blocks=4))
    blocks = RequestBlocks(8, (0,), 0)
    plan = plan_transfer(layout, layout, 0, blocks, blocks)
    moved = dataclasses.replace(plan, dst_offset=plan.dst_offset + 1)
    assert same_plan(plan, plan) and not same_plan(plan, moved)


def test_other_inputs_miss_and_old_plans_are_evicted():
    from pdbridge.spec import CacheConfig, EngineLayout, get_preset
    layout = EngineLayout(get_preset("nemotron-h-8b"), 1, CacheConfig(num_blocks=4))
    cache = PlanCache(max_plans=2)
    a, b, c = (RequestBlocks(8, (i,), i) for i in range(3))
    for blocks in (a, b):
        assert not cache.plan(layout, layout, 0, blocks, blocks, "direct")[1]
    assert cache.plan(layout, layout, 0, a, a, "direct")[1]          # a is now the newest
    assert not cache.plan(layout, layout, 0, a, b, "direct")[1]      # another decode table
    assert len(cache) == 2
    assert not cache.plan(layout, layout, 0, b, b, "direct")[1]      # b was evicted
    with pytest.raises(ValueError, match="max_plans"):
        PlanCache(max_plans=0)
    assert not cache.plan(layout, layout, 0, c, c, "staging")[1]
