"""Helpers shared by several test files (pytest fixtures)."""

import math

import pytest


def _assert_tree_close(a, b, rel: float, abs: float, path: str = "") -> None:
    """Equal structure (dict keys, sequence lengths); floats equal up to ``rel`` relative or ``abs``
    absolute (NaN equals NaN, inf equals inf); everything else equal. ``path`` names the place in
    assertion messages."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_tree_close(a[k], b[k], rel, abs, f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_tree_close(x, y, rel, abs, f"{path}[{i}]")
    elif isinstance(a, float):
        same = a == b or (math.isnan(a) and math.isnan(b))
        assert same or math.isclose(a, b, rel_tol=rel, abs_tol=abs), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.fixture
def assert_tree_close():
    """``assert_tree_close(a, b, rel, abs)``: two results (nested dicts / lists of numbers) agree."""
    return _assert_tree_close
