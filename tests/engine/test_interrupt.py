"""Ctrl-C ends a TP engine at once and leaves no process behind (issue 12: it took 62 s, or
forever). The interrupt goes to the whole process group, as a terminal sends it, at start-up
and mid-generation. Bounds only turn a hang into a failure; the exit times are printed."""
import os
import signal
import subprocess
import sys
import time

import pytest


def _descendants(root: int) -> set[int]:
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    out, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - out
        out |= frontier
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("tp,wait_workers", [(2, False), (2, True)])
def test_ctrl_c_exits_promptly_and_leaves_no_process(tp, wait_workers):
    argv = [sys.executable, "-m", "pdbridge.cli", "generate", "--tp", str(tp),
            "--prompt-ids", "1,2,3", "--max-tokens", "100000"]
    p = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        if wait_workers:                # generating: every worker up, steps running
            while len(_descendants(p.pid)) < tp and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(2.0)
        else:
            time.sleep(0.5)             # mid start-up
        procs = _descendants(p.pid)
        t0 = time.monotonic()
        os.killpg(p.pid, signal.SIGINT)
        rc = p.wait(60)
        took = time.monotonic() - t0
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    print(f"TP={tp} workers up={wait_workers}: exit {took:.2f} s after Ctrl-C")
    assert rc == 130, err
    assert err.strip().splitlines()[-1] == "pdbridge generate: interrupted", err
    assert "Traceback" not in err, err
    bound = time.monotonic() + 30
    while any(map(_alive, procs)) and time.monotonic() < bound:
        time.sleep(0.1)
    assert not [q for q in procs if _alive(q)], "processes left behind"
