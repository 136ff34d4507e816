"""The fast Mamba2 path against its oracle (ssd.py, mamba2.ScanImpl): the chunked SSD scan
against the per-token recurrence over chunk sizes, lengths, dtypes and prior states; then whole
tiny models (B/C groups G = 1, 2, 3) with ScanImpl.CHUNKED against ScanImpl.RECURRENT: one-shot
and chunked prefill, and mixed batches whose decode steps run batched."""
import pytest
import torch

from hf_tiny import PROMPT, prefill_states
from numerics import REORDER_ULPS, assert_close
from pdbridge.model import DenseCaches, ForwardBatch, load_model
from pdbridge.model.mamba2 import ScanImpl, use_scan
from pdbridge.model.ssd import chunked_scan, decode_step, recurrent_scan, segsum

DTYPES = [torch.float32, torch.float64]


def _inputs(n: int, h: int, p: int, ns: int, dtype, prior: bool, seed: int = 0, batch=()):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*batch, *shape, generator=g, dtype=torch.float64).to(dtype)

    x, b, c = rnd(n, h, p), rnd(n, h, ns), rnd(n, h, ns)
    dt = torch.nn.functional.softplus(rnd(n, h) - 1.0)
    a = -torch.exp(torch.empty(h, dtype=torch.float64).uniform_(-1.0, 1.5, generator=g)).to(dtype)
    state = rnd(h, p, ns) if prior else torch.zeros(*batch, h, p, ns, dtype=dtype)
    return x, dt, a, b, c, state


def _lengths(chunk: int) -> list[int]:
    return sorted({1, 2, chunk - 1, chunk, chunk + 1, 2 * chunk + 1, 3 * chunk, 3 * chunk + 1} - {0})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prior", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 8, 16])
def test_chunked_scan_matches_recurrence(chunk, prior, dtype):
    for n in _lengths(chunk):
        x, dt, a, b, c, s0 = _inputs(n, 3, 4, 5, dtype, prior, seed=n)
        ref_y, ref_s = recurrent_scan(x, dt, a, b, c, s0)
        y, s = chunked_scan(x, dt, a, b, c, s0, chunk)
        assert y.dtype == dtype and s.dtype == dtype
        assert_close(y, ref_y, ulps=REORDER_ULPS, what=f"y, n={n}")
        assert_close(s, ref_s, ulps=REORDER_ULPS, what=f"final state, n={n}")


def test_chunked_scan_continues_a_sequence():
    """Two chunked calls, the second from the first's final state, equal one call."""
    x, dt, a, b, c, s0 = _inputs(29, 2, 3, 4, torch.float64, prior=True)
    y, s = chunked_scan(x, dt, a, b, c, s0, 8)
    y1, s1 = chunked_scan(x[:13], dt[:13], a, b[:13], c[:13], s0, 8)
    y2, s2 = chunked_scan(x[13:], dt[13:], a, b[13:], c[13:], s1, 8)
    assert_close(torch.cat([y1, y2]), y, ulps=REORDER_ULPS, what="y")
    assert_close(s2, s, ulps=REORDER_ULPS, what="state")


def test_long_sequence_keeps_decays_finite():
    """Strong decay over many chunks: exp(segsum) underflows to 0, never inf * 0 = nan."""
    x, dt, a, b, c, s0 = _inputs(300, 2, 3, 4, torch.float32, prior=True)
    y, s = chunked_scan(x, dt * 20.0, a, b, c, s0, 16)
    ref_y, ref_s = recurrent_scan(x, dt * 20.0, a, b, c, s0)
    assert_close(y, ref_y, ulps=REORDER_ULPS, what="y")
    assert_close(s, ref_s, ulps=REORDER_ULPS, what="state")


def test_segsum():
    v = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    inf = float("-inf")
    assert torch.equal(segsum(v), torch.tensor([[0.0, inf, inf], [2.0, 0.0, inf],
                                                [5.0, 3.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_step_matches_recurrence_per_sequence(dtype):
    x, dt, a, b, c, _ = _inputs(1, 3, 4, 5, dtype, False, batch=(6,))
    state = torch.randn(6, 3, 4, 5, dtype=torch.float64).to(dtype)
    y, s = decode_step(x[:, 0], dt[:, 0], a, b[:, 0], c[:, 0], state)
    for i in range(6):
        ref_y, ref_s = recurrent_scan(x[i], dt[i], a, b[i], c[i], state[i])
        assert_close(y[i], ref_y[0], ulps=REORDER_ULPS, what=f"y, sequence {i}")
        assert_close(s[i], ref_s, ulps=REORDER_ULPS, what=f"state, sequence {i}")


# ---- whole models: CHUNKED against RECURRENT ------------------------------------------------

MODELS = ["nemotron_h", "granitemoehybrid", "unusual"]       # G = 2, 1, 3


def _load(tiny, name, dtype, impl, chunk=None):
    model = load_model(tiny[name][0], dtype=dtype)
    use_scan(model, impl, chunk)
    return model


def _assert_states(states, ref_states):
    for layer, (conv, ssm) in ref_states.items():
        assert_close(states[layer][0], conv, ulps=REORDER_ULPS, what=f"layer {layer} conv")
        assert_close(states[layer][1], ssm, ulps=REORDER_ULPS, what=f"layer {layer} SSM")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [None, [6, 5], [1, 3, 7]])
@pytest.mark.parametrize("name", MODELS)
def test_model_prefill_chunked_equals_recurrent(tiny, name, chunks, dtype):
    prompt = PROMPT * 2           # 22 tokens: several scan chunks (prefill_states holds 24)
    chunks = chunks and [*chunks[:-1], len(prompt) - sum(chunks[:-1])]
    ref_logits, ref_states = prefill_states(_load(tiny, name, dtype, ScanImpl.RECURRENT),
                                            prompt, chunks=chunks)
    for chunk in (1, 4, 8):
        logits, states = prefill_states(_load(tiny, name, dtype, ScanImpl.CHUNKED, chunk),
                                        prompt, chunks=chunks)
        assert_close(logits, ref_logits, ulps=REORDER_ULPS, what=f"logits, chunk {chunk}")
        _assert_states(states, ref_states)


# Four sequences; per step each one's new tokens (None: not scheduled). Steps mix prefill chunks
# with decode steps, and sequence 3 is a one-token prompt (a fresh decode-shaped step).
SEQS = [[5, 8, 13, 21, 34, 55, 89, 1, 2], [2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11, 13, 15, 17],
        [40]]
STEPS = [[7, 3, None, 1], [1, 2, 9, 1], [1, 1, 1, 1], [1, 1, None, 1], [1, 1, 1, 1]]
SLOTS = [2, 0, 5, 3]


def _schedule(model, dtype):
    """Run STEPS in one batch per step (decodes feed the greedy token), starting from dirty
    caches. -> logits of every step, and the caches."""
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
def test_mixed_batch_batched_decode_equals_recurrent(tiny, name, dtype):
    ref, ref_caches = _schedule(_load(tiny, name, dtype, ScanImpl.RECURRENT), dtype)
    got, caches = _schedule(_load(tiny, name, dtype, ScanImpl.CHUNKED, 4), dtype)
    for k, (a, b) in enumerate(zip(got, ref)):
        assert_close(a, b, ulps=REORDER_ULPS, what=f"step {k} logits")
    for layer in ref_caches._conv:
        for slot in SLOTS:
            assert_close(caches.conv(layer)[slot], ref_caches.conv(layer)[slot],
                         ulps=REORDER_ULPS, what=f"layer {layer} slot {slot} conv")
            assert_close(caches.ssm(layer)[slot], ref_caches.ssm(layer)[slot],
                         ulps=REORDER_ULPS, what=f"layer {layer} slot {slot} SSM")


def test_decode_steps_of_a_batch_run_in_one_call_per_layer(tiny, monkeypatch):
    """Four decode steps in one batch: one decode_step per Mamba2 layer, no per-sequence scan."""
    import pdbridge.model.mamba2 as mamba2
    model = _load(tiny, "bamba", torch.float32, ScanImpl.CHUNKED)
    caches = DenseCaches(model.spec, num_blocks=8, block_tokens=4)
    model(ForwardBatch.build([[1, 2, 3]] * 4, [0] * 4, [[0], [1], [2], [3]], [0, 1, 2, 3]), caches)
    calls = []
    real = mamba2.decode_step
    monkeypatch.setattr(mamba2, "decode_step", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(mamba2, "chunked_scan", None)          # would raise if called
    model(ForwardBatch.build([[4]] * 4, [3] * 4, [[0], [1], [2], [3]], [0, 1, 2, 3]), caches)
    layers = sum(isinstance(m, mamba2.Mamba2) for m in model.modules())
    assert len(calls) == layers and all(s[0] == 4 for s in calls)
