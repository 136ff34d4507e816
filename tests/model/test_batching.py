"""Batching invariants: chunked prefill == one-shot; a mixed batch (prefill chunks and decode
steps of sequences of different lengths) == each sequence alone; stale slot data is ignored."""
import pytest
import torch

from hf_tiny import PROMPT, prefill_states
from numerics import REORDER_ULPS, assert_close
from pdbridge.model import DenseCaches, ForwardBatch, load_model


@pytest.mark.parametrize("name", ["nemotron_h", "falcon_h1"])
def test_chunked_prefill_equals_one_shot(tiny, name):
    model = load_model(tiny[name][0])
    one_logits, one_states = prefill_states(model, PROMPT)
    logits, states = prefill_states(model, PROMPT, chunks=[6, len(PROMPT) - 6])
    assert_close(logits, one_logits, ulps=REORDER_ULPS, what="logits")
    for layer, (conv, ssm) in one_states.items():
        assert_close(states[layer][0], conv, ulps=REORDER_ULPS, what=f"layer {layer} conv")
        assert_close(states[layer][1], ssm, ulps=REORDER_ULPS, what=f"layer {layer} SSM")


# Three sequences, steps of (new tokens) each; None = not scheduled in that step.
SEQS = [[5, 8, 13, 21, 34, 55, 89], [2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11, 13, 15, 17]]
STEPS = [[7, 3, None], [1, 2, 9], [1, 1, 1], [1, 1, 1]]
TABLES = [[4, 0, 7], [1, 5, 6], [2, 3, 8]]       # interleaved, non-contiguous blocks
SLOTS = [2, 0, 3]


def _run(model, caches, seqs):
    """Drive the schedule over `seqs` (indices into SEQS) in one batch per step.
    Decode steps feed the greedy token. -> per sequence, the list of its logits rows."""
    toks = {i: list(SEQS[i]) for i in seqs}
    ctx = {i: 0 for i in seqs}
    out = {i: [] for i in seqs}
    for step in STEPS:
        ids, lens, tables, slots, who = [], [], [], [], []
        for i in seqs:
            n = step[i]
            if n is None:
                continue
            ids.append(toks[i][ctx[i]:ctx[i] + n])
            lens.append(ctx[i]), tables.append(TABLES[i]), slots.append(SLOTS[i]), who.append(i)
        if not ids:
            continue
        logits = model(ForwardBatch.build(ids, lens, tables, slots), caches)
        for row, i in enumerate(who):
            ctx[i] += len(ids[row])
            out[i].append(logits[row])
            if ctx[i] >= len(toks[i]):
                toks[i].append(int(logits[row].argmax()))
    return out


@pytest.mark.parametrize("name", ["bamba", "unusual"])
def test_mixed_batch_equals_one_at_a_time(tiny, name):
    model = load_model(tiny[name][0])

    def fresh(dirty: bool):
        c = DenseCaches(model.spec, num_blocks=9, block_tokens=4, kernel_block_tokens=2)
        if dirty:                                  # stale data from earlier requests
            g = torch.Generator().manual_seed(1)
            for t in [*c._conv.values(), *c._ssm.values(), *(x for kv in c._kv.values() for x in kv)]:
                t.copy_(torch.randn(t.shape, generator=g))
        return c

    together = _run(model, fresh(dirty=True), [0, 1, 2])
    for i in range(3):
        alone = _run(model, fresh(dirty=False), [i])[i]
        assert len(alone) == len(together[i])
        for a, b in zip(alone, together[i]):
            assert_close(b, a, ulps=REORDER_ULPS, what=f"sequence {i} logits")
