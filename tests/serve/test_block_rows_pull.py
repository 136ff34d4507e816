"""A `direct` pull reads through the layout pair's block rows (PlanCache.block_reads, no plan
made; issue 10); every other strategy, and a direct pull whose bytes are verified
(checksums), is planned. Either way the decode engine continues with the monolithic engine's
tokens, and the prefill engine frees every block it lent."""
from __future__ import annotations

import pytest

from pd_harness import PROMPTS, cache, monolithic
from pdbridge.engine.request import SamplingParams
from pdbridge.model import default_model
from pdbridge.serve.decode_node import DecodeNode
from pdbridge.serve.prefill_node import PrefillNode
from pdbridge.serve.router import PDRouter


@pytest.fixture(scope="module")
def nodes():
    model_dir = str(default_model.model_dir())
    pre = PrefillNode(model_dir, 1, cache())
    dec = DecodeNode(model_dir, 2, cache())
    yield model_dir, pre, dec
    dec.close()
    pre.close()


def _run(pre, dec, prompts, max_tokens):
    outcomes, finish = [], dec.finish_pull

    def spy(handle, results):
        outcomes.append(finish(handle, results))
        return outcomes[-1]
    dec.finish_pull = spy
    try:
        records = PDRouter(pre, [dec]).run(prompts, SamplingParams(max_tokens=max_tokens))
    finally:
        del dec.finish_pull
    assert not any(r.recomputed for r in records), [r.errors for r in records]
    return [r.token_ids for r in records], outcomes


@pytest.mark.parametrize("strategy,rows", [("auto", True), ("direct", True), ("staging", False)])
def test_direct_pulls_read_through_block_rows(nodes, strategy, rows):
    model_dir, pre, dec = nodes
    prompts = PROMPTS + [PROMPTS[0] * 9]            # a tail, and whole blocks
    want = monolithic(model_dir, prompts, 5)
    dec.strategy = dec.strategy.__class__(strategy)
    tokens, outcomes = _run(pre, dec, prompts, 5)
    assert tokens == want
    for o in outcomes:
        assert [r.phases.block_rows for r in o.results] == [rows] * dec.tp_size
        assert all(r.strategy == ("direct" if rows else strategy) for r in o.results)
        assert all(r.nbytes > 0 and r.descriptors > 0 for r in o.results)
    pre.poll()
    assert pre.num_held == 0


def test_verified_pulls_are_planned():
    model_dir = str(default_model.model_dir())
    want = monolithic(model_dir, PROMPTS[:2], 4)
    pre = PrefillNode(model_dir, 1, cache(), checksums=True)
    dec = DecodeNode(model_dir, 2, cache(), strategy="direct", checksums=True)
    try:
        tokens, outcomes = _run(pre, dec, PROMPTS[:2], 4)
        assert tokens == want
        assert not any(r.phases.block_rows for o in outcomes for r in o.results)
    finally:
        dec.close()
        pre.close()


def test_the_prefill_layout_goes_to_the_ranks_once():
    """The first Pull carries the prefill engine's layout whole, later ones its digest (each
    rank keeps it); a rank asked by digest for a layout it never had fails the pull, which
    is recomputed, not misread."""
    from pdbridge.engine.pd_calls import Pull
    model_dir = str(default_model.model_dir())
    want = monolithic(model_dir, PROMPTS[:3], 4)
    pre = PrefillNode(model_dir, 1, cache())
    dec = DecodeNode(model_dir, 2, cache())
    sent = []
    real = dec.channel.send
    dec.channel.send = lambda request, *a, **kw: sent.append(request) or real(request, *a, **kw)
    try:
        tokens, _ = _run(pre, dec, PROMPTS[:3], 4)
        assert tokens == want
        layouts = [r.prefill_layout for r in sent if isinstance(r, Pull)]
        assert len(layouts) == 3 and len(layouts[0]) > 1
        assert layouts[1:] == [{"digest": layouts[0]["digest"]}] * 2
        # A digest no rank has seen (another prefill geometry, never sent whole): refused.
        real_first = dec._first_pull

        def renamed(job, *a, **kw):
            first = real_first(job, *a, **kw)
            first.pull.prefill_layout.clear()
            first.pull.prefill_layout["digest"] = "0" * 16
            return first
        dec._first_pull = renamed
        records = PDRouter(pre, [dec]).run(PROMPTS[:1], SamplingParams(max_tokens=4))
        assert records[0].recomputed and records[0].token_ids == want[0]
        assert "not seen it" in " ".join(records[0].errors)
    finally:
        dec.close()
        pre.close()
