"""Announced requests (issue 10): the prefill server hands out a request's TransferParams just
before the step that ends its prefill; the decode server allocates and its ranks plan the
reads while that step runs, and the word that the prefill was computed starts the transfer.
In one process, without HTTP (the HTTP stack's tests run every request this way through the
router): the tokens are the monolithic engine's and the pull reads from the plan made ahead;
a failed prefill, a word that comes before the blocks, no word at all and a client that
leaves each end as the failure policy or the client says, with every block back."""
import asyncio
import dataclasses
import time

import msgspec
import pytest

from pd_harness import PROMPTS, cache, monolithic, wait_until
from pdbridge.engine.request import SamplingParams
from pdbridge.model import default_model
from pdbridge.serve import wire
from pdbridge.serve.decode_node import DecodeNode, OnFailure, PullJob
from pdbridge.serve.node_service import NodeConfig, NodeService
from pdbridge.serve.prefill_node import PrefillNode


@pytest.fixture(scope="module")
def model_dir():
    return str(default_model.model_dir())


@pytest.fixture(scope="module")
def pre(model_dir):
    # Room for every request here, some never read (their leases would free them later)
    node = PrefillNode(model_dir, 1, dataclasses.replace(cache(), num_blocks=256),
                       transport="local")
    yield node
    node.close()


def _service(**kw) -> NodeService:
    return NodeService(NodeConfig(wire.Role.DECODE, None, cache=cache(), transport="local",
                                  strategy="direct", **kw))


@pytest.fixture(scope="module")
def svc():
    service = _service()
    yield service
    service.close()


def _announced(pre: PrefillNode, prompt):
    """The request's announced TransferParams (checked against the computed ones) and
    whether it was announced before its tokens were computed."""
    seen = []
    rid = pre.submit(prompt, announce=lambda p: seen.append(
        (p, pre.engine.prefilled_handle(rid) is None)))
    while (params := pre.collect(rid)) is None:
        pre.engine.step()
    (announced, before), = seen
    assert announced == params      # the same id, blocks, layout and endpoints
    return announced, before


def test_the_prefill_announces_its_params_before_the_step_that_computes_them(pre):
    for prompt in PROMPTS:
        params, before = _announced(pre, prompt)
        assert before, "announced only after its tokens were computed"
        assert params.request_id in pre.leases


WORD_AT = [0.0, 0.0]     # when the word was given, when the first event came


async def _decode(svc, req, word: wire.PrefillComputed | None, *, ahead=True,
                  word_first=False):
    """The decode stream's tokens, transfer stats and error; `word` is given once the request
    waits (and, `ahead`, once its ranks planned ahead), or first (`word_first`). Records
    when the word was given and when the first event came (WORD_AT)."""
    if word_first:
        svc.computed(word)
    gen = svc.decode(req)
    first = asyncio.ensure_future(gen.__anext__())
    if word is not None and not word_first:
        rid = req.params.request_id
        loop = asyncio.get_running_loop()

        def waiting():
            entry = svc._awaiting.get(rid)
            return entry is not None and (entry[0].ahead is not None or not ahead)
        await loop.run_in_executor(None, wait_until, waiting, 30.0, "the request awaits")
        WORD_AT[0] = time.perf_counter()
        svc.computed(word)
    tokens, stats, error = [], None, None
    ev = await first
    WORD_AT[1] = time.perf_counter()
    while True:
        error = error or ev.error
        stats = stats or ev.transfer
        tokens += ev.token_ids
        if ev.finish_reason or ev.error:
            break
        ev = await gen.__anext__()
    await gen.aclose()
    return tokens, stats, error


def _request(prompt, params, max_tokens=6):
    return wire.TransferRequest(tuple(prompt), wire.Sampling(max_tokens=max_tokens), params,
                                computed=False)


def _run(svc, pre, prompt, max_tokens: int, failed: str | None = None, **kw):
    """One request announced by `pre` and decoded by `svc` with its word (PrefillComputed,
    `failed`: the prefill's error): (tokens, transfer stats, error)."""
    params, _ = _announced(pre, prompt)
    return asyncio.run(_decode(svc, _request(prompt, params, max_tokens),
                               wire.PrefillComputed(params.request_id, failed), **kw))


def _all_free(svc) -> bool:
    pool = svc.engine.scheduler.pool
    return pool.num_free == pool.num_blocks


def test_an_announced_request_reads_from_the_plan_made_ahead(model_dir, pre, svc):
    want = monolithic(model_dir, PROMPTS, 6)
    for prompt, expect in zip(PROMPTS, want):
        tokens, stats, error = _run(svc, pre, prompt, 6)
        assert error is None and tokens == expect
        assert stats.planned_ahead and not stats.recomputed and stats.nbytes > 0
        assert stats.pull_parts.plan_s == 0.0       # planned ahead, not in the pull
        # the stage counts from the word, not from the request's arrival before the plan
        assert 0 < stats.seconds < WORD_AT[1] - WORD_AT[0]
    wait_until(lambda: _all_free(svc), 30, "every decode block back")


def test_a_word_before_the_blocks_and_one_before_the_plan_decode_the_same(model_dir, pre, svc):
    expect = monolithic(model_dir, [PROMPTS[1]], 5)[0]
    for kw in ({"word_first": True}, {"ahead": False}):
        tokens, stats, error = _run(svc, pre, PROMPTS[1], 5, **kw)
        assert error is None and tokens == expect and not stats.recomputed, kw
    wait_until(lambda: _all_free(svc), 30, "every decode block back")


def test_a_failed_prefill_is_recomputed_or_failed_as_configured(model_dir, pre, svc):
    prompt = PROMPTS[3]
    tokens, stats, error = _run(svc, pre, prompt, 4, "boom")
    assert error is None and tokens == monolithic(model_dir, [prompt], 4)[0] and stats.recomputed
    assert any("the prefill was not computed: boom" in e for e in stats.errors), stats.errors
    failing = _service(on_failure=OnFailure.FAIL)
    try:
        tokens, _, error = _run(failing, pre, prompt, 4, "boom")
        assert tokens == [] and error.startswith("transfer_failed:") and "boom" in error
        wait_until(lambda: _all_free(failing), 30, "every decode block back")
    finally:
        failing.close()


def test_no_word_within_prefill_wait_s_goes_to_the_failure_policy(model_dir, pre):
    svc = _service(prefill_wait_s=0.3)
    try:
        prompt = PROMPTS[0]
        params, _ = _announced(pre, prompt)
        t0 = time.monotonic()
        tokens, stats, error = asyncio.run(_decode(svc, _request(prompt, params, 3), None))
        assert time.monotonic() - t0 >= 0.3
        assert error is None and stats.recomputed
        assert tokens == monolithic(model_dir, [prompt], 3)[0]
        assert any("prefill_wait_s" in e for e in stats.errors), stats.errors
        wait_until(lambda: _all_free(svc), 30, "every decode block back")
    finally:
        svc.close()


def test_a_client_leaving_while_announced_frees_its_blocks(pre, svc):
    params, _ = _announced(pre, PROMPTS[3])

    async def leave():
        gen = svc.decode(_request(PROMPTS[3], params))
        task = asyncio.ensure_future(gen.__anext__())
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, wait_until,
                                   lambda: params.request_id in svc._awaiting, 30.0, "awaiting")
        assert not _all_free(svc)                   # allocated while the prefill runs
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await gen.aclose()
    asyncio.run(leave())
    wait_until(lambda: _all_free(svc), 30, "the announced request's blocks back")
    assert params.request_id not in svc._awaiting
    svc.computed(wire.PrefillComputed(params.request_id))      # a late word changes nothing
    assert _all_free(svc)


def test_a_pull_whose_inputs_differ_from_the_plan_made_ahead_plans_afresh(model_dir, pre):
    """The ranks keep a plan made ahead only for a Pull of the very same inputs: other
    decode blocks under the same request id are planned anew (and read right: the tokens)."""
    node = DecodeNode(model_dir, 1, cache(), transport="local", strategy="direct")
    try:
        prompt = PROMPTS[1]
        expect = monolithic(model_dir, [prompt], 4)[0]
        params, _ = _announced(pre, prompt)
        sampling = SamplingParams(max_tokens=4)
        ahead = node.allocate(prompt, sampling)
        first, = node.plan_ahead([PullJob(ahead, params)])
        assert first is not None and first.pull.prefill_layout == {"digest": params.layout_digest}
        other = node.allocate(prompt, sampling)         # other blocks, the same request id
        assert other.blocks != ahead.blocks
        results = node.pull_results(other, params, None, 0.0, None, None)
        assert all(r.ok and not r.phases.planned_ahead for r in results)
        node.engine.abort(ahead.request_id)
        outcome = node.finish_pull(other, results)
        tokens = []
        while node.engine.has_unfinished():
            for out in node.engine.step():
                tokens += out.new_token_ids
        assert tokens == expect
        # planned ahead and pulled with the same inputs: read from that plan
        params, _ = _announced(pre, prompt)
        h = node.allocate(prompt, sampling)
        first, = node.plan_ahead([PullJob(h, params)])
        started = node.start_pull(PullJob(h, params), first)
        results = node.finish_started(started)
        assert all(r.ok and r.phases.planned_ahead for r in results)
        node.engine.abort(h.request_id)
        assert outcome.ok
    finally:
        node.close()


def test_plan_ahead_never_reads_and_a_failed_plan_keeps_nothing(model_dir, pre):
    node = DecodeNode(model_dir, 1, cache(), transport="local", strategy="direct")
    try:
        params, _ = _announced(pre, PROMPTS[0])
        h = node.allocate(PROMPTS[0], SamplingParams(max_tokens=2))
        regions = node.engine.worker.pd.caches.region_buffers
        before = [r.clone() for r in regions]
        bad = msgspec.structs.replace(params, endpoints=["tcp://127.0.0.1:9"] * len(params.endpoints),
                                  engine_id="prefill-nobody")
        node.pull_timeout_s = 0.5
        assert node.plan_ahead([PullJob(h, bad)]) == [None]     # no metadata: nothing kept
        first, = node.plan_ahead([PullJob(h, params)])
        assert first is not None
        assert all(r.equal(b) for r, b in zip(regions, before))     # planned, nothing read
        node.engine.abort(h.request_id)
    finally:
        node.close()
