"""The transfer floor measured in place (`serve --floor-probe`, issue 10): every k-th pull's
decode ranks first time one bare read of the last pull's bytes and its notification, on their
own agents, where the pull starts. The probe reads the prefill rank's bytes into the rank's
scratch, never touches a cache, never fails a pull, and frees nothing on the prefill side."""
from __future__ import annotations

import numpy as np
import pytest

from pd_harness import PROMPTS, cache, monolithic
from pdbridge.engine.request import SamplingParams
from pdbridge.model import default_model
from pdbridge.serve import wire
from pdbridge.serve.decode_node import DecodeNode
from pdbridge.serve.metrics import ServeMetrics
from pdbridge.serve.prefill_node import PrefillNode
from pdbridge.serve.router import PDRouter


def _run(decode: DecodeNode, prefill: PrefillNode, prompts, max_tokens: int):
    """The P/D run's token ids per prompt, and each request's PullOutcome in order."""
    outcomes, finish = [], decode.finish_pull

    def spy(handle, results):
        outcomes.append(finish(handle, results))
        return outcomes[-1]
    decode.finish_pull = spy
    records = PDRouter(prefill, [decode]).run(prompts, SamplingParams(max_tokens=max_tokens))
    assert not any(r.recomputed for r in records), [r.errors for r in records]
    return [r.token_ids for r in records], outcomes


def _numpy(buf) -> np.ndarray:
    return buf.numpy() if hasattr(buf, "numpy") else np.asarray(buf)


def test_every_kth_pull_reads_the_last_pulls_bytes_and_decodes_the_same():
    model_dir = str(default_model.model_dir())
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(5)]
    want = monolithic(model_dir, prompts, 4)
    pre = PrefillNode(model_dir, 1, cache())
    dec = DecodeNode(model_dir, 2, cache(), strategy="direct", probe_every=2)
    try:
        tokens, outcomes = _run(dec, pre, prompts, 4)
        assert tokens == want
        # No bytes are known before the first pull; then every 2nd pull is probed.
        assert [o.probe[0] > 0 for o in outcomes] == [False, False, True, False, True]
        for before, o in zip(outcomes, outcomes[1:]):
            if o.probe[0] > 0:
                assert o.probe[1] == max(r.nbytes for r in before.results)
                assert all(r.phases.probe_s > 0 for r in o.results)
        # The last probe's bytes landed in rank 0's scratch (direct reads use none), from
        # prefill rank 0's first region.
        n = outcomes[-1].probe[1]
        src = _numpy(pre.engine.worker.pd.caches.region_buffers[0])[:n]
        dst = dec.engine.worker.pd.scratch[:n]
        assert src.any() and np.array_equal(src, dst)
        pre.poll()
        assert pre.num_held == 0        # the FloorProbe notifications freed nothing early
    finally:
        dec.close()
        pre.close()


def test_a_probe_that_cannot_run_leaves_the_pull_alone():
    model_dir = str(default_model.model_dir())
    pre = PrefillNode(model_dir, 1, cache(), transport="local")
    dec = DecodeNode(model_dir, 1, cache(), transport="local", strategy="direct",
                     probe_every=1, staging_nbytes=0)      # no scratch to read into
    try:
        tokens, outcomes = _run(dec, pre, PROMPTS[:3], 3)
        assert tokens == monolithic(model_dir, PROMPTS[:3], 3)
        assert [o.probe for o in outcomes] == [(0.0, 0)] * 3
        assert all(r.ok for o in outcomes for r in o.results)
    finally:
        dec.close()
        pre.close()


def test_probe_every_is_refused_below_zero():
    with pytest.raises(ValueError, match="probe_every"):
        DecodeNode(None, 1, cache(), transport="local", probe_every=-1)


def _stats(seconds: float, probe: wire.Probe | None = None) -> wire.TransferStats:
    return wire.TransferStats(100, 2, seconds, False, pull_s=seconds / 2,
                              pull_parts=wire.PullParts(read_s=seconds / 2), probe=probe)


def test_probed_stages_are_kept_apart_from_plain_ones():
    m = ServeMetrics()
    m.observe_transfer(_stats(0.002))
    m.observe_transfer(_stats(0.003, wire.Probe(0.0004, 4096)))
    text = m.render().decode()

    def value(name: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith(name + " "))
        return float(line.split()[1])
    assert value("pdbridge_transfer_seconds_count") == 1
    assert value("pdbridge_transfer_seconds_sum") == pytest.approx(0.002)
    assert value("pdbridge_pull_seconds_sum") == pytest.approx(0.001)
    assert value("pdbridge_probed_transfer_seconds_sum") == pytest.approx(0.003)
    assert value("pdbridge_probed_pull_seconds_sum") == pytest.approx(0.0015)
    assert value("pdbridge_probe_seconds_sum") == pytest.approx(0.0004)
    assert value("pdbridge_probe_bytes_total") == 4096
    assert value("pdbridge_transfer_bytes_total") == 200     # bytes moved: both requests
