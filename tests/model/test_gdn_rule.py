"""The fast gated-delta-net path against its oracle (gdn_chunked.py, gdn.use_rule): the chunked
WY-form rule against the per-token recurrence over chunk sizes, lengths (multiples of the chunk
and not), head counts, dtypes and prior states; then whole tiny Qwen models with CHUNKED against
RECURRENT: one-shot and chunked prefill, and mixed batches whose decode steps run batched."""
import pytest
import torch

from hf_tiny import PROMPT, prefill_states
from numerics import REORDER_ULPS, assert_close
from pdbridge.model import DenseCaches, ForwardBatch, load_model
from pdbridge.model.gdn import GatedDeltaNet, l2norm, use_rule
from pdbridge.model.gdn_chunked import chunked_rule, decode_step, recurrent_rule
from pdbridge.model.mamba2 import ScanImpl

DTYPES = [torch.float32, torch.float64]


def _inputs(n: int, h: int, dk: int, dv: int, dtype, prior: bool, seed: int = 0, batch=()):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*batch, *shape, generator=g, dtype=torch.float64)

    q = l2norm(rnd(n, h, dk)) * dk ** -0.5
    k = l2norm(rnd(n, h, dk))
    v = rnd(n, h, dv)
    decay = -torch.exp(rnd(n, h)) * 0.5                       # log decays, <= 0
    beta = torch.sigmoid(rnd(n, h))
    state = rnd(h, dk, dv) if prior else torch.zeros(*batch, h, dk, dv, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (q, k, v, decay, beta, state))


def _lengths(chunk: int) -> list[int]:
    return sorted({1, 2, chunk - 1, chunk, chunk + 1, 2 * chunk + 1, 3 * chunk, 3 * chunk + 1} - {0})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prior", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("heads, dk, dv", [(3, 8, 6), (1, 4, 4), (4, 16, 8)])
def test_chunked_rule_matches_recurrence(heads, dk, dv, chunk, prior, dtype):
    for n in _lengths(chunk):
        args = _inputs(n, heads, dk, dv, dtype, prior, seed=n)
        ref_o, ref_s = recurrent_rule(*args)
        o, s = chunked_rule(*args, chunk)
        assert o.dtype == dtype and s.dtype == dtype
        assert_close(o, ref_o, ulps=REORDER_ULPS, what=f"o, n={n}")
        assert_close(s, ref_s, ulps=REORDER_ULPS, what=f"final state, n={n}")


def test_chunked_rule_continues_a_sequence():
    """Two chunked calls, the second from the first's final state, equal one call."""
    q, k, v, g, b, s0 = _inputs(29, 2, 8, 4, torch.float64, prior=True)
    o, s = chunked_rule(q, k, v, g, b, s0, 8)
    o1, s1 = chunked_rule(q[:13], k[:13], v[:13], g[:13], b[:13], s0, 8)
    o2, s2 = chunked_rule(q[13:], k[13:], v[13:], g[13:], b[13:], s1, 8)
    assert_close(torch.cat([o1, o2]), o, ulps=REORDER_ULPS, what="o")
    assert_close(s2, s, ulps=REORDER_ULPS, what="state")


def test_long_sequence_keeps_decays_finite():
    """Strong decay over many chunks: the pairwise decays underflow to 0, never inf * 0."""
    q, k, v, g, b, s0 = _inputs(300, 2, 8, 4, torch.float32, prior=True)
    o, s = chunked_rule(q, k, v, g * 20.0, b, s0, 16)
    ref_o, ref_s = recurrent_rule(q, k, v, g * 20.0, b, s0)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert_close(o, ref_o, ulps=REORDER_ULPS, what="o")
    assert_close(s, ref_s, ulps=REORDER_ULPS, what="state")


def test_the_rule_is_the_delta_rule():
    """One token with beta = 1 and no decay from a zero state writes v at k: reading back with
    q = k returns v exactly (|k| = 1), which a plain linear-attention update would also do; a
    second token on the same key then *replaces* v (delta rule), where linear attention adds."""
    k = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    v1, v2 = torch.tensor([[[3.0]]], dtype=torch.float64), torch.tensor([[[5.0]]], dtype=torch.float64)
    zero, one = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    s = torch.zeros(1, 2, 1, dtype=torch.float64)
    o, s = recurrent_rule(k, k, v1, zero, one, s)
    assert o.item() == 3.0
    o, s = recurrent_rule(k, k, v2, zero, one, s)
    assert o.item() == 5.0
    o, _ = chunked_rule(torch.cat([k, k]), torch.cat([k, k]), torch.cat([v1, v2]),
                        torch.cat([zero, zero]), torch.cat([one, one]),
                        torch.zeros(1, 2, 1, dtype=torch.float64), 2)
    assert o.flatten().tolist() == [3.0, 5.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_step_matches_recurrence_per_sequence(dtype):
    q, k, v, g, b, _ = _inputs(1, 3, 8, 6, dtype, False, batch=(5,))
    state = torch.randn(5, 3, 8, 6, dtype=torch.float64).to(dtype)
    o, s = decode_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], b[:, 0], state)
    for i in range(5):
        ref_o, ref_s = recurrent_rule(q[i], k[i], v[i], g[i], b[i], state[i])
        assert_close(o[i], ref_o[0], ulps=REORDER_ULPS, what=f"o, sequence {i}")
        assert_close(s[i], ref_s, ulps=REORDER_ULPS, what=f"state, sequence {i}")


# ---- whole models: CHUNKED against RECURRENT ------------------------------------------------

MODELS = ["qwen3_5_text", "qwen3_next"]


def _load(qwen_tiny, name, dtype, impl, chunk=None):
    model = load_model(qwen_tiny[name][0], dtype=dtype)
    use_rule(model, impl, chunk)
    return model


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [None, [6, 5], [1, 3, 7]])
@pytest.mark.parametrize("name", MODELS)
def test_model_prefill_chunked_equals_recurrent(qwen_tiny, name, chunks, dtype):
    prompt = PROMPT * 2           # 22 tokens: several rule chunks (prefill_states holds 24)
    chunks = chunks and [*chunks[:-1], len(prompt) - sum(chunks[:-1])]
    ref_logits, ref_states = prefill_states(_load(qwen_tiny, name, dtype, ScanImpl.RECURRENT),
                                            prompt, chunks=chunks)
    for chunk in (1, 4, 8, 64):
        logits, states = prefill_states(_load(qwen_tiny, name, dtype, ScanImpl.CHUNKED, chunk),
                                        prompt, chunks=chunks)
        assert_close(logits, ref_logits, ulps=REORDER_ULPS, what=f"logits, chunk {chunk}")
        for layer, (conv, rec) in ref_states.items():
            assert_close(states[layer][0], conv, ulps=REORDER_ULPS, what=f"layer {layer} conv")
            assert_close(states[layer][1], rec, ulps=REORDER_ULPS, what=f"layer {layer} state")


SEQS = [[5, 8, 13, 21, 34, 55, 89, 1, 2], [2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11, 13, 15, 17],
        [40]]
STEPS = [[7, 3, None, 1], [1, 2, 9, 1], [1, 1, 1, 1], [1, 1, None, 1], [1, 1, 1, 1]]
SLOTS = [2, 0, 5, 3]


def _schedule(model, dtype):
    """STEPS one batch per step (prefill chunks mixed with decode steps, decodes feed the greedy
    token), from dirty caches. -> logits of every step, and the caches."""
    caches = DenseCaches(model.spec, num_blocks=16, block_tokens=4, dtype=dtype, ssm_dtype=dtype)
    g = torch.Generator().manual_seed(3)
    for t in [*caches._conv.values(), *caches._ssm.values()]:
        t.copy_(torch.randn(t.shape, generator=g, dtype=dtype))
    toks, ctx, out = [list(s) for s in SEQS], [0] * len(SEQS), []
    tables = [[4 * i + j for j in range(4)] for i in range(len(SEQS))]
    for step in STEPS:
        who = [i for i, n in enumerate(step) if n is not None]
        ids = [toks[i][ctx[i]:ctx[i] + step[i]] for i in who]
        batch = ForwardBatch.build(ids, [ctx[i] for i in who], [tables[i] for i in who],
                                   [SLOTS[i] for i in who])
        logits = model(batch, caches)
        out.append(logits)
        for row, i in enumerate(who):
            ctx[i] += step[i]
            if ctx[i] >= len(toks[i]):
                toks[i].append(int(logits[row].argmax()))
    return out, caches


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MODELS)
def test_mixed_batch_batched_decode_equals_recurrent(qwen_tiny, name, dtype):
    ref, ref_caches = _schedule(_load(qwen_tiny, name, dtype, ScanImpl.RECURRENT), dtype)
    got, caches = _schedule(_load(qwen_tiny, name, dtype, ScanImpl.CHUNKED, 4), dtype)
    for k, (a, b) in enumerate(zip(got, ref)):
        assert_close(a, b, ulps=REORDER_ULPS, what=f"step {k} logits")
    for layer in ref_caches._conv:
        for slot in SLOTS:
            assert_close(caches.conv(layer)[slot], ref_caches.conv(layer)[slot],
                         ulps=REORDER_ULPS, what=f"layer {layer} slot {slot} conv")
            assert_close(caches.ssm(layer)[slot], ref_caches.ssm(layer)[slot],
                         ulps=REORDER_ULPS, what=f"layer {layer} slot {slot} state")


def test_decode_steps_of_a_batch_run_in_one_call_per_layer(qwen_tiny, monkeypatch):
    """Four decode steps in one batch: one decode_step per delta-net layer, no per-sequence rule."""
    import pdbridge.model.gdn as gdn
    model = _load(qwen_tiny, "qwen3_5_text", torch.float32, ScanImpl.CHUNKED)
    caches = DenseCaches(model.spec, num_blocks=8, block_tokens=4)
    model(ForwardBatch.build([[1, 2, 3]] * 4, [0] * 4, [[0], [1], [2], [3]], [0, 1, 2, 3]), caches)
    calls = []
    real = gdn.decode_step
    monkeypatch.setattr(gdn, "decode_step", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(gdn, "chunked_rule", None)             # would raise if called
    monkeypatch.setattr(gdn, "recurrent_rule", None)
    model(ForwardBatch.build([[4]] * 4, [3] * 4, [[0], [1], [2], [3]], [0, 1, 2, 3]), caches)
    layers = sum(isinstance(m, GatedDeltaNet) for m in model.modules())
    assert layers == 4 and len(calls) == layers and all(s[0] == 4 for s in calls)
