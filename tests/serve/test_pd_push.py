"""Push mode's lifecycle: writes go out layer by layer during the prefill forward, a missing
layer is caught (or, if a writer lied, changes the tokens: the fidelity check has teeth),
silence times out into the failure policy, and blocks on both sides are freed exactly once.

Prefill and decode at TP=1 over LocalTransport: every rank lives in this process, so a test
can wrap the prefill rank's PushSender."""
import pytest
import torch

from pd_harness import PROMPTS, cache, monolithic
from pdbridge.engine import pd_push
from pdbridge.engine.request import SamplingParams
from pdbridge.model import default_model
from pdbridge.serve.decode_node import DecodeNode, PullFailed
from pdbridge.serve.prefill_node import PrefillNode
from pdbridge.serve.router import PDRouter

torch.set_num_threads(1)
MAX_TOKENS = 8
DROPPED_LAYER = 2           # a Mamba2 layer of the embedded model ("M*M-M*")


@pytest.fixture(scope="module")
def model_dir():
    return str(default_model.model_dir())


@pytest.fixture(scope="module")
def want(model_dir):
    return monolithic(model_dir, PROMPTS, MAX_TOKENS)


def _nodes(model_dir, interleave=False, **decode_kw):
    pre = PrefillNode(model_dir, 1, cache(layer_interleave=interleave), transport="local")
    dec = DecodeNode(model_dir, 1, cache(), transport="local", transfer_mode="push", **decode_kw)
    return pre, dec


def _run(pre, dec):
    return PDRouter(pre, [dec]).run(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS))


def _all_free(*nodes):
    for n in nodes:
        pool = n.engine.scheduler.pool
        assert pool.num_free == pool.num_blocks, f"{n.engine_id} leaked blocks"


@pytest.mark.parametrize("interleave", [False, True])
def test_writes_go_out_while_the_forward_runs(model_dir, want, monkeypatch, interleave):
    """Per-layer regions: each layer's writes are posted from its own layer callback, before
    the next layer runs. Interleaved regions: only after each stack's last layer."""
    seen = []           # (layer, writes posted so far) at every layer callback
    real = pd_push.PushSender.after_layer

    def spy(self, layer):
        real(self, layer)
        if layer < 1 << 30:
            seen.append((layer, sum(len(j.handles) for j in self.jobs)))
    monkeypatch.setattr(pd_push.PushSender, "after_layer", spy)
    pre, dec = _nodes(model_dir, interleave)
    try:
        records = _run(pre, dec)
        final = pre.layout.rank(0).region_final_layer
    finally:
        pre.close()
        dec.close()
    assert [r.token_ids for r in records] == want and not any(r.recomputed for r in records)
    last = max(final)
    per_request = [seen[i:i + last + 1] for i in range(0, len(seen), last + 1)]
    assert len(per_request) == len(PROMPTS)
    for calls in per_request:
        # TP 1 -> 1 reads every region: one write per distinct final layer, each posted from
        # the callback of that layer, never later.
        assert calls == [(layer, len({f for f in final if f <= layer})) for layer in range(last + 1)]
    # Stacks wait for their last layer (here Mamba 0, 2, 4 -> 4; attention 1, 5 -> 5).
    assert (min(final) > 0) if interleave else (sorted(final) == list(range(last + 1)) or
                                                len(set(final)) == len(final))


def _drop_layer(monkeypatch, count_bytes: bool):
    """The prefill rank never writes DROPPED_LAYER's runs; with count_bytes it still reports
    them as written (a writer that lies)."""
    real = pd_push.PushSender.after_layer

    def after_layer(self, layer):
        for job in self.jobs:
            if layer >= DROPPED_LAYER and job.batches and job.batches[0][0] == DROPPED_LAYER:
                runs = job.batches.pop(0)[1]
                if count_bytes:
                    job.nbytes += runs.total_nbytes
        real(self, layer)
    monkeypatch.setattr(pd_push.PushSender, "after_layer", after_layer)


def test_missing_layer_would_change_the_tokens(model_dir, want, monkeypatch):
    """The fidelity tests can fail: one layer's bytes missing and nothing noticing gives
    different tokens."""
    _drop_layer(monkeypatch, count_bytes=True)
    pre, dec = _nodes(model_dir)
    try:
        records = _run(pre, dec)
    finally:
        pre.close()
        dec.close()
    assert not any(r.recomputed for r in records)
    assert [r.token_ids for r in records] != want


def test_missing_layer_is_caught_and_recomputed(model_dir, want, monkeypatch):
    _drop_layer(monkeypatch, count_bytes=False)
    pre, dec = _nodes(model_dir)
    try:
        records = _run(pre, dec)
        assert all(r.recomputed for r in records)
        assert all("other byte counts than planned" in " ".join(r.errors) for r in records)
        assert [r.token_ids for r in records] == want
        assert pre.num_held == 0
        _all_free(pre, dec)
    finally:
        pre.close()
        dec.close()


def test_silent_prefill_times_out_into_the_failure_policy(model_dir, want):
    """No PushDone ever arrives: recompute (the default) or fail loudly, never decode."""
    for on_failure in ("recompute", "fail"):
        pre, dec = _nodes(model_dir, on_failure=on_failure, pull_timeout_s=0.3)
        try:
            pre.engine.worker.pd.push.transport.notify = lambda peer, msg: None
            if on_failure == "fail":
                with pytest.raises(PullFailed, match=r"no PushDone from prefill ranks \[0\]"):
                    _run(pre, dec)
            else:
                records = _run(pre, dec)
                assert all(r.recomputed for r in records)
                assert [r.token_ids for r in records] == want
                _all_free(pre, dec)
            assert pre.num_held == 0
        finally:
            pre.close()
            dec.close()


def test_push_refuses_staging_in_one_line(model_dir):
    with pytest.raises(ValueError, match=r"^strategy='staging' with transfer_mode='push'; "
                                         r"allowed: direct, auto$"):
        DecodeNode(model_dir, 1, cache(), transport="local", transfer_mode="push",
                   strategy="staging")
    with pytest.raises(ValueError, match=r"^transfer_mode='sideways'; allowed: pull, push$"):
        DecodeNode(model_dir, 1, cache(), transport="local", transfer_mode="sideways")
