"""A prefill rank progresses its passive NIXL side fast right after a forward where its
readers' reads wait for that progress (over TCP: readers on other hosts, or UCX_TLS chosen by
hand), and slowly otherwise: same-host reads go through shared memory, and fast polling
there only takes the cores the reading ranks need."""
import time

import pytest
import torch

from pd_harness import PROMPTS, cache
from pdbridge.engine.pd_rank import HOT_WINDOW_S, POLL_HOT_S, POLL_INTERVAL_S, reads_need_progress
from pdbridge.model import default_model
from pdbridge.serve.prefill_node import PrefillNode

torch.set_num_threads(1)


def _intervals_around_a_prefill():
    """The poller's interval before a prefill, right after it, and after the window."""
    pre = PrefillNode(str(default_model.model_dir()), 1, cache("SD"), transport="nixl")
    try:
        rank = pre.engine.worker.pd
        cold = rank.poll_interval(time.monotonic() + 2 * HOT_WINDOW_S)
        before = time.monotonic()
        pre.prefill(PROMPTS[0])
        after = time.monotonic()
        return (cold, rank.poll_interval(after),
                rank.poll_interval(before + HOT_WINDOW_S + (after - before)))
    finally:
        pre.close()


def test_a_prefill_forward_opens_the_hot_window_where_reads_go_over_tcp(monkeypatch):
    monkeypatch.setenv("UCX_TLS", "tcp")
    assert POLL_HOT_S < POLL_INTERVAL_S
    assert _intervals_around_a_prefill() == (POLL_INTERVAL_S, POLL_HOT_S, POLL_INTERVAL_S)


def test_same_host_readers_leave_the_poller_slow(monkeypatch):
    monkeypatch.delenv("UCX_TLS", raising=False)
    assert _intervals_around_a_prefill() == (POLL_INTERVAL_S,) * 3


@pytest.mark.parametrize("host,env,need", [
    ("127.0.0.1", {}, False), ("127.3.2.1", {}, False), ("localhost", {}, False),
    ("::1", {}, False), ("[::1]", {}, False),
    ("10.0.0.1", {}, True), ("0.0.0.0", {}, True), ("::", {}, True), ("prefill-a", {}, True),
    ("127.0.0.1", {"UCX_TLS": "tcp"}, True), ("127.0.0.1", {"UCX_TLS": ""}, False),
])
def test_which_reads_need_the_prefill_side_to_progress(host, env, need):
    assert reads_need_progress(host, env) is need
