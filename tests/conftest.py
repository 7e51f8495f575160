"""Generic test fixtures. Inputs are drawn fresh in each test (no global seeding)."""

from __future__ import annotations

import os
import sys

import pytest

# Make tests/stl_helpers.py importable from every test directory, whatever the import mode.
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from stl_helpers import rel_err as _rel_err  # noqa: E402


@pytest.fixture
def rel_err():
    """The relative-error function ``‖a-b‖/‖b‖`` (also importable from ``stl_helpers``)."""
    return _rel_err
