"""TP worker processes: failures end in a clear EngineError, never a hang."""
import pytest
import torch

from pdbridge.engine.llm_engine import Engine, EngineError
from pdbridge.engine.messages import Describe
from pdbridge.engine.request import SamplingParams
from pdbridge.spec import CacheConfig

from fake_model import CRASH_TOKEN, load_fake_fragile

torch.set_num_threads(1)
CFG = CacheConfig(num_blocks=8, block_tokens=4)
GREEDY = SamplingParams(max_tokens=2, ignore_eos=True)


def test_worker_failing_at_start_is_reported():
    with pytest.raises(EngineError, match="rank 1 .* exited with code 1"):
        Engine(None, 2, CFG, loader=load_fake_fragile, timeout_s=60)


def test_dead_worker_gives_an_error_not_a_hang():
    e = Engine(None, 2, CFG, loader=load_fake_fragile, dtype="crash", timeout_s=60)
    try:
        assert [i.rank for i in e.call(Describe())] == [0, 1]
        assert len(e.generate([[1, 2, 3]], GREEDY)[0].token_ids) == 2
        with pytest.raises(EngineError, match="rank 1 .* exited with code 7"):
            e.generate([[1, CRASH_TOKEN]], GREEDY)           # dies inside the all-reduce
        with pytest.raises(EngineError, match="rank 1"):
            e.generate([[1, 2]], GREEDY)                     # and stays dead
    finally:
        e.close()


def test_close_stops_workers():
    e = Engine(None, 2, CFG, loader=load_fake_fragile, dtype="crash")
    procs = list(e._procs)
    e.close()
    assert all(p.exitcode == 0 for p in procs)
    with pytest.raises(EngineError, match="closed"):
        e.generate([[1]], GREEDY)
