"""`pdbridge serve` and `pdbridge up` refuse bad flags with one line naming the flag."""
import argparse

import pytest

from pdbridge.commands import serve, up


def _args(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("batch,error", [(0, "--pull-batch must be >= 1, got 0"), (1, ""),
                                         (16, "")])
def test_pull_batch_is_at_least_one(batch, error, monkeypatch):
    monkeypatch.setenv("PDBRIDGE_SECRET", "x")
    args = _args(serve, ["--role", "decode", "--pull-batch", str(batch)])
    assert serve.check(args) == error
    assert up.check(_args(up, ["--pull-batch", str(batch)]))[0] == error


@pytest.mark.parametrize("k,error", [(-1, "--floor-probe must be >= 0 (0: off), got -1"),
                                     (0, ""), (2, "")])
def test_floor_probe_is_a_count_or_off(k, error, monkeypatch):
    monkeypatch.setenv("PDBRIDGE_SECRET", "x")
    assert serve.check(_args(serve, ["--role", "decode", "--floor-probe", str(k)])) == error
    assert up.check(_args(up, ["--floor-probe", str(k)]))[0] == error


@pytest.mark.parametrize("value,error", [
    ("auto", ""), ("off", ""), ("0", ""),
    ("99999", "--cpu-affinity '99999': CPU 99999 is not available to this process; allowed: "
              "auto, off, or a list within "),
    ("x-1", "--cpu-affinity 'x-1': 'x-1' is not a CPU number or range like 0-3; allowed: ")])
def test_cpu_affinity_is_a_cpu_list_within_this_process(value, error, monkeypatch):
    monkeypatch.setenv("PDBRIDGE_SECRET", "x")
    got = serve.check(_args(serve, ["--role", "decode", "--cpu-affinity", value]))
    assert got.startswith(error) and bool(got) == bool(error), got
    with pytest.raises(SystemExit):                 # up: auto or off only (argparse says so)
        _args(up, ["--cpu-affinity", "0"])


@pytest.mark.parametrize("s,error", [(0, "--prefill-wait-s must be > 0, got 0.0"),
                                     (-1, "--prefill-wait-s must be > 0, got -1.0"),
                                     (0.5, ""), (300, "")])
def test_prefill_wait_s_is_positive(s, error, monkeypatch):
    monkeypatch.setenv("PDBRIDGE_SECRET", "x")
    assert serve.check(_args(serve, ["--role", "decode", "--prefill-wait-s", str(s)])) == error


def test_the_router_announces_unless_told_not_to():
    from pdbridge.commands import router
    base = ["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2"]
    assert _args(router, base).announce and not _args(router, base + ["--no-announce"]).announce
    assert _args(up, []).announce and not _args(up, ["--no-announce"]).announce
