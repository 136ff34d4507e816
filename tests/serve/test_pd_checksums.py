"""Transfer checksums (checksums=True): what a decode rank received is compared with the
prefill side's digest of what it read; a byte corrupted after planning is caught and goes
through the failure policy (recompute: right tokens; fail: PullFailed naming the checksum)."""

import pytest
import torch

from pd_harness import PROMPTS, STRATEGIES, cache, monolithic, run_pd, wait_until
from pdbridge.engine.pd_calls import FlipByte
from pdbridge.engine.request import SamplingParams
from pdbridge.model import default_model
from pdbridge.plan import RequestBlocks, plan_transfer
from pdbridge.serve.decode_node import DecodeNode, PullFailed
from pdbridge.serve.prefill_node import PrefillNode
from pdbridge.serve.router import PDRouter
from pdbridge.spec import EngineLayout

torch.set_num_threads(1)
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir():
    return str(default_model.model_dir())


@pytest.fixture(scope="module")
def want(model_dir):
    return monolithic(model_dir, PROMPTS, MAX_TOKENS)


@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 1), (1, 2)])
def test_checksums_on_every_strategy_equals_monolithic(model_dir, want, prefill_tp, decode_tp):
    out, held = run_pd(model_dir, prefill_tp, [decode_tp], STRATEGIES, PROMPTS, MAX_TOKENS,
                       checksums=True)      # run_pd asserts that nothing was recomputed
    for s in STRATEGIES:
        assert [t for _, t in sorted(out[(decode_tp, s)])] == want, s
    assert held == 0


def _corrupt_after_digest(pre: PrefillNode, dec: DecodeNode, what: str, flipped: list):
    """Wrap pre.digest_reads (the last step before the pull): once the digests are taken,
    invert one byte that decode rank 0 reads, in a KV region or a state region."""
    real = pre.digest_reads

    def digest_then_corrupt(params, decode_layout, decode_blocks):
        digests = real(params, decode_layout, decode_blocks)
        if not flipped:
            plan = plan_transfer(pre.layout, dec.layout, 0, RequestBlocks(*params.prefill_blocks),
                                 RequestBlocks(*decode_blocks), "direct")
            paged = [pre.layout.rank(int(p)).regions[int(g)].paged
                     for p, g in zip(plan.src_rank, plan.src_region)]
            i = paged.index(what == "kv")
            p, g = int(plan.src_rank[i]), int(plan.src_region[i])
            offset = int(plan.src_offset[i] + plan.nbytes[i] // 2)
            pre.engine.call(FlipByte(p, g, offset))
            flipped.append(p)
        return digests
    pre.digest_reads = digest_then_corrupt


def _pools_full(*nodes) -> None:
    for n in nodes:
        pool = n.engine.scheduler.pool
        assert pool.num_free == pool.num_blocks, f"{n.engine_id} leaked blocks"


# Corrupting a small state run after permute gathered it changes nothing read (the scratch
# holds the good bytes): permute and auto corrupt KV, which every strategy reads directly.
CORRUPTIONS = [("direct", "state"), ("staging", "state"), ("permute", "kv"), ("auto", "kv"),
               ("direct", "kv")]


@pytest.mark.parametrize("strategy,what", CORRUPTIONS)
def test_corrupt_prefill_byte_recomputes(model_dir, want, strategy, what):
    pre = PrefillNode(model_dir, 2, cache(), transport="nixl", checksums=True)
    dec = DecodeNode(model_dir, 1, cache(), transport="nixl", strategy=strategy, checksums=True)
    flipped: list[int] = []
    try:
        _corrupt_after_digest(pre, dec, what, flipped)
        records = PDRouter(pre, [dec]).run(PROMPTS[:2], SamplingParams(max_tokens=MAX_TOKENS))
        assert [r.recomputed for r in records] == [True, False]
        (error,) = records[0].errors
        assert "checksum mismatch" in error and f"prefill rank {flipped[0]} -> decode rank 0" \
            in error, error
        assert [r.token_ids for r in records] == want[:2]
        assert pre.num_held == 0
        _pools_full(pre, dec)
    finally:
        pre.close()
        dec.close()


def test_corrupt_prefill_byte_fails_naming_the_checksum(model_dir):
    pre = PrefillNode(model_dir, 1, cache(), transport="nixl", checksums=True)
    dec = DecodeNode(model_dir, 2, cache(), transport="nixl", strategy="staging",
                     checksums=True, on_failure="fail")
    flipped: list[int] = []
    try:
        _corrupt_after_digest(pre, dec, "state", flipped)
        with pytest.raises(PullFailed, match=r"checksum mismatch: prefill rank 0 -> decode rank 0"):
            PDRouter(pre, [dec]).run(PROMPTS[:1], SamplingParams(max_tokens=MAX_TOKENS))
        wait_until(lambda: pre.poll() is not None and pre.num_held == 0, 30.0,
                   "the prefill node to free the failed request's blocks")
        _pools_full(pre, dec)
    finally:
        pre.close()
        dec.close()


def test_checksums_off_sends_none_and_on_needs_the_prefill_side(model_dir):
    pre = PrefillNode(model_dir, 1, cache(), transport="local")
    dec = DecodeNode(model_dir, 1, cache(), transport="local", checksums=True)
    try:
        with pytest.raises(ValueError, match="checksums=True"):
            PDRouter(pre, [dec])
        with pytest.raises(ValueError, match="checksums=False"):
            pre.digest_reads(pre.prefill(PROMPTS[0]), dec.layout_dict, (0, (), 0))
    finally:
        pre.close()
        dec.close()


def test_checksums_on_without_digests_fails_the_pull(model_dir):
    """A decode node with checksums on never accepts unchecked bytes: no digest, no decode."""
    pre = PrefillNode(model_dir, 1, cache(), transport="local", checksums=True)
    dec = DecodeNode(model_dir, 1, cache(), transport="local", strategy="direct",
                     checksums=True, on_failure="fail")
    try:
        params = pre.prefill(PROMPTS[0])
        handle = dec.allocate(PROMPTS[0], SamplingParams(max_tokens=2))
        pre.expect_readers(params, dec.engine_id, dec.tp_size)
        with pytest.raises(PullFailed, match="prefill rank 0 -> decode rank 0: no checksum sent"):
            dec.pull(handle, params)
    finally:
        pre.close()
        dec.close()


# ---- push mode: the prefill rank digests what it wrote, PushDone carries it --------------

@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 1), (1, 2)])
def test_push_with_checksums_equals_monolithic(model_dir, want, prefill_tp, decode_tp):
    out, held = run_pd(model_dir, prefill_tp, [decode_tp], ["direct"], PROMPTS, MAX_TOKENS,
                       transfer_mode="push", checksums=True)
    assert [t for _, t in sorted(out[(decode_tp, "direct")])] == want
    assert held == 0


def _corrupt_landed_push(dec: DecodeNode, flipped: list):
    """Wrap dec.await_push: after the writes landed, before they are compared, invert one
    byte of decode rank 0's state that the push wrote."""
    real = dec.await_push

    def corrupt_then_await(handle, params, target):
        if not flipped:
            plan = plan_transfer(EngineLayout.from_dict(dec.prefill_layout(params)), dec.layout, 0,
                                 RequestBlocks(*params.prefill_blocks),
                                 RequestBlocks(*target.decode_blocks), "direct")
            i = int(len(plan.nbytes) - 1)
            dec.engine.call(FlipByte(0, int(plan.dst_region[i]),
                                     int(plan.dst_offset[i] + plan.nbytes[i] // 2)))
            flipped.append(int(plan.src_rank[i]))
        return real(handle, params, target)
    dec.await_push = corrupt_then_await


@pytest.mark.parametrize("on_failure", ["recompute", "fail"])
def test_push_corrupted_on_arrival_goes_through_the_policy(model_dir, want, on_failure):
    pre = PrefillNode(model_dir, 1, cache(), transport="local", checksums=True)
    dec = DecodeNode(model_dir, 1, cache(), transport="local", transfer_mode="push",
                     checksums=True, on_failure=on_failure)
    flipped: list[int] = []
    try:
        _corrupt_landed_push(dec, flipped)
        router = PDRouter(pre, [dec])
        if on_failure == "fail":
            with pytest.raises(PullFailed, match="checksum mismatch: prefill rank 0 -> decode rank 0"):
                router.run(PROMPTS[:1], SamplingParams(max_tokens=MAX_TOKENS))
        else:
            records = router.run(PROMPTS[:2], SamplingParams(max_tokens=MAX_TOKENS))
            assert [r.recomputed for r in records] == [True, False]
            assert "checksum mismatch: prefill rank 0 -> decode rank 0" in records[0].errors[0]
            assert [r.token_ids for r in records] == want[:2]
        _pools_full(pre, dec)
    finally:
        pre.close()
        dec.close()
