"""The request lifecycle around a transfer: the state a decode rank receives is the state it
computes itself; failures recompute (or fail loudly); leases free blocks exactly once."""

import time
import numpy as np
import pytest
import torch

from pd_harness import PROMPTS, FakeClock, cache, monolithic, wait_until
from numerics import REORDER_ULPS, assert_close
from pdbridge.engine.cache_snapshot import Snapshot
from pdbridge.engine.request import SamplingParams
from pdbridge.model import default_model
from pdbridge.plan import Strategy, planner
from pdbridge.plan.cost_model import CostModel
from pdbridge.serve.decode_node import DecodeNode, PullFailed
from pdbridge.serve.prefill_node import PrefillNode
from pdbridge.serve.router import PDRouter
from pdbridge.transport.bookkeeping import ReleaseReason

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir():
    return str(default_model.model_dir())


def snapshots(engine, blocks) -> dict[int, dict[str, np.ndarray]]:
    snaps = engine.call(Snapshot(blocks.num_tokens, list(blocks.attn_blocks), blocks.state_block))
    return {s.rank: s.arrays() for s in snaps}


@pytest.mark.parametrize("prefill_tp,decode_tp,strategy", [(2, 4, "permute"), (3, 2, "staging")])
def test_received_state_equals_own_prefill(model_dir, prefill_tp, decode_tp, strategy):
    """Every decode rank's pulled KV, conv and SSM state equals what that rank computes by
    prefilling the same N-1 tokens itself, up to the rounding of its other TP size."""
    prompt = PROMPTS[1]
    pre = PrefillNode(model_dir, prefill_tp, cache("SD"), transport="nixl")
    dec = DecodeNode(model_dir, decode_tp, cache("DS"), transport="nixl", strategy=strategy)
    try:
        params = pre.prefill(prompt)
        handle = dec.allocate(prompt, SamplingParams(max_tokens=4))
        pre.expect_readers(params, dec.engine_id, dec.tp_size)
        b = handle.blocks
        strategies = dec.choose_strategies(handle, params)
        bases = pre.prepare_permute(params, dec.engine_id, dec.layout_dict,
                                    (b.num_tokens, b.attn_blocks, b.state_block), strategies)
        outcome = dec.pull(handle, params, bases, strategies=strategies)
        assert outcome.ok, outcome.errors
        received = snapshots(dec.engine, b)             # before any decode step runs
        own = dec.engine.prefill_for_transfer(prompt)    # the decode engine prefills N-1 itself
        computed = snapshots(dec.engine, own.blocks)
        assert set(received) == set(range(decode_tp))
        for rank in range(decode_tp):
            assert received[rank].keys() == computed[rank].keys()
            for name, want in computed[rank].items():
                # Snapshots widen to float64; the caches (and the computation) are fp32.
                assert_close(received[rank][name], want, ulps=REORDER_ULPS, dtype=np.float32,
                             what=f"decode rank {rank} {name}")
        assert any(np.abs(a).max() > 0 for a in received[0].values())
        pre.poll()
        assert pre.num_held == 0
    finally:
        pre.close()
        dec.close()


def test_failed_pull_recomputes_or_fails(model_dir):
    """A pull that cannot be done (the prefill engine is gone) is never silent: by default the
    decode engine recomputes the prompt and still produces the monolithic tokens; set to
    'fail', it raises."""
    prompt = PROMPTS[0]
    want = monolithic(model_dir, [prompt], 6)[0]
    pre = PrefillNode(model_dir, 1, cache(), transport="nixl")
    params = pre.prefill(prompt)
    pre.close()                                         # prefill engine dies before the pull
    for on_failure in ("recompute", "fail"):
        dec = DecodeNode(model_dir, 2, cache(), transport="nixl", strategy="direct",
                         on_failure=on_failure, pull_timeout_s=3.0)
        try:
            handle = dec.allocate(prompt, SamplingParams(max_tokens=6))
            if on_failure == "fail":
                with pytest.raises(PullFailed, match="decode rank"):
                    dec.pull(handle, params)
                continue
            outcome = dec.pull(handle, params)
            assert not outcome.ok and outcome.recomputed
            assert all(e.startswith("decode rank") for e in outcome.errors) and outcome.errors
            while dec.engine.has_unfinished():
                dec.engine.step()
            assert dec.engine.request(outcome.request_id).output_ids == want
        finally:
            dec.close()


def test_unread_request_is_released_at_lease_expiry(model_dir):
    clock = FakeClock()
    pre = PrefillNode(model_dir, 1, cache(), transport="local", lease_s=10.0, clock=clock)
    try:
        free_before = pre.engine.scheduler.pool.num_free
        pre.prefill(PROMPTS[0])
        assert pre.num_held == 1
        clock.advance(9.9)
        assert pre.poll() == []                          # lease still running
        clock.advance(0.2)
        released = pre.poll()
        assert [r.reason for r in released] == [ReleaseReason.EXPIRED]
        assert pre.num_held == 0 and pre.poll() == released     # exactly once
        assert pre.engine.scheduler.pool.num_free == free_before
    finally:
        pre.close()


def test_local_transport_round_trip(model_dir):
    """Both engines in one process (TP=1): LocalTransport, the embedded default."""
    want = monolithic(model_dir, PROMPTS[:2], 8)
    pre = PrefillNode(model_dir, 1, cache(), transport="local")
    dec = DecodeNode(model_dir, 1, cache("SD"), transport="local", strategy="auto")
    try:
        records = PDRouter(pre, [dec]).run(PROMPTS[:2], SamplingParams(max_tokens=8))
        assert [r.token_ids for r in records] == want
        assert all(r.nbytes > 0 and r.descriptors > 0 for r in records)
        assert pre.num_held == 0
    finally:
        pre.close()
        dec.close()


def test_a_rank_choosing_permute_reads_after_the_prefill_side_prepared(model_dir, monkeypatch):
    """Each decode rank resolves `auto` inside its pull. A rank whose choice needs its prefill
    ranks to gather first (permute: chosen here by a cost model that prices descriptors high
    and preparation at nothing, as a decode side calibrated otherwise would) answers
    needs_prepare without reading; the router asks the prefill side to prepare exactly that
    choice, once, and the rank pulls again (TP 1 -> 1, rank 0 in this process)."""
    want = monolithic(model_dir, PROMPTS[:1], 6)
    pre = PrefillNode(model_dir, 1, cache("SD"), transport="local")
    dec = DecodeNode(model_dir, 1, cache("DS"), transport="local", strategy="auto")
    monkeypatch.setattr(planner, "CostModel",
                        lambda: CostModel(descriptor_us=1e3, prepare_us=0.0, copy_us=0.0))
    prepared, real = [], pre.prepare_permute

    def spy(params, engine_id, layout, blocks, strategies):
        prepared.append(dict(strategies))
        return real(params, engine_id, layout, blocks, strategies)
    monkeypatch.setattr(pre, "prepare_permute", spy)
    try:
        records = PDRouter(pre, [dec]).run(PROMPTS[:1], SamplingParams(max_tokens=6))
        assert prepared == [{0: Strategy.PERMUTE}]
        assert [r.strategies for r in records] == [["permute"]]
        assert not records[0].recomputed, records[0].errors
        assert [r.token_ids for r in records] == want
        assert pre.num_held == 0
    finally:
        pre.close()
        dec.close()


def test_a_rank_needing_preparation_without_prepare_fails_for_the_policy(model_dir, monkeypatch):
    """A pull with no way to ask the prefill side (no `prepare`) for a rank that chose
    permute reads nothing and goes to the failure policy: recomputed, the same tokens."""
    want = monolithic(model_dir, PROMPTS[:1], 4)
    pre = PrefillNode(model_dir, 1, cache("SD"), transport="local")
    dec = DecodeNode(model_dir, 1, cache("DS"), transport="local", strategy="auto")
    monkeypatch.setattr(planner, "CostModel",
                        lambda: CostModel(descriptor_us=1e3, prepare_us=0.0, copy_us=0.0))
    try:
        params = pre.prefill(PROMPTS[0])
        handle = dec.allocate(PROMPTS[0], SamplingParams(max_tokens=4))
        outcome = dec.pull(handle, params)
        assert outcome.recomputed and not outcome.ok
        assert outcome.results[0].needs_prepare is False        # it failed, nothing pending
        assert "permute needs the prefill ranks to prepare" in outcome.errors[0]
        while dec.engine.has_unfinished():
            dec.engine.step()
        assert list(dec.engine.take(outcome.request_id).output_ids) == want[0]
    finally:
        pre.close()
        dec.close()


def test_prefill_refuses_to_decide_auto(model_dir):
    pre = PrefillNode(model_dir, 1, cache(), transport="local")
    try:
        params = pre.prefill(PROMPTS[0])
        with pytest.raises(ValueError, match="concrete strategy"):
            pre.prepare_permute(params, "decode-x", pre.layout.to_dict(), params.prefill_blocks,
                                {0: Strategy.AUTO})
    finally:
        pre.close()


def test_auto_is_resolved_by_the_decode_ranks(model_dir):
    pre = PrefillNode(model_dir, 1, cache(), transport="nixl")
    dec = DecodeNode(model_dir, 2, cache(), transport="nixl", strategy="auto")
    try:
        params = pre.prefill(PROMPTS[0])
        handle = dec.allocate(PROMPTS[0], SamplingParams(max_tokens=2))
        chosen = dec.choose_strategies(handle, params)       # through both rank processes
        assert set(chosen) == {0, 1} and Strategy.AUTO not in chosen.values()
        b = handle.blocks
        bases = pre.prepare_permute(params, dec.engine_id, dec.layout_dict,
                                    (b.num_tokens, b.attn_blocks, b.state_block), chosen)
        assert set(bases[0]) == {j for j, s in chosen.items() if s is Strategy.PERMUTE}
        outcome = dec.pull(handle, params, bases, strategies=chosen)
        assert outcome.ok, outcome.errors
        assert {r.rank: r.strategy for r in outcome.results} == {j: s.value for j, s in chosen.items()}
    finally:
        pre.close()
        dec.close()


def test_lease_renewal_keeps_blocks_while_reading(model_dir):
    """A decode rank's LeaseRenew (sent by its lease keeper over the handshake socket while
    a pull reads) extends the lease past its first deadline; once renewals stop, the lease
    expires. The lease runs on a fake clock: the renewals' real ages (milliseconds) would
    have to reach 30 s, on a 100 s lease, before a loaded machine could change the outcome."""
    from pdbridge.engine.lease_keeper import LeaseKeeper
    clock = FakeClock()
    pre = PrefillNode(model_dir, 1, cache(), transport="local", lease_s=100.0, clock=clock)
    keeper = LeaseKeeper("decode-x", 0)
    try:
        params = pre.prefill(PROMPTS[0])                 # deadline: start + 100
        clock.advance(50.0)
        keeper.start(params.request_id, params.endpoints, 0.2)
        wait_until(lambda: keeper.sent >= 2, what="two lease renewals")
        keeper.stop(params.request_id)
        sent = keeper.sent
        assert pre.poll() == []                          # renewed at ~start + 50: deadline +150
        clock.advance(70.0)                              # past the first deadline (start + 100)
        assert pre.poll() == [] and pre.num_held == 1
        clock.advance(1000.0)                            # past any renewed deadline
        assert [r.reason for r in pre.poll()] == [ReleaseReason.EXPIRED]
        assert pre.num_held == 0
        time.sleep(0.5)                                  # stopped: no renewal after stop()
        assert keeper.sent == sent
    finally:
        keeper.close()
        pre.close()


def test_a_decoder_without_the_secret_gets_nothing_and_says_so(model_dir):
    """A decode engine holding another secret cannot fetch the prefill ranks' metadata: its
    pull fails explicitly (fail policy) or recomputes (the default), never reads a byte."""
    from pdbridge.transport.side_channel_key import SideChannelKey
    prompt = PROMPTS[0]
    want = monolithic(model_dir, [prompt], 6)[0]
    pre = PrefillNode(model_dir, 1, cache(), transport="nixl")
    try:
        for on_failure in ("fail", "recompute"):
            params = pre.prefill(prompt)
            dec = DecodeNode(model_dir, 1, cache(), transport="nixl", strategy="direct",
                             on_failure=on_failure, pull_timeout_s=2.0,
                             key=SideChannelKey(b"another deployment's secret"))
            try:
                handle = dec.allocate(prompt, SamplingParams(max_tokens=6))
                if on_failure == "fail":
                    with pytest.raises(PullFailed, match="no metadata"):
                        dec.pull(handle, params)
                    continue
                outcome = dec.pull(handle, params)
                assert not outcome.ok and outcome.recomputed
                while dec.engine.has_unfinished():
                    dec.engine.step()
                assert dec.engine.request(outcome.request_id).output_ids == want
            finally:
                dec.close()
    finally:
        pre.close()


def test_request_ids_are_unguessable_and_renewals_capped(model_dir):
    """Ids carry 128 random bits (a forged ReadDone must name one); renewals stop extending a
    lease max_lease_s after prefill (default 10 leases), however many arrive."""
    from pdbridge.transport.messages import LeaseRenew
    clock = FakeClock()
    pre = PrefillNode(model_dir, 1, cache(), transport="local", lease_s=10.0, clock=clock)
    try:
        a, b = pre.prefill(PROMPTS[0]), pre.prefill(PROMPTS[2])
        engine, token = a.request_id.rsplit(":", 1)
        assert engine == pre.engine_id and len(bytes.fromhex(token)) == 16
        assert a.request_id != b.request_id
        pre.expect_readers(a, "d0", 1)
        released_at = None
        for _ in range(200):                             # a renewal every 9 s, for 30 minutes
            clock.advance(9.0)
            pre.leases.apply(LeaseRenew(a.request_id, "d0", 0), clock())
            pre.poll()
            if a.request_id not in pre.leases:
                released_at = clock()
                break
        assert released_at is not None and released_at - 1000.0 <= 10 * 10.0 + 9.0
        assert released_at - 1000.0 > 10.0 * 9, "the renewals did extend it up to the cap"
    finally:
        pre.close()


def test_a_notification_flood_is_capped(model_dir):
    """Issue 12: 10,000 x 60 KB messages grew a prefill process by 1 GB. What waits for the
    next poll is capped (MAX_INBOX_NBYTES); the rest is dropped, and the node still works."""
    from pdbridge.engine.pd_calls import PollNotifications
    from pdbridge.engine.prefill_rank import MAX_INBOX_NBYTES
    from pdbridge.transport.handshake import request
    from pdbridge.transport.messages import ReadDone
    pre = PrefillNode(model_dir, 1, cache(), transport="nixl")
    try:
        params = pre.prefill(PROMPTS[0])
        big = ReadDone("forged:" + "0" * 32, "decode-x", 0, True, "y" * 60_000)
        n = 2 * MAX_INBOX_NBYTES // 60_000
        for _ in range(n):
            request(params.endpoints[0], big, timeout_s=10.0, key=pre.key)
        (batch,) = pre.engine.call(PollNotifications())
        kept = sum(len(m) for m in batch.messages)
        assert 0 < kept <= MAX_INBOX_NBYTES and len(batch.messages) < n
        pre.poll()                                   # forged ids free nothing
        assert pre.num_held == 1
    finally:
        pre.close()
