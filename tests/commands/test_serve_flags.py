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
