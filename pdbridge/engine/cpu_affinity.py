"""Which CPUs each TP rank of an engine runs on (`pdbridge serve --cpu-affinity`).

An engine's ranks split the CPUs they are given into contiguous parts, one per rank
(`rank_cpus`); each rank's process pins all its threads to its part at start-up, so the
threads it starts later (its engine loop, transfer thread, rank channel, torch's pool) stay
there too (`pin_process`). Rank 0 lives in the server's process, which `pdbridge serve` pins
before it builds the engine; ranks 1..t-1 pin themselves in `worker_main`.

Why (issue 10, measured on a 2-CPU VM): a thread woken by another was put on the waker's CPU
almost every time, and it preempted the waker (a probe: one process wakes another that
sleeps in select, then keeps its own CPU busy for 2 ms; the wakee ran on the waker's CPU in 195
of 200 wakeups over a Unix socket and 192 of 200 over an eventfd, the other CPU idle). So a decode
rank woken by the node's pull request ran on the node's CPU, and rank 0's pull waited for it
on the run queue (1.6-1.9 ms in stamped runs) while the other CPU idled: the two pulls ran one
after the other. With each rank on its own CPU they run side by side; paired runs of
`pdbridge up`, transfer stage 1.93 -> 1.53 ms.

Pure apart from `available_cpus` and `pin_process`.
"""
from __future__ import annotations

import os
from typing import Sequence


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """"0-3,8" -> (0, 1, 2, 3, 8): sorted, no repeats. ValueError (its message names what is
    wrong) for anything else."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ValueError(f"{part!r} is not a CPU number or range like 0-3") from None
        if first < 0 or last < first:
            raise ValueError(f"{part!r} is not a CPU number or range like 0-3")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def format_cpu_list(cpus: Sequence[int]) -> str:
    """(0, 1, 2, 3, 8) -> "0-3,8" (what parse_cpu_list reads back)."""
    runs: list[list[int]] = []
    for c in sorted(set(cpus)):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def rank_cpus(cpus: Sequence[int], tp_size: int, rank: int) -> frozenset[int]:
    """Rank `rank`'s part of `cpus`: contiguous parts, one per rank, as even as they can be;
    with fewer CPUs than ranks, rank r gets CPU r mod len(cpus) alone."""
    if not cpus:
        raise ValueError("cpus: no CPU to split")
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank must be in 0..{tp_size - 1}, got {rank}")
    cpus, n = sorted(cpus), len(cpus)
    if n < tp_size:
        return frozenset({cpus[rank % n]})
    return frozenset(cpus[n * rank // tp_size:n * (rank + 1) // tp_size])


def server_cpus(cpus: Sequence[int], tp_sizes: Sequence[int]) -> list[tuple[int, ...]] | None:
    """Several engines on one machine (`pdbridge up`): each its own contiguous part of
    `cpus`, in proportion to its TP size, when there are enough CPUs for one per rank;
    None when there are not (each engine then splits all of them among its own ranks)."""
    total, n = sum(tp_sizes), len(cpus)
    if n < total or total < 1:
        return None
    cpus, out, done = sorted(cpus), [], 0
    for tp in tp_sizes:
        start, end = n * done // total, n * (done + tp) // total
        out.append(tuple(cpus[start:end]))
        done += tp
    return out


def available_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on (its affinity, e.g. as `taskset` or a cgroup left it)."""
    return tuple(sorted(os.sched_getaffinity(0)))


def check_cpus(value: str, flag: str) -> tuple[str, tuple[int, ...] | None]:
    """--cpu-affinity's value -> (error, cpus): "auto" is every available CPU, "off" None
    (no pinning), else a CPU list that must lie within the available ones."""
    allowed = available_cpus()
    if value == "off":
        return "", None
    if value == "auto":
        return "", allowed
    try:
        cpus = parse_cpu_list(value)
    except ValueError as e:
        return f"{flag} {value!r}: {e}; allowed: auto, off, or a list within " \
               f"{format_cpu_list(allowed)}", None
    outside = sorted(set(cpus) - set(allowed))
    if outside:
        return f"{flag} {value!r}: CPU {format_cpu_list(outside)} is not available to this " \
               f"process; allowed: auto, off, or a list within {format_cpu_list(allowed)}", None
    return "", cpus


def pin_process(cpus: Sequence[int]) -> str:
    """Run every thread of this process on `cpus`, and so every thread and process they start
    after this (a thread inherits its creator's affinity; some start at import time). Returns
    why it could not ("" when it did): a placement is a speed-up, so callers warn and go on."""
    cpus = set(cpus)
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except ProcessLookupError:      # the thread ended meanwhile
                pass
    except OSError as e:                    # e.g. a cgroup that moved the CPUs away since
        return f"could not pin to CPUs {format_cpu_list(cpus)}: {e}"
    return ""
