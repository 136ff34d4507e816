import os

import pytest


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
