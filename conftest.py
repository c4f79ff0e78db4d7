"""pytest options of claude-peers' tests: the tests that need the package index run on request."""

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--network", action="store_true",
                     help="also run the tests that install packages from the package index (install.sh)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "network: installs packages from the package index; runs with --network")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--network"):
        return
    skip = pytest.mark.skip(reason="needs the package index: run with --network (CI does)")
    for item in items:
        if "network" in item.keywords:
            item.add_marker(skip)
