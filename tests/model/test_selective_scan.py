"""The fast Mamba1 path against its oracle (selective_scan.py, mamba1 with ScanImpl): the chunked
parallel scan against the per-token recurrence over chunk sizes, lengths, dtypes and prior
states; the batched decode step; then whole tiny Jamba models, CHUNKED against RECURRENT: one-shot
and chunked prefill, and mixed batches whose decode steps run batched."""
import pytest
import torch

from hf_tiny import PROMPT, hf_config, hf_model, prefill_states, save
from numerics import REORDER_ULPS, assert_close
from pdbridge.model import DenseCaches, ForwardBatch, load_model
from pdbridge.model.mamba1 import Mamba1, use_scan1
from pdbridge.model.mamba2 import ScanImpl
from pdbridge.model.selective_scan import chunked_scan, decode_step, recurrent_scan

DTYPES = [torch.float32, torch.float64]


def _inputs(n: int, i: int, ns: int, dtype, prior: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    x, b, c = rnd(n, i), rnd(n, ns), rnd(n, ns)
    dt = torch.nn.functional.softplus(rnd(n, i) - 1.0)
    a = -torch.exp(torch.empty(i, ns, dtype=torch.float64).uniform_(-1.0, 1.5, generator=g)).to(dtype)
    state = rnd(i, ns) if prior else torch.zeros(i, ns, dtype=dtype)
    return x, dt, a, b, c, state


def _lengths(chunk: int) -> list[int]:
    return sorted({1, 2, chunk - 1, chunk, chunk + 1, 2 * chunk + 1, 3 * chunk, 3 * chunk + 1} - {0})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prior", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 4, 8, 16])
def test_chunked_scan_matches_recurrence(chunk, prior, dtype):
    for n in _lengths(chunk):
        x, dt, a, b, c, s0 = _inputs(n, 6, 5, dtype, prior, seed=n)
        ref_y, ref_s = recurrent_scan(x, dt, a, b, c, s0)
        y, s = chunked_scan(x, dt, a, b, c, s0, chunk)
        assert y.dtype == dtype and s.dtype == dtype and y.shape == (n, 6)
        assert_close(y, ref_y, ulps=REORDER_ULPS, what=f"y, n={n}")
        assert_close(s, ref_s, ulps=REORDER_ULPS, what=f"final state, n={n}")


def test_chunked_scan_continues_a_sequence():
    x, dt, a, b, c, s0 = _inputs(29, 4, 3, torch.float64, prior=True)
    y, s = chunked_scan(x, dt, a, b, c, s0, 8)
    y1, s1 = chunked_scan(x[:13], dt[:13], a, b[:13], c[:13], s0, 8)
    y2, s2 = chunked_scan(x[13:], dt[13:], a, b[13:], c[13:], s1, 8)
    assert_close(torch.cat([y1, y2]), y, ulps=REORDER_ULPS, what="y")
    assert_close(s2, s, ulps=REORDER_ULPS, what="state")


def test_strong_decay_stays_finite():
    """Large dt * |A| over 300 tokens (three blocks of 16 chunks of 8): decays clamp at
    exp(-80), never inf or nan, and the result is the recurrence's."""
    x, dt, a, b, c, s0 = _inputs(300, 4, 3, torch.float32, prior=True)
    y, s = chunked_scan(x, dt * 20.0, a, b, c, s0, 8)
    ref_y, ref_s = recurrent_scan(x, dt * 20.0, a, b, c, s0)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert_close(y, ref_y, ulps=REORDER_ULPS, what="y")


def test_the_scan_comparison_can_fail():
    """A scan that ignores the prior state, or runs one token short, is caught."""
    x, dt, a, b, c, s0 = _inputs(20, 4, 3, torch.float64, prior=True)
    ref_y, _ = recurrent_scan(x, dt, a, b, c, s0)
    y0, _ = chunked_scan(x, dt, a, b, c, torch.zeros_like(s0), 8)
    with pytest.raises(AssertionError, match="ulps"):
        assert_close(y0, ref_y, ulps=REORDER_ULPS)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_step_matches_recurrence_per_sequence(dtype):
    seqs = [_inputs(1, 6, 5, dtype, prior=True, seed=s) for s in range(4)]
    x, dt, b, c = (torch.cat([q[k] for q in seqs]) for k in (0, 1, 3, 4))
    s0 = torch.stack([q[5] for q in seqs])
    a = seqs[0][2]
    y, s = decode_step(x, dt, a, b, c, s0)
    for k, q in enumerate(seqs):
        ref_y, ref_s = recurrent_scan(q[0], q[1], a, q[3], q[4], q[5])
        assert_close(y[k], ref_y[0], ulps=REORDER_ULPS, what=f"y of sequence {k}")
        assert_close(s[k], ref_s, ulps=REORDER_ULPS, what=f"state of sequence {k}")


@pytest.fixture(scope="module")
def jamba_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jamba")
    return {n: save(hf_model(hf_config(n)), root / n) for n in ("jamba", "jamba_bias")}


def _load(d, dtype, impl, chunk=None):
    model = load_model(d, dtype=dtype)
    use_scan1(model, impl, chunk)
    return model


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [None, [6, 5], [1, 3, 7]])
@pytest.mark.parametrize("name", ["jamba", "jamba_bias"])
def test_model_prefill_chunked_equals_recurrent(jamba_dirs, name, chunks, dtype):
    prompt = PROMPT * 2
    chunks = chunks and [*chunks[:-1], len(prompt) - sum(chunks[:-1])]
    d = jamba_dirs[name]
    ref_logits, ref_states = prefill_states(_load(d, dtype, ScanImpl.RECURRENT), prompt,
                                            chunks=chunks)
    for chunk in (1, 4, 8):
        logits, states = prefill_states(_load(d, dtype, ScanImpl.CHUNKED, chunk), prompt,
                                        chunks=chunks)
        assert_close(logits, ref_logits, ulps=REORDER_ULPS, what=f"logits, chunk {chunk}")
        for layer, (conv, ssm) in ref_states.items():
            assert_close(states[layer][0], conv, ulps=REORDER_ULPS, what=f"layer {layer} conv")
            assert_close(states[layer][1], ssm, ulps=REORDER_ULPS, what=f"layer {layer} SSM")


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_mixed_batches_chunked_equals_recurrent(jamba_dirs, dtype):
    """test_ssd's schedule (prefill chunks mixed with batched decode steps, dirty slots)."""
    from test_ssd import SLOTS, _schedule
    d = jamba_dirs["jamba"]
    ref, ref_caches = _schedule(_load(d, dtype, ScanImpl.RECURRENT), dtype)
    got, caches = _schedule(_load(d, dtype, ScanImpl.CHUNKED, 4), dtype)
    for k, (a, b) in enumerate(zip(got, ref)):
        assert_close(a, b, ulps=REORDER_ULPS, what=f"step {k} logits")
    for layer in ref_caches._conv:
        for slot in SLOTS:
            assert_close(caches.conv(layer)[slot], ref_caches.conv(layer)[slot],
                         ulps=REORDER_ULPS, what=f"layer {layer} slot {slot} conv")
            assert_close(caches.ssm(layer)[slot], ref_caches.ssm(layer)[slot],
                         ulps=REORDER_ULPS, what=f"layer {layer} slot {slot} SSM")


def test_decode_steps_of_a_batch_run_in_one_call_per_layer(jamba_dirs, monkeypatch):
    import pdbridge.model.mamba1 as mamba1
    model = _load(jamba_dirs["jamba"], torch.float32, ScanImpl.CHUNKED)
    caches = DenseCaches(model.spec, num_blocks=8, block_tokens=4)
    model(ForwardBatch.build([[1, 2, 3]] * 4, [0] * 4, [[0], [1], [2], [3]], [0, 1, 2, 3]), caches)
    calls = []
    real = mamba1.decode_step
    monkeypatch.setattr(mamba1, "decode_step", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(mamba1, "chunked_scan", None)          # would raise if called
    model(ForwardBatch.build([[4]] * 4, [3] * 4, [[0], [1], [2], [3]], [0, 1, 2, 3]), caches)
    layers = sum(isinstance(m, Mamba1) for m in model.modules())
    assert layers == 2 and len(calls) == layers and all(s[0] == 4 for s in calls)
