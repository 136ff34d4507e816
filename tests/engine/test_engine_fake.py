"""Engine mechanics on a fake model (tests/engine/fake_model.py): batching, chunking, TP,
imported state, sampling. The real model's tests are in test_engine_model.py."""
import pytest
import torch

from pdbridge.engine.llm_engine import Engine
from pdbridge.engine.request import FinishReason, SamplingParams
from pdbridge.engine.scheduler import SchedulerConfig
from pdbridge.spec import CacheConfig

from fake_model import load_fake

torch.set_num_threads(1)

PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [2, 7], [1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5]]
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


def engine(tp=1, budget=64, blocks=32, **cache):
    cfg = CacheConfig(num_blocks=blocks, block_tokens=4, kernel_block_tokens=2, **cache)
    return Engine(None, tp, cfg, loader=load_fake,
                  scheduler=SchedulerConfig(max_batched_tokens=budget, max_num_seqs=8))


@pytest.fixture(scope="module")
def reference():
    """Each prompt alone, whole prompt in one step."""
    with engine() as e:
        return [e.generate([p], GREEDY)[0].token_ids for p in PROMPTS]


def test_uneven_batch_with_chunked_prefill_equals_one_at_a_time(reference):
    with engine(budget=5, conv_layout="SD", attn_layout="heads_across_blocks") as e:
        outs = e.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert len(set(map(tuple, reference))) == 3        # the fake model tells prompts apart


def test_requests_arriving_mid_decode(reference):
    with engine(budget=6) as e:
        a = e.add_request(PROMPTS[0], GREEDY)
        e.step()
        e.step()
        b = e.add_request(PROMPTS[2], GREEDY)
        while e.has_unfinished():
            e.step()
        assert e.request(a).output_ids == reference[0]
        assert e.request(b).output_ids == reference[2]
        assert e.scheduler.pool.num_free == 32


def test_imported_state_equals_full_prefill(reference):
    with engine() as p, engine(blocks=40) as d:
        d.add_request([5, 5, 5, 5, 5], GREEDY)          # occupy other blocks on the decode side
        d.step()
        prompt = PROMPTS[2]
        held = p.prefill_for_transfer(prompt)
        assert held.blocks.num_tokens == len(prompt) - 1
        got = d.add_request(prompt, GREEDY, imported=True)
        copy_blocks(p, held.blocks, d, got.blocks)
        d.state_arrived(got.request_id)
        p.release(held)
        assert p.scheduler.pool.num_free == 32
        while d.has_unfinished():
            d.step()
        assert d.request(got.request_id).output_ids == reference[2]


def copy_blocks(src, src_blocks, dst, dst_blocks):
    """Same TP and layout: copy every cache tensor's entries for the request's blocks."""
    assert len(src_blocks.attn_blocks) == len(dst_blocks.attn_blocks)
    m = src.layout.kernel_blocks_per_block
    for tl in src.layout.rank(0).tensors:
        sv, dv = src.caches.view(*tl.key), dst.caches.view(*tl.key)
        if tl.tensor.paged:
            pairs = [(s * m + i, d * m + i) for s, d in zip(src_blocks.attn_blocks,
                                                           dst_blocks.attn_blocks) for i in range(m)]
        else:
            pairs = [(src_blocks.state_block, dst_blocks.state_block)]
        dim = 1 if tl.tensor.name == "kv" else 0        # packed KV keeps its kv dim first
        for s, d in pairs:
            dv.select(dim, d).copy_(sv.select(dim, s))


def test_seeded_sampling_is_reproducible_and_batch_independent():
    hot = SamplingParams(max_tokens=8, temperature=1.5, top_p=0.9, seed=7, ignore_eos=True)
    with engine() as e:
        alone = e.generate([PROMPTS[0]], hot)[0].token_ids
        other = SamplingParams(max_tokens=8, temperature=1.5, seed=8, ignore_eos=True)
        batched = e.generate([PROMPTS[1], PROMPTS[0]], [other, hot])[1].token_ids
        greedy = e.generate([PROMPTS[0]], GREEDY)[0].token_ids
    assert alone == batched
    assert alone[:6] != greedy                          # temperature does something


def test_stops_on_eos():
    with engine() as e:
        out = e.generate([PROMPTS[1]], SamplingParams(max_tokens=6, stop_token_ids=()))[0]
        first = e.generate([PROMPTS[1]], GREEDY)[0].token_ids
        stopped = e.generate([PROMPTS[1]], SamplingParams(max_tokens=6,
                                                          stop_token_ids=(first[1],)))[0]
    assert stopped.token_ids == first[:2] and stopped.finish_reason.value == "stop_token"
    assert out.finish_reason.value in ("length", "eos")


def test_tp2_matches_tp1(reference):
    with engine(tp=2, budget=5) as e:
        outs = e.generate(PROMPTS, GREEDY)
        assert e.call(e_describe()) and len(e.call(e_describe())) == 2
    assert [o.token_ids for o in outs] == reference


def e_describe():
    from pdbridge.engine.messages import Describe
    return Describe()


def test_waiting_on_blocks_held_by_prefilled_requests_raises():
    from pdbridge.engine.scheduler import EngineFull
    with engine(blocks=6) as e:
        held = e.prefill_for_transfer(PROMPTS[2])       # 13 tokens: 4 blocks + 1 state
        with pytest.raises(EngineFull, match="held by prefilled"):
            e.generate([PROMPTS[0]], GREEDY)
        e.release(held)
        e.abort(next(iter(e._requests)))
        assert e.scheduler.pool.num_free == 6



def test_nonfinite_logits_end_the_request_as_an_error():
    """NaN logits are never sampled (argmax of NaN would be a silent token 0): the request
    ends with FinishReason.NONFINITE, the others run on, and every block comes back."""
    from fake_model import NAN_TOKEN, load_fake_nan
    cfg = CacheConfig(num_blocks=32, block_tokens=4, kernel_block_tokens=2)
    with Engine(None, 1, cfg, loader=load_fake_nan) as e:
        free = e.scheduler.pool.num_free
        bad, good = e.generate([[1, 2, NAN_TOKEN, 3], [1, 2, 3]], GREEDY)
        assert bad.finish_reason is FinishReason.NONFINITE and bad.token_ids == []
        assert good.finish_reason is FinishReason.LENGTH and len(good.token_ids) == 6
        assert e.scheduler.pool.num_free == free
