"""A plan's derived facts (TransferPlan.source_ranks, scratch_sources, uses_decode_scratch,
total_nbytes), computed once per plan and kept, against the same facts computed afresh from
its arrays, on random cases of every strategy."""
import numpy as np
from hypothesis import HealthCheck, given, settings

from plan_cases import cases
from pdbridge.plan import SCRATCH, plan_transfer


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cases())
def test_kept_facts_are_the_arrays_facts(case):
    plan = plan_transfer(case.prefill, case.decode, 0, case.prefill_blocks,
                         case.decode_blocks, case.strategy)
    want = {
        "source_ranks": sorted({int(r) for r in plan.src_rank}),
        "scratch_sources": sorted({int(r) for r, g in zip(plan.src_rank, plan.src_region)
                                   if g == SCRATCH}),
        "uses_decode_scratch": plan.staging_nbytes > 0 or len(plan.decode_restore) > 0
        or any(int(g) == SCRATCH for g in plan.dst_region),
        "total_nbytes": sum(int(n) for n in plan.nbytes),
    }
    for _ in range(2):                      # computed, then kept
        got = {"source_ranks": plan.source_ranks(), "scratch_sources": plan.scratch_sources(),
               "uses_decode_scratch": plan.uses_decode_scratch(),
               "total_nbytes": plan.total_nbytes}
        assert got == want
        got["source_ranks"].append(99)      # the caller's copy, not the kept list
        got["scratch_sources"].append(99)


def test_a_plan_reading_scratch_says_so():
    """The comparison above can fail: a permute plan names its scratch sources."""
    from pdbridge.plan import RequestBlocks, Strategy
    from pdbridge.spec import CacheConfig, EngineLayout, get_preset
    spec = get_preset("nemotron-h-8b")
    p, d = (EngineLayout(spec, t, CacheConfig(num_blocks=4)) for t in (1, 2))
    blocks = RequestBlocks(8, (0,), 0)
    plan = plan_transfer(p, d, 0, blocks, blocks, Strategy.PERMUTE)
    assert plan.scratch_sources() == [0] and np.any(plan.src_region == SCRATCH)
    direct = plan_transfer(p, d, 0, blocks, blocks, Strategy.DIRECT)
    assert direct.scratch_sources() == [] and not direct.uses_decode_scratch()
