"""Several requests pulled in one round trip (DecodeNode.pull_results_many, PullBatch): each
decodes the monolithic engine's tokens, a request that fails in the batch fails alone (and is
recomputed), and the batch is one call to the ranks."""

import msgspec
import pytest
import torch

from pd_harness import PROMPTS, cache, monolithic
from pdbridge.engine.request import SamplingParams
from pdbridge.model import default_model
from pdbridge.serve.decode_node import DecodeNode, PullJob
from pdbridge.serve.prefill_node import PrefillNode

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir():
    return str(default_model.model_dir())


def _decode_all(dec: DecodeNode, outcomes) -> list[list[int]]:
    while dec.engine.has_unfinished():
        dec.engine.step()
    return [list(dec.engine.take(o.request_id).output_ids) for o in outcomes]


@pytest.mark.parametrize("strategy", ["direct", "staging"])     # in flight together; alone
def test_a_batch_of_pulls_gives_each_request_its_tokens(model_dir, strategy, monkeypatch):
    prompts = PROMPTS[:3]
    want = monolithic(model_dir, prompts, 5)
    pre = PrefillNode(model_dir, 1, cache("SD"), transport="nixl")
    dec = DecodeNode(model_dir, 2, cache("DS"), transport="nixl", strategy=strategy)
    calls = []
    real = dec.channel.send
    monkeypatch.setattr(dec.channel, "send",
                        lambda request, *a, **kw: calls.append(type(request).__name__)
                        or real(request, *a, **kw))
    try:
        jobs = []
        for prompt in prompts:
            params = pre.prefill(prompt)
            handle = dec.allocate(prompt, SamplingParams(max_tokens=5))
            pre.expect_readers(params, dec.engine_id, dec.tp_size)
            jobs.append(PullJob(handle, params))
        results = dec.pull_results_many(jobs)
        assert calls == ["PullBatch"]                   # one round trip for the three
        outcomes = [dec.finish_pull(job.handle, r) for job, r in zip(jobs, results)]
        assert all(o.ok and not o.recomputed for o in outcomes), [o.errors for o in outcomes]
        assert all(r.strategy == strategy for o in outcomes for r in o.results)
        assert _decode_all(dec, outcomes) == want
    finally:
        pre.close()
        dec.close()


def test_a_request_failing_in_a_batch_fails_alone(model_dir):
    """The middle request names prefill blocks that do not exist: every rank's plan of it
    fails, it is recomputed; the requests before and after it still pull their state."""
    prompts = PROMPTS[:3]
    want = monolithic(model_dir, prompts, 4)
    pre = PrefillNode(model_dir, 1, cache("SD"), transport="nixl")
    dec = DecodeNode(model_dir, 2, cache("DS"), transport="nixl", strategy="direct")
    try:
        jobs = []
        for i, prompt in enumerate(prompts):
            params = pre.prefill(prompt)
            handle = dec.allocate(prompt, SamplingParams(max_tokens=4))
            pre.expect_readers(params, dec.engine_id, dec.tp_size)
            if i == 1:
                bad = msgspec.structs.replace(params.blocks, attn_blocks=tuple(
                    10**6 + b for b in params.blocks.attn_blocks))
                params = msgspec.structs.replace(params, blocks=bad)
            jobs.append(PullJob(handle, params))
        results = dec.pull_results_many(jobs)
        assert [all(r.ok for r in rs) for rs in results] == [True, False, True]
        assert all("block" in r.detail for r in results[1])     # the plan said why
        outcomes = [dec.finish_pull(job.handle, r) for job, r in zip(jobs, results)]
        assert [o.recomputed for o in outcomes] == [False, True, False]
        assert _decode_all(dec, outcomes) == want
    finally:
        pre.close()
        dec.close()
