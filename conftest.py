"""pytest options of claude-peers' tests: the tests that need the package index run on request, and every
test has a time limit (pytest-timeout, `timeout` in pytest.ini)."""

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--network", action="store_true",
                     help="also run the tests that install packages from the package index (install.sh)")


# The first network test in a process waits for the fresh_install fixture's pip (run_install allows it 600 s).
NETWORK_TIMEOUT_S = 900


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.hasplugin("timeout"):
        raise pytest.UsageError("pytest-timeout is not installed, so a hanging test would never end:"
                                " pip install -r requirements-dev.txt")
    config.addinivalue_line("markers", "network: installs packages from the package index; runs with --network")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--network"):
        for item in items:
            if "network" in item.keywords and item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(NETWORK_TIMEOUT_S))
        return
    skip = pytest.mark.skip(reason="needs the package index: run with --network (CI does)")
    for item in items:
        if "network" in item.keywords:
            item.add_marker(skip)
