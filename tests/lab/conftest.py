"""Tests marked ``lab`` create network namespaces and kernel state: root only."""

import os

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root for network namespaces")
    for item in items:
        if item.get_closest_marker("lab") is not None:
            item.add_marker(skip)
