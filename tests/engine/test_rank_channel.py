"""The rank channel: the decode node's requests reach each rank's handler and every reply
comes back to the request that asked; a late reply is never taken for a later request's; a
silent rank is missing from the answer; a dead rank (check_alive) ends the wait at once."""
import os
import socket
import threading
import time

import pytest

from pdbridge.engine.pd_calls import ChooseStrategy, PullResult, StrategyChoice
from pdbridge.engine.rank_channel import (RankChannel, RankChannelServer, endpoint_path,
                                         private_dir_ok, send_frame)
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
    assert not any(os.path.exists(endpoint_path(r.server.endpoint)) for r in ranks)


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


def test_a_closed_rank_is_missing_at_once():
    """A rank whose end closed answers nothing: the wait does not sit out its timeout, and
    check_alive is asked (a dead process raises there)."""
    ranks = [_Rank(0), _Rank(1)]
    channel = RankChannel([r.server.endpoint for r in ranks])
    asked = []
    try:
        ranks[1].server.close()
        t0 = time.monotonic()
        got = channel.call_all(_choose(), StrategyChoice, 30.0, lambda: asked.append(1))
        assert set(got) == {0} and asked
        assert time.monotonic() - t0 < 10.0         # not the 30 s timeout
        assert set(channel.call_all(_choose(), StrategyChoice, 5.0)) == {0}
    finally:
        channel.close()
        ranks[0].server.close()


def test_a_frame_that_is_no_request_leaves_the_server_serving():
    rank = _Rank(0)
    channel = RankChannel([rank.server.endpoint])
    intruder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        intruder.connect(endpoint_path(rank.server.endpoint))
        send_frame(intruder, 1, b"not msgpack of a request")
        intruder.sendall(b"\xff" * 16)       # a header claiming an absurd length
        got = channel.call_all(_choose(Strategy.STAGING), StrategyChoice, 5.0)
        assert got[0].strategy is Strategy.STAGING and len(rank.seen) == 1
    finally:
        intruder.close()
        channel.close()
        rank.server.close()


def test_after_reply_runs_once_per_reply_and_cannot_stop_the_server():
    """A decode rank's ReadDones go out in after_reply, once its reply is on the wire."""
    calls = []

    def after():
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("the first one fails")

    server = RankChannelServer("test-after", lambda req: StrategyChoice(0, req.strategy),
                               after_reply=after)
    channel = RankChannel([server.endpoint])
    try:
        for s in (Strategy.DIRECT, Strategy.STAGING):
            got = channel.call_all(_choose(s), StrategyChoice, 5.0)
            assert got[0].strategy is s
        deadline = time.monotonic() + 5.0
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) == 2
    finally:
        channel.close()
        server.close()


def test_a_local_rank_0_is_called_on_the_callers_thread_with_a_decoded_copy():
    """Rank 0 in the node's process (LocalRank): called directly, after the remote ranks'
    requests went out, with what a socket would have delivered (a decoded copy); its socket
    gets nothing; its after_reply runs once per call, on the same thread."""
    from pdbridge.engine.rank_channel import LocalRank
    remote, seen, after = _Rank(1, delay_s=0.05), [], []

    def handle(req):
        seen.append((req, threading.get_ident(), len(remote.seen)))
        return StrategyChoice(0, req.strategy)
    unused = _Rank(0)                   # rank 0's server: not connected, never asked
    channel = RankChannel([unused.server.endpoint, remote.server.endpoint],
                          LocalRank(handle, lambda: after.append(threading.get_ident())))
    try:
        for s in (Strategy.DIRECT, Strategy.STAGING):
            asked = _choose(s)
            got = channel.call_all(asked, StrategyChoice, 5.0)
            assert {j: (c.rank, c.strategy) for j, c in got.items()} == {0: (0, s), 1: (1, s)}
            req, thread, _ = seen[-1]
            assert req == asked and req is not asked and thread == threading.get_ident()
        assert channel.call_all(_choose(), StrategyChoice, 5.0, ranks=[1]).keys() == {1}
        assert len(seen) == 2 and after == [threading.get_ident()] * 2 and not unused.seen
    finally:
        channel.close()
        remote.server.close()
        unused.server.close()


def test_a_failing_local_rank_is_missing_at_once_and_the_others_still_answer():
    """rank 0's handler raising, or answering the wrong type: it is missing from the answer
    right away (no wait for the timeout) and its after_reply does not run."""
    from pdbridge.engine.rank_channel import LocalRank
    remote, after = _Rank(1), []

    def boom(req):
        raise RuntimeError("a bug in rank 0's handler")
    for handle in (boom, lambda req: PullResult(0, True)):
        channel = RankChannel(["unix:///nonexistent", remote.server.endpoint],
                              LocalRank(handle, lambda: after.append(1)))
        try:
            t0 = time.monotonic()
            got = channel.call_all(_choose(), StrategyChoice, 30.0)
            assert got.keys() == {1} and time.monotonic() - t0 < 10.0
        finally:
            channel.close()
    remote.server.close()
    assert after == []


@pytest.mark.parametrize("delay_s", [0.0, 0.0004, 0.02])
def test_remote_replies_are_taken_while_the_node_polls_and_after(delay_s):
    """After rank 0's part the node polls for the other ranks' replies for SPIN_S, then
    sleeps in select: a reply in either phase (here: at once, inside SPIN_S, well after it)
    is taken, and the next call's replies are its own."""
    from pdbridge.engine.rank_channel import SPIN_S, LocalRank
    assert delay_s < SPIN_S or delay_s > 10 * SPIN_S or delay_s == 0.0
    remote = _Rank(1, delay_s=delay_s)
    channel = RankChannel(["unix:///nonexistent", remote.server.endpoint],
                          LocalRank(lambda req: StrategyChoice(0, req.strategy)))
    try:
        for s in (Strategy.DIRECT, Strategy.STAGING, Strategy.PERMUTE):
            got = channel.call_all(_choose(s), StrategyChoice, 10.0)
            assert {j: (c.rank, c.strategy) for j, c in got.items()} == {0: (0, s), 1: (1, s)}
    finally:
        channel.close()
        remote.server.close()


def test_an_expect_is_answered_by_nothing_and_the_next_request_as_ever():
    """Expect (a request follows): the rank's handler never sees it and nothing comes back
    on the connection; the request after it, and any later one, is answered as usual,
    within or after the rank's polling window."""
    from pdbridge.engine.rank_channel import EXPECT_S
    rank = _Rank(0)
    channel = RankChannel([rank.server.endpoint])
    try:
        channel.expect()
        sock = channel._socks[0]
        sock.settimeout(0.2)
        with pytest.raises(socket.timeout):
            sock.recv(1)                                # no reply to an Expect
        sock.settimeout(None)
        assert rank.seen == []
        channel.expect()
        got = channel.call_all(_choose(Strategy.STAGING), StrategyChoice, 5.0)
        assert got[0].strategy is Strategy.STAGING
        channel.expect()
        time.sleep(2 * EXPECT_S)                        # the window passed: it sleeps again
        got = channel.call_all(_choose(Strategy.DIRECT), StrategyChoice, 5.0)
        assert got[0].strategy is Strategy.DIRECT and len(rank.seen) == 2
    finally:
        channel.close()
        rank.server.close()


def test_rank_0s_after_work_waits_for_the_caller_when_every_reply_is_in_first():
    """collect: when the remote replies are in by the time rank 0's part ends, rank 0's
    after-work (a decode rank's ReadDone) is left for the caller, which reads its clocks
    first (run_after_work); the next send runs it if the caller did not; it runs once."""
    from pdbridge.engine.rank_channel import LocalRank
    remote, after = _Rank(1), []

    def handle(req):
        time.sleep(0.2)                 # the remote reply is in long before this returns
        return StrategyChoice(0, req.strategy)
    unused = _Rank(0)
    channel = RankChannel([unused.server.endpoint, remote.server.endpoint],
                          LocalRank(handle, lambda: after.append(1)))
    try:
        got = channel.collect(channel.send(_choose()), StrategyChoice, 5.0)
        assert got.keys() == {0, 1} and after == []
        channel.run_after_work()
        channel.run_after_work()
        assert after == [1]
        channel.collect(channel.send(_choose()), StrategyChoice, 5.0)
        assert after == [1]
        channel.send(_choose(), ranks=[1])          # the next send runs what was left
        assert after == [1, 1]
    finally:
        channel.close()
        remote.server.close()
        unused.server.close()
