"""TP worker processes: failures end in a clear EngineError, never a hang."""
import pytest
import torch

from pdbridge.engine.llm_engine import Engine, EngineError
from pdbridge.engine.messages import Describe
from pdbridge.engine.request import SamplingParams
from pdbridge.spec import CacheConfig

from bounded import run_bounded
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


def test_start_up_is_not_bounded_by_the_collective_timeout():
    """Spawning a rank (importing torch) and loading its shard (here 2 s) take longer than the
    collectives' 1 s timeout: start-up has its own bound (start_timeout_s), so a healthy
    start does not fail (it did on a loaded CI machine)."""
    from fake_model import SLOW_LOAD_S, load_fake_slow
    with Engine(None, 2, CFG, loader=load_fake_slow, timeout_s=1.0) as e:
        assert e.start_timeout_s > SLOW_LOAD_S
        assert len(e.generate([[1, 2, 3]], GREEDY)[0].token_ids) == 2


def test_a_rank_that_never_joins_is_reported_after_start_timeout_s(monkeypatch):
    """A worker stopped as soon as it is spawned never meets rank 0: the rendezvous gives up
    after start_timeout_s, naming it, and the stopped process is ended (no leftover)."""
    import os
    import signal
    import multiprocessing.context as mpc
    from fake_model import load_fake
    started = []
    spawn = mpc.ForkServerProcess.start

    def start_stopped(self):
        spawn(self)
        os.kill(self.pid, signal.SIGSTOP)
        started.append(self)
    monkeypatch.setattr(mpc.ForkServerProcess, "start", start_stopped)
    with pytest.raises(EngineError, match="start_timeout_s"):
        run_bounded(lambda: Engine(None, 2, CFG, loader=load_fake, timeout_s=0.2,
                                   start_timeout_s=1.0))
    assert started and all(p.exitcode is not None for p in started)


def test_stopped_worker_gives_an_error_and_close_still_ends_it():
    """A SIGSTOPped rank answers no collective: the engine's next call fails with an explicit
    error once its deadline passes (instead of waiting forever), and close() ends the
    stopped process too (SIGKILL acts on a stopped process, SIGTERM would not)."""
    import os
    import signal
    from fake_model import load_fake
    e = Engine(None, 2, CFG, loader=load_fake, timeout_s=2.0)
    procs = list(e._procs)
    try:
        assert len(e.generate([[1, 2, 3]], GREEDY)[0].token_ids) == 2
        os.kill(procs[0].pid, signal.SIGSTOP)
        with pytest.raises(EngineError, match="collective failed|did not join"):
            run_bounded(lambda: e.generate([[4, 5]], GREEDY))
        with pytest.raises(EngineError, match="failed earlier"):
            e.generate([[4, 5]], GREEDY)                 # no call meets out-of-step ranks
    finally:
        run_bounded(e.close)
    assert all(p.exitcode is not None for p in procs)


ORPHAN_SCRIPT = """
import sys, time
sys.path[:0] = {paths!r}
from fake_model import load_fake
from pdbridge.engine.llm_engine import Engine
from pdbridge.spec import CacheConfig

if __name__ == "__main__":
    e = Engine(None, 2, CacheConfig(num_blocks=8, block_tokens=4), loader=load_fake)
    print(e._procs[0].pid, flush=True)
    time.sleep(600)
"""


def test_ranks_end_when_the_engine_process_is_killed_hard(tmp_path):
    """SIGKILL gives the engine's process no chance to send Shutdown: its rank, forked by the
    fork server (so not its child), notices through a pidfd and exits, and so does the fork
    server. Nothing is left behind."""
    import os
    import pathlib
    import signal
    import subprocess
    import sys
    import time
    from test_interrupt import _alive, _descendants
    here = str(pathlib.Path(__file__).resolve().parent)
    script = tmp_path / "engine.py"
    script.write_text(ORPHAN_SCRIPT.format(paths=[here, str(pathlib.Path(here).parent)]))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    procs: set[int] = set()
    try:
        worker = int(run_bounded(p.stdout.readline))
        procs = _descendants(p.pid)
        assert worker in procs and len(procs) >= 2      # the fork server and the rank
        assert all(map(_alive, procs))
        p.kill()
        p.wait(30)
        bound = time.monotonic() + 30
        while any(map(_alive, procs)) and time.monotonic() < bound:
            time.sleep(0.05)
        assert not [q for q in procs if _alive(q)], "processes outlived the engine's process"
    finally:
        if p.poll() is None:
            p.kill()
        for q in filter(_alive, procs):     # re-parented by then: not p's descendants
            os.kill(q, signal.SIGKILL)


def test_the_fork_server_preloads_modules_that_exist():
    """A preload module that fails to import is skipped silently by multiprocessing (every
    rank would import torch again): the names must import."""
    import importlib
    import multiprocessing.forkserver as forkserver
    from pdbridge.engine.llm_engine import rank_process_context
    rank_process_context()
    names = forkserver._forkserver._preload_modules
    assert names == ["pdbridge.engine.rank_preload"]
    for name in names:
        importlib.import_module(name)


def test_a_rank_watches_the_engine_process_not_its_parent():
    """The watch a rank starts (`worker._watch_parent`) follows the engine's pid, which is not
    its parent under the fork server: alive while that process lives (checked 1.5 s in, past
    a 1 s poll), exit code 3 once it is gone."""
    import subprocess
    import sys
    engine = subprocess.Popen(["sleep", "600"])
    rank = subprocess.Popen([sys.executable, "-c",
                             "import sys, time\n"
                             "from pdbridge.engine.worker import _watch_parent\n"
                             f"_watch_parent({engine.pid})\n"
                             "print('watching', flush=True)\n"
                             "time.sleep(600)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert run_bounded(rank.stdout.readline) == "watching\n"
        with pytest.raises(subprocess.TimeoutExpired):
            rank.wait(1.5)
        engine.kill()
        engine.wait()
        assert rank.wait(30) == 3
    finally:
        for p in (engine, rank):
            if p.poll() is None:
                p.kill()


@pytest.mark.parametrize("threads", [2, 1])
def test_every_rank_computes_with_worker_threads(threads):
    """Rank 0 (this process) uses worker_threads like ranks 1..t-1: left to torch it took one
    thread per CPU it may use, and a prefill server's rank 0 then competed with every other
    process of the deployment for all of them."""
    try:
        with Engine(None, 2, CFG, loader=load_fake_fragile, dtype="crash",
                    worker_threads=threads) as e:
            assert [(i.rank, i.torch_threads) for i in e.call(Describe())] == \
                [(0, threads), (1, threads)]
    finally:
        torch.set_num_threads(1)
