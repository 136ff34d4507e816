"""The planner against the brute-force oracle on random tiny specs, TP pairs, layouts and
block tables, every strategy (DESIGN.md section 7.1)."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings

from pdbridge.plan import plan_transfer
from pdbridge.plan.reference import reference_reads

from plan_cases import cases
from plan_harness import check_all_ranks

_FAST = settings(max_examples=1000, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
_SLOW = settings(max_examples=5000, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _check(case):
    check_all_ranks(case.prefill, case.decode, case.prefill_blocks, case.decode_blocks,
                    case.strategy)


@_FAST
@given(cases())
def test_plan_matches_oracle(case):
    _check(case)


import pytest  # noqa: E402


@pytest.mark.slow
@_SLOW
@given(cases())
def test_plan_matches_oracle_sweep(case):
    _check(case)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cases(strategies=("direct",)))
def test_direct_moves_the_reference_bytes(case):
    """Direct plans write exactly the bytes the element-by-element reference writes."""
    for j in range(case.decode.tp_size):
        plan = plan_transfer(case.prefill, case.decode, j, case.prefill_blocks, case.decode_blocks)
        ref = reference_reads(case.prefill, case.decode, j, case.prefill_blocks, case.decode_blocks)
        want = sorted((c.dst_region, c.dst_offset + k) for c in ref for k in range(c.nbytes))
        got = sorted((int(r), int(o) + k) for r, o, n in zip(plan.dst_region, plan.dst_offset,
                                                             plan.nbytes) for k in range(int(n)))
        assert got == want
        assert plan.total_nbytes == plan.minimal_nbytes == sum(c.nbytes for c in ref)
        assert np.all(np.diff(plan.src_rank) >= 0)     # sorted by source rank
