"""A prefill rank progresses its passive NIXL side fast right after a forward (its readers come
then: a read completes only at that side's next progress), and slowly when nothing is due."""
import time

import torch

from pd_harness import PROMPTS, cache
from pdbridge.engine.pd_rank import HOT_WINDOW_S, POLL_HOT_S, POLL_INTERVAL_S
from pdbridge.model import default_model
from pdbridge.serve.prefill_node import PrefillNode

torch.set_num_threads(1)


def test_a_prefill_forward_opens_the_hot_window():
    pre = PrefillNode(str(default_model.model_dir()), 1, cache("SD"), transport="nixl")
    try:
        rank = pre.engine.worker.pd
        assert rank.poll_interval(time.monotonic() + 2 * HOT_WINDOW_S) == POLL_INTERVAL_S
        before = time.monotonic()
        pre.prefill(PROMPTS[0])
        after = time.monotonic()
        assert POLL_HOT_S < POLL_INTERVAL_S
        assert rank.poll_interval(after) == POLL_HOT_S          # the readers come now
        assert rank.poll_interval(before + HOT_WINDOW_S + (after - before)) == POLL_INTERVAL_S
    finally:
        pre.close()
