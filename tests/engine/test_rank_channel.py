"""The rank channel: the decode node's requests reach each rank's handler and every reply
comes back to the request that asked; a late reply is never taken for a later request's; a
silent rank is missing from the answer; a dead rank (check_alive) ends the wait at once."""
import os
import threading
import time

import pytest

from pdbridge.engine.pd_calls import ChooseStrategy, PullResult, StrategyChoice
from pdbridge.engine.rank_channel import RankChannel, RankChannelServer, private_dir_ok
from pdbridge.plan import Strategy


def _choose(strategy=Strategy.DIRECT) -> ChooseStrategy:
    return ChooseStrategy({}, (1, (0,), 0), (1, (0,), 0), strategy)


class _Rank:
    def __init__(self, rank: int, delay_s: float = 0.0):
        self.rank, self.delay_s, self.seen = rank, delay_s, []
        self.server = RankChannelServer(f"test-{rank}", self.handle)

    def handle(self, req):
        self.seen.append(req)
        time.sleep(self.delay_s)
        return StrategyChoice(self.rank, req.strategy)


def test_each_rank_answers_its_own_request():
    ranks = [_Rank(0), _Rank(1)]
    channel = RankChannel([r.server.endpoint for r in ranks])
    try:
        for s in (Strategy.DIRECT, Strategy.STAGING):
            got = channel.call_all(_choose(s), StrategyChoice, 5.0)
            assert {j: (c.rank, c.strategy) for j, c in got.items()} == {0: (0, s), 1: (1, s)}
        assert [len(r.seen) for r in ranks] == [2, 2]
        assert all(private_dir_ok(r.server.endpoint) for r in ranks)
    finally:
        channel.close()
        for r in ranks:
            r.server.close()
    assert not any(os.path.exists(r.server.endpoint[len("ipc://"):]) for r in ranks)


def test_a_late_reply_is_not_taken_for_the_next_request():
    slow = _Rank(0, delay_s=0.5)
    channel = RankChannel([slow.server.endpoint])
    try:
        assert channel.call_all(_choose(Strategy.DIRECT), StrategyChoice, 0.1) == {}
        slow.delay_s = 0.0
        got = channel.call_all(_choose(Strategy.STAGING), StrategyChoice, 5.0)
        assert got[0].strategy is Strategy.STAGING      # not the late DIRECT reply
    finally:
        channel.close()
        slow.server.close()


def test_a_dead_rank_ends_the_wait():
    silent = _Rank(0, delay_s=3.0)
    channel = RankChannel([silent.server.endpoint])
    dead = threading.Event()

    def check_alive():
        if dead.is_set():
            raise RuntimeError("rank 0 exited")
    try:
        threading.Timer(0.2, dead.set).start()
        # A wait that reached its deadline would return {} instead of raising.
        with pytest.raises(RuntimeError, match="rank 0 exited"):
            channel.call_all(_choose(), PullResult, 30.0, check_alive)
    finally:
        channel.close()
        silent.server.close()
