"""The fast short-conv path against its oracle (short_conv.ConvImpl): one conv1d per prefill chunk
and one batched step for all decode rows, against the per-token shift register, over kernel
sizes, lengths, prior states, chunkings, mixed batches and dtypes; then whole tiny LFM2 models."""
import pytest
import torch

from hf_tiny import LFM2, PROMPT, hf_config, hf_model, prefill_states, save
from numerics import REORDER_ULPS, assert_close
from pdbridge.model import DenseCaches, ForwardBatch, SingleComm, load_model
from pdbridge.model.short_conv import ConvImpl, ShortConv, use_conv_impl
from pdbridge.spec import ShortConvSpec

DTYPES = [torch.float32, torch.float64]


class _Caches:
    def __init__(self, conv):
        self._conv = conv

    def conv(self, layer):
        return self._conv


def _module(d: int, l_cache: int, bias: bool, dtype, impl, seed=0) -> ShortConv:
    torch.manual_seed(seed)
    m = ShortConv(ShortConvSpec(d, l_cache), (0, d), 8, 0, bias, SingleComm(), impl)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.5)
    return m.to(dtype)


def _run(m, seqs, ctx, slots, state, dtype):
    """One batch: per sequence, its hidden rows (n_i, 8) after ctx_i tokens in slot_i."""
    h = torch.cat(seqs)
    ids = [[0] * s.shape[0] for s in seqs]
    batch = ForwardBatch.build(ids, ctx, [[0]] * len(seqs), slots)
    caches = _Caches(state)
    return m(h.to(dtype), batch, caches), caches._conv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prior", [False, True])
@pytest.mark.parametrize("l_cache", [2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_vector_prefill_matches_per_token(l_cache, prior, bias, dtype):
    g = torch.Generator().manual_seed(l_cache)
    for n in (1, 2, l_cache - 1, l_cache, l_cache + 1, 17):
        h = torch.randn(n, 8, generator=g, dtype=torch.float64)
        s0 = torch.randn(3, 6, l_cache - 1, generator=g, dtype=torch.float64).to(dtype)
        ctx = [5] if prior else [0]
        outs = {}
        for impl in ConvImpl:
            m = _module(6, l_cache, bias, dtype, impl)
            outs[impl] = _run(m, [h], ctx, [1], s0.clone(), dtype)
        (y, s), (ry, rs) = outs[ConvImpl.VECTOR], outs[ConvImpl.RECURRENT]
        assert y.dtype == dtype
        assert_close(y, ry, ulps=REORDER_ULPS, what=f"y, n={n}")
        assert_close(s, rs, ulps=REORDER_ULPS, what=f"states, n={n}")
        if not prior:
            assert torch.all(s[1, :, :max(0, l_cache - 1 - n)] == 0), "zero-padded state"
        assert torch.equal(s[0], s0[0]) and torch.equal(s[2], s0[2]), "other slots untouched"


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_decode_and_prefill_mix_matches_per_token(dtype):
    """Five sequences in one batch: two prefill chunks (one fresh, one continuing), three decode
    rows in dirty slots; the fast path runs the three decodes in one step."""
    g = torch.Generator().manual_seed(7)
    lens, ctx, slots = [4, 1, 7, 1, 1], [0, 9, 3, 2, 0], [4, 0, 2, 5, 1]
    seqs = [torch.randn(n, 8, generator=g, dtype=torch.float64) for n in lens]
    s0 = torch.randn(6, 5, 3, generator=g, dtype=torch.float64).to(dtype)
    fast = _run(_module(5, 4, True, dtype, ConvImpl.VECTOR), seqs, ctx, slots, s0.clone(), dtype)
    ref = _run(_module(5, 4, True, dtype, ConvImpl.RECURRENT), seqs, ctx, slots, s0.clone(), dtype)
    assert_close(fast[0], ref[0], ulps=REORDER_ULPS, what="outputs")
    assert_close(fast[1], ref[1], ulps=REORDER_ULPS, what="states")
    assert torch.equal(fast[1][3], s0[3]), "slot 3 is nobody's"


def test_decode_rows_run_in_one_step(monkeypatch):
    m = _module(5, 3, False, torch.float32, ConvImpl.VECTOR)
    calls = []
    real = m._decode
    monkeypatch.setattr(m, "_decode", lambda bx, *a: calls.append(bx.shape[0]) or real(bx, *a))
    monkeypatch.setattr(m, "_prefill", None)                    # would raise if called
    monkeypatch.setattr(m, "_recurrent", None)
    seqs = [torch.randn(1, 8) for _ in range(4)]
    _run(m, seqs, [3, 1, 2, 5], [0, 1, 2, 3], torch.randn(4, 5, 2), torch.float32)
    assert calls == [4]


@pytest.fixture(scope="module")
def lfm2_dir(tmp_path_factory):
    return save(hf_model(hf_config("lfm2_l4")), tmp_path_factory.mktemp("lfm2") / "m")


def _load(d, dtype, impl):
    model = load_model(d, dtype=dtype)
    use_conv_impl(model, impl)
    return model


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [None, [6, 5], [1, 3, 7]])
def test_model_prefill_vector_equals_recurrent(lfm2_dir, chunks, dtype):
    prompt = PROMPT * 2
    chunks = chunks and [*chunks[:-1], len(prompt) - sum(chunks[:-1])]
    ref_logits, ref_states = prefill_states(_load(lfm2_dir, dtype, ConvImpl.RECURRENT), prompt,
                                            chunks=chunks)
    logits, states = prefill_states(_load(lfm2_dir, dtype, ConvImpl.VECTOR), prompt, chunks=chunks)
    assert_close(logits, ref_logits, ulps=REORDER_ULPS, what="logits")
    for layer, (conv, _) in ref_states.items():
        assert_close(states[layer][0], conv, ulps=REORDER_ULPS, what=f"layer {layer} conv")


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_mixed_batches_vector_equals_recurrent(lfm2_dir, dtype):
    """The Mamba2 schedule of test_ssd (prefill chunks mixed with batched decode steps, dirty
    slots) on an LFM2 model."""
    from test_ssd import SLOTS, _schedule
    ref, ref_caches = _schedule(_load(lfm2_dir, dtype, ConvImpl.RECURRENT), dtype)
    got, caches = _schedule(_load(lfm2_dir, dtype, ConvImpl.VECTOR), dtype)
    for k, (a, b) in enumerate(zip(got, ref)):
        assert_close(a, b, ulps=REORDER_ULPS, what=f"step {k} logits")
    for layer in ref_caches._conv:
        for slot in SLOTS:
            assert_close(caches.conv(layer)[slot], ref_caches.conv(layer)[slot],
                         ulps=REORDER_ULPS, what=f"layer {layer} slot {slot} conv")
