import pytest

from pdbridge.engine.block_pool import BlockPool
from pdbridge.engine.request import Request, RequestStatus, SamplingParams
from pdbridge.engine.scheduler import (EngineFull, RequestTooLarge, Scheduler, SchedulerConfig)


def make(num_blocks=32, block_tokens=4, budget=10, seqs=8):
    return Scheduler(BlockPool(num_blocks), block_tokens, True, True,
                     SchedulerConfig(max_batched_tokens=budget, max_num_seqs=seqs))


def req(i, n, max_tokens=4, **kw):
    return Request(i, tuple(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), **kw)


def run_step(s, chunks, sample_token=7):
    """What the engine does after a step: advance, append a token where a sample is due."""
    for c in chunks:
        r = c.request
        r.num_computed_tokens += c.query_len
        if r.num_pending_tokens == 0 and r.compute_target is None:
            r.output_ids.append(sample_token)


def test_prefill_is_chunked_under_the_budget():
    s = make(budget=4)
    a = req(0, 10)
    s.add(a)
    lens = []
    for _ in range(3):
        chunks = s.schedule()
        assert sum(c.query_len for c in chunks) <= 4
        lens.append([(c.context_len, c.query_len) for c in chunks])
        run_step(s, chunks)
    assert lens == [[(0, 4)], [(4, 4)], [(8, 2)]]
    assert a.output_ids == [7]
    assert s.schedule()[0].is_decode


def test_decodes_and_prefill_chunks_share_a_step():
    s = make(budget=6)
    a, b = req(0, 3), req(1, 9)
    s.add(a)
    run_step(s, s.schedule())               # a prefilled, sampled once
    s.add(b)
    chunks = s.schedule()
    assert [(c.request.request_id, c.context_len, c.query_len) for c in chunks] == \
        [(0, 3, 1), (1, 0, 5)]
    run_step(s, chunks)
    chunks = s.schedule()
    assert [(c.request.request_id, c.context_len, c.query_len) for c in chunks] == \
        [(0, 4, 1), (1, 5, 4)]


def test_blocks_grow_with_tokens_and_return_on_finish():
    s = make(num_blocks=8, block_tokens=4, budget=16)
    a = req(0, 4, max_tokens=6)
    s.add(a)
    run_step(s, s.schedule())
    assert len(a.attn_blocks) == 1 and a.state_block is not None
    assert a.attn_blocks[0] == a.state_block + 1        # one contiguous run
    run_step(s, s.schedule())                           # token 4 -> second block
    assert len(a.attn_blocks) == 2
    assert a.attn_blocks[1] == a.attn_blocks[0] + 1
    s.finish(a)
    assert s.pool.num_free == 8 and a.status is RequestStatus.FINISHED


def test_too_large_request_is_rejected_clearly():
    s = make(num_blocks=4, block_tokens=4)
    with pytest.raises(RequestTooLarge, match="need 6 blocks .* has 4"):
        s.add(req(0, 10, max_tokens=8))     # 17 tokens -> 5 attention + 1 state = 6 > 4


def test_admission_waits_for_reserved_growth():
    s = make(num_blocks=5, block_tokens=4, budget=64)
    a, b = req(0, 4, max_tokens=9), req(1, 4, max_tokens=1)     # a: worst 3+1 blocks
    s.add(a)
    s.add(b)
    chunks = s.schedule()
    assert [c.request for c in chunks] == [a]           # b (2 blocks) would eat a's growth
    assert b.status is RequestStatus.WAITING
    s.finish(a)
    assert [c.request for c in s.schedule()] == [b]


def test_max_num_seqs_limits_a_step():
    s = make(budget=20, seqs=2)
    for i in range(3):
        s.add(req(i, 2))
    assert len(s.schedule()) == 2


def test_imported_request_gets_blocks_then_decodes_the_last_prompt_token():
    s = make(block_tokens=4)
    r = req(0, 9, imported=True)
    s.add_imported(r)
    assert r.status is RequestStatus.AWAITING_STATE
    assert len(r.attn_blocks) == 2                      # 8 transferred tokens
    assert s.schedule() == []                           # not before the state arrived
    s.state_arrived(r)
    (c,) = s.schedule()
    assert (c.context_len, c.query_len, c.is_decode) == (8, 1, True)
    assert len(r.attn_blocks) == 3                      # token 8 opens a new block


def test_imported_request_without_room_raises():
    s = make(num_blocks=4, block_tokens=4)
    s.add_imported(req(0, 4, max_tokens=5))             # worst 2 + 1
    with pytest.raises(EngineFull):
        s.add_imported(req(1, 4, max_tokens=1))


def test_prefill_only_stops_at_target_and_keeps_blocks():
    s = make(block_tokens=4)
    r = req(0, 9, compute_target=8)
    s.add(r)
    chunks = s.schedule()
    assert [(c.context_len, c.query_len) for c in chunks] == [(0, 8)]
    run_step(s, chunks)
    assert r.num_pending_tokens == 0 and r.output_ids == []
    s.keep(r)
    assert s.schedule() == [] and r.status is RequestStatus.PREFILLED
    held = s.pool.num_free
    s.release(r)
    assert s.pool.num_free == held + 3
