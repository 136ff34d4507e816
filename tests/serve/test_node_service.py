"""A decode server's transfer runs off its engine loop (issue 10): on the transfer thread,
then back on the loop thread to decode. In one process, without HTTP: the tokens are the
monolithic engine's; a client that leaves while its state is still being pulled gets its
blocks freed once the pull has ended (never while the ranks still write into them)."""
import asyncio
import threading

import pytest

from pd_harness import PROMPTS, cache, monolithic, wait_until
from pdbridge.model import default_model
from pdbridge.serve import wire
from pdbridge.serve.node_service import NodeConfig, NodeService
from pdbridge.serve.prefill_node import PrefillNode


@pytest.fixture(scope="module")
def nodes():
    model_dir = str(default_model.model_dir())
    pre = PrefillNode(model_dir, 1, cache(), transport="local")
    svc = NodeService(NodeConfig(wire.Role.DECODE, None, cache=cache(), transport="local",
                                 strategy="direct"))
    yield model_dir, pre, svc
    svc.close()
    pre.close()


def _request(pre, prompt, max_tokens):
    return wire.TransferRequest(tuple(prompt), wire.Sampling(max_tokens=max_tokens),
                                pre.prefill(prompt))


async def _collect(svc, req):
    tokens, stats = [], None
    async for ev in svc.decode(req):
        assert ev.error is None, ev.error
        stats = stats or ev.transfer
        tokens += ev.token_ids
    return tokens, stats


def test_decoded_from_the_pulled_state(nodes):
    model_dir, pre, svc = nodes
    want = monolithic(model_dir, PROMPTS[:2], 6)
    for prompt, expect in zip(PROMPTS[:2], want):
        tokens, stats = asyncio.run(_collect(svc, _request(pre, prompt, 6)))
        assert tokens == expect
        assert not stats.recomputed and stats.nbytes > 0
        assert 0 < stats.pull_s <= stats.seconds and 0 <= stats.queued_s <= stats.seconds
        parts = [getattr(stats.pull_parts, p + "_s") for p in wire.PULL_PARTS]
        assert stats.pull_parts.read_s > 0 and min(parts) >= 0     # the parts make up pull_s
        assert sum(parts) == pytest.approx(stats.pull_s, rel=1e-6)


def test_a_client_leaving_mid_transfer_frees_the_blocks_after_the_pull(nodes, monkeypatch):
    _, pre, svc = nodes
    pool = svc.engine.scheduler.pool
    free = pool.num_free
    node = svc.node
    entered, release = threading.Event(), threading.Event()

    def held(real):
        def held_pull(*args, **kw):
            entered.set()
            release.wait(30.0)
            return real(*args, **kw)
        return held_pull
    # Either way a transfer thread collects a pull: sent from there, or sent at allocation.
    monkeypatch.setattr(node, "pull_results_many", held(node.pull_results_many))
    monkeypatch.setattr(node, "finish_started", held(node.finish_started))

    async def leave_mid_transfer():
        gen = svc.decode(_request(pre, PROMPTS[1], 6))
        task = asyncio.ensure_future(gen.__anext__())
        assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30.0)
        assert pool.num_free < free            # allocated, being pulled into
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await gen.aclose()                     # the client is gone: _abort on the loop thread
    asyncio.run(leave_mid_transfer())
    wait_until(lambda: svc.loop.call(lambda _: None).result(5.0) is None, 10.0, "the loop")
    assert pool.num_free < free                 # not freed while the ranks may still write
    release.set()
    wait_until(lambda: pool.num_free == free, 30.0, "the blocks freed after the pull")
    assert not svc.engine.has_unfinished()


def test_only_ranks_choosing_permute_are_prepared_for_then_pull_again(monkeypatch):
    """The decode server's transfer is one pull; its rank resolves `auto` there. Where that
    choice is permute (here: a cost model pricing descriptors high and preparation at
    nothing), the server asks the prefill server (/pd/prepare_permute) for that rank only,
    once, and the rank pulls again: the monolithic engine's tokens, nothing recomputed."""
    from pdbridge.plan import Strategy, planner
    from pdbridge.plan.cost_model import CostModel
    model_dir = str(default_model.model_dir())
    want = monolithic(model_dir, PROMPTS[:1], 5)
    monkeypatch.setattr(planner, "CostModel",
                        lambda: CostModel(descriptor_us=1e3, prepare_us=0.0, copy_us=0.0))
    pre = PrefillNode(model_dir, 1, cache("SD"), transport="local")
    svc = NodeService(NodeConfig(wire.Role.DECODE, None, cache=cache("DS"), transport="local",
                                 strategy="auto"))
    asked = []
    try:
        req = _request(pre, PROMPTS[0], 5)

        def post(base, path, body, kind):         # the prefill server's route, in process
            asked.append((path, dict(body.strategies)))
            return wire.PermuteBases(pre.prepare_permute(
                req.params, body.decode_engine_id, body.decode_layout, body.decode_blocks,
                body.strategies))
        monkeypatch.setattr(svc, "_post", post)
        tokens, stats = asyncio.run(_collect(svc, req))
        assert asked == [("/pd/prepare_permute", {0: Strategy.PERMUTE})]
        assert stats.strategies == ("permute",) and not stats.recomputed, stats.errors
        assert tokens == want[0]
    finally:
        svc.close()
        pre.close()


def test_an_idle_servers_pull_is_sent_at_allocation_and_decodes_the_same(nodes, monkeypatch):
    """With no transfer queued or running, a request's Pull goes to the remote ranks where
    its blocks were allocated (DecodeNode.start_pull) and the transfer thread collects it;
    requests that queue behind a running transfer are sent from the transfer thread. The
    tokens are the monolithic engine's either way."""
    model_dir, pre, svc = nodes
    node = svc.node
    started = []
    real = node.start_pull
    monkeypatch.setattr(node, "start_pull", lambda job, first=None: started.append(job) or real(job, first))
    want = monolithic(model_dir, PROMPTS[:3], 4)
    for prompt, expect in zip(PROMPTS[:3], want):       # one at a time: the server idle
        tokens, stats = asyncio.run(_collect(svc, _request(pre, prompt, 4)))
        assert tokens == expect and not stats.recomputed
    assert len(started) == 3

    async def together():
        return await asyncio.gather(*(_collect(svc, _request(pre, p, 4)) for p in PROMPTS[:3]))
    started.clear()
    outs = asyncio.run(together())
    assert [t for t, _ in outs] == want
    assert 1 <= len(started) <= 3
