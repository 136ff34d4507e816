import os
import signal

import pytest

# A suite started in the background of a non-interactive shell (`cmd &`) inherits SIGINT
# ignored, and so would every process it starts: `pdbridge` then keeps ignoring Ctrl-C, as a
# backgrounded program should, and the Ctrl-C tests (test_interrupt, the servers' exit status
# 130) would fail for the launch, not the code. Handled here, it is the default in children.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run tests marked slow (full sweeps)")


def slow_enabled(config) -> bool:
    return config.getoption("--slow") or os.environ.get("PDBRIDGE_SLOW") == "1"


def pytest_collection_modifyitems(config, items):
    if slow_enabled(config):
        return
    skip = pytest.mark.skip(reason="slow sweep: run with --slow or PDBRIDGE_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
