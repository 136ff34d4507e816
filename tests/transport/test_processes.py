"""Prefill and decode ranks as separate OS processes reading over NIXL (DESIGN.md section 7.1).

Each prefill process fills its EngineLayout regions with values that are a function of each
element's global coordinate, decode processes plan and read over NIXL, and every element of
every decode shard must hold its coordinate's value. Processes always end: every wait has a
timeout and the parent kills what is left.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from xfer_case import TIMEOUT_S, Case, decode_main, prefill_main  # noqa: E402

pytest.importorskip("nixl")


def run_processes(case: Case) -> list[str]:
    ctx = mp.get_context("spawn")
    procs, pconns, dconns = [], [], []
    try:
        for p in range(case.prefill_tp):
            parent, child = ctx.Pipe()
            procs.append(ctx.Process(target=prefill_main, args=(case, p, child), daemon=True))
            pconns.append(parent)
        for j in range(case.decode_tp):
            parent, child = ctx.Pipe()
            procs.append(ctx.Process(target=decode_main, args=(case, j, child), daemon=True))
            dconns.append(parent)
        for pr in procs:
            pr.start()
        metadata = []
        for c in pconns:
            msg = _recv(c)
            if msg[0] != "metadata":
                return msg[1]
            metadata.append(msg[1])
        for c in dconns:
            c.send(("metadata", metadata))
        errors = []
        for c in dconns + pconns:
            errors += _recv(c)[1]
        return errors
    finally:
        for pr in procs:
            pr.join(timeout=5)
            if pr.is_alive():
                pr.kill()
                pr.join()


def _recv(conn):
    if not conn.poll(TIMEOUT_S + 30):
        raise TimeoutError("a rank process did not answer")
    return conn.recv()


DEFAULT = [Case(1, 2, "direct", "DS"), Case(2, 1, "permute", "SD"), Case(3, 2, "staging", "DS")]
PAIRS = [(1, 2), (2, 1), (2, 4), (4, 2), (1, 4), (3, 2)]
FULL = [Case(p, d, s, c) for p, d in PAIRS for s in ("direct", "staging", "permute")
        for c in ("DS", "SD")]


@pytest.mark.parametrize("case", DEFAULT, ids=Case.label)
def test_nixl_processes_receive_exact_bytes(case):
    assert run_processes(case) == []


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in FULL if c not in DEFAULT], ids=Case.label)
def test_nixl_processes_full_matrix(case):
    assert run_processes(case) == []
