"""CPU affinity of an engine's TP ranks (`pdbridge serve --cpu-affinity`): how the CPUs are
split, the flag's refusals, and each worker process pinned to its part (and not without)."""
import os

import pytest
import torch

from pdbridge.engine.cpu_affinity import (available_cpus, check_cpus, format_cpu_list,
                                          parse_cpu_list, rank_cpus, server_cpus)
from pdbridge.engine.llm_engine import Engine
from pdbridge.engine.request import SamplingParams
from pdbridge.spec import CacheConfig

from fake_model import load_fake

torch.set_num_threads(1)


@pytest.mark.parametrize("text,cpus", [("0", (0,)), ("0-3,8", (0, 1, 2, 3, 8)),
                                       ("3,1,1", (1, 3)), (" 2-4 , 0", (0, 2, 3, 4))])
def test_cpu_lists_parse_and_print_back(text, cpus):
    assert parse_cpu_list(text) == cpus
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus


@pytest.mark.parametrize("text", ["", "a", "3-1", "-1", "1-", "1,,2", "0x1"])
def test_bad_cpu_lists_are_refused(text):
    with pytest.raises(ValueError, match="CPU number or range"):
        parse_cpu_list(text)


def test_format_joins_runs():
    assert format_cpu_list([8, 0, 1, 2, 3, 5]) == "0-3,5,8"


def test_ranks_get_contiguous_disjoint_parts_covering_every_cpu():
    assert [rank_cpus(range(8), 2, r) for r in range(2)] == [{0, 1, 2, 3}, {4, 5, 6, 7}]
    assert [rank_cpus((4, 5, 6), 2, r) for r in range(2)] == [{4}, {5, 6}]
    assert [rank_cpus((0, 1), 3, r) for r in range(3)] == [{0}, {1}, {0}]   # fewer CPUs
    for n in range(1, 10):
        for tp in range(1, 10):
            parts = [rank_cpus(range(n), tp, r) for r in range(tp)]
            assert all(len(p) >= 1 for p in parts)
            if n >= tp:
                assert sorted(c for p in parts for c in p) == list(range(n))
                assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        rank_cpus(range(4), 2, 2)


def test_servers_get_parts_in_proportion_to_their_ranks_when_there_are_enough():
    assert server_cpus(range(2), [1, 2]) is None            # 3 ranks, 2 CPUs: each splits all
    assert server_cpus(range(3), [1, 2]) == [(0,), (1, 2)]
    assert server_cpus(range(16), [1, 2]) == [tuple(range(5)), tuple(range(5, 16))]
    for n in range(1, 20):
        for tps in ([1, 2], [2, 1, 4], [1], [3, 3]):
            split = server_cpus(range(n), tps)
            if n < sum(tps):
                assert split is None
                continue
            assert all(len(part) >= tp for part, tp in zip(split, tps))
            assert [c for part in split for c in part] == list(range(n))


def test_the_flag_refuses_naming_itself_and_the_allowed_values():
    allowed = available_cpus()
    assert check_cpus("off", "--cpu-affinity") == ("", None)
    assert check_cpus("auto", "--cpu-affinity") == ("", allowed)
    assert check_cpus(str(allowed[0]), "--cpu-affinity") == ("", (allowed[0],))
    error, cpus = check_cpus("99999", "--cpu-affinity")
    assert cpus is None and error.startswith("--cpu-affinity '99999': CPU 99999 is not "
                                             "available") and "auto, off" in error
    error, _ = check_cpus("two", "--cpu-affinity")
    assert error.startswith("--cpu-affinity 'two': 'two' is not a CPU number"), error


def _threads_affinity(pid: int) -> set[frozenset[int]]:
    """The distinct CPU sets of the process's threads."""
    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.parametrize("pinned", [True, False])
def test_each_worker_process_runs_on_its_part(pinned):
    cpus = available_cpus()
    cfg = CacheConfig(num_blocks=8, block_tokens=4)
    with Engine(None, 3, cfg, loader=load_fake, cpus=cpus if pinned else None) as e:
        # every thread of rank r's process (torch's, the parent watch, ...) on its part
        got = [_threads_affinity(p.pid) for p in e._procs]
        assert len(e.generate([[1, 2, 3]], SamplingParams(max_tokens=2, ignore_eos=True))[0]
                   .token_ids) == 2
    want = [{rank_cpus(cpus, 3, r)} if pinned else {frozenset(cpus)} for r in (1, 2)]
    assert got == want


def test_a_pin_that_fails_is_reported_not_raised(monkeypatch):
    """Pinning is a speed-up: where the OS refuses it the caller is told why and goes on."""
    def refuse(tid, cpus):
        raise OSError(22, "Invalid argument")
    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    from pdbridge.engine.cpu_affinity import pin_process
    assert pin_process([0, 1]) == "could not pin to CPUs 0-1: [Errno 22] Invalid argument"
