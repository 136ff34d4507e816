"""The engine on the real pdbridge.model: PagedCaches == DenseCaches, TP sizes agree,
imported state == full prefill, batching == one at a time."""
import pytest
import torch

from pdbridge.engine.llm_engine import Engine
from pdbridge.engine.request import SamplingParams
from pdbridge.engine.scheduler import SchedulerConfig
from pdbridge.spec import CacheConfig

from engine_zoo import tiny_hybrid_dir
from test_engine_fake import copy_blocks

torch.set_num_threads(1)
PROMPTS = [[3, 17, 42, 5, 9, 60, 11, 2, 33, 7, 51], [8, 1], [4, 4, 20, 31, 13, 2, 9]]
GREEDY = SamplingParams(max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_hybrid_dir(tmp_path_factory.mktemp("engine_model") / "nemotron_g1")


def engine(model_dir, tp=1, budget=64, **cache):
    cfg = dict(num_blocks=24, block_tokens=4, kernel_block_tokens=2)
    cfg.update(cache)
    return Engine(model_dir, tp, CacheConfig(**cfg), dtype="float32",
                  scheduler=SchedulerConfig(max_batched_tokens=budget, max_num_seqs=8))


@pytest.fixture(scope="module")
def reference(model_dir):
    """pdbridge.model's own greedy loop over DenseCaches, one prompt at a time."""
    from pdbridge.model import DenseCaches, greedy, load_model
    model = load_model(model_dir)
    out = []
    for p in PROMPTS:
        caches = DenseCaches(model.spec, num_blocks=8, block_tokens=4)
        out.append(greedy(model, caches, p, GREEDY.max_tokens))
    return out


@pytest.mark.parametrize("layouts", [dict(), dict(conv_layout="SD", attn_layout="tokens_outer",
                                                  kv_packed=False, page_padding=True,
                                                  block_tokens=None)])
def test_paged_engine_matches_dense_reference_batched_and_chunked(model_dir, reference, layouts):
    with engine(model_dir, budget=5, **layouts) as e:
        assert [o.token_ids for o in e.generate(PROMPTS, GREEDY)] == reference


def test_imported_state_equals_full_prefill(model_dir, reference):
    cache = dict(attn_layout="heads_across_blocks", conv_layout="SD")
    with engine(model_dir, **cache) as p, engine(model_dir, num_blocks=30, **cache) as d:
        d.add_request(PROMPTS[1], GREEDY)       # a running decode to batch the last token with
        d.step()
        held = p.prefill_for_transfer(PROMPTS[0])
        got = d.add_request(PROMPTS[0], GREEDY, imported=True)
        copy_blocks(p, held.blocks, d, got.blocks)
        d.state_arrived(got.request_id)
        p.release(held)
        (c0, c1) = d.scheduler.schedule()       # a dry run (idempotent): both decodes, one step
        assert (c0.query_len, c1.query_len, c1.context_len) == (1, 1, len(PROMPTS[0]) - 1)
        while d.has_unfinished():
            d.step()
        assert d.request(got.request_id).output_ids == reference[0]


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_engines_agree_with_tp1(model_dir, reference, tp):
    with engine(model_dir, tp=tp, budget=6) as e:
        assert [o.token_ids for o in e.generate(PROMPTS, GREEDY)] == reference


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory):
    from pdbridge.model import default_model
    return str(default_model.model_dir(tmp_path_factory.mktemp("default_model")))


@pytest.mark.parametrize("tp", [3, pytest.param(4, marks=pytest.mark.slow)])
def test_default_model_tp_agrees_with_tp1(default_dir, tp):
    prompts = [[72, 101, 108, 108, 111], [33] * 9]
    with engine(default_dir) as e1:
        want = [o.token_ids for o in e1.generate(prompts, GREEDY)]
    with engine(default_dir, tp=tp, budget=4) as e:
        assert [o.token_ids for o in e.generate(prompts, GREEDY)] == want
