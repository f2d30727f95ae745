from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from benchmark.core import registry
from benchmark.core.registry import (
    UnknownMethodError,
    get_method,
    register_method,
    registered_methods,
)
from methods.base import Method


def test_builtin_mocov2_is_registered():
    assert "mocov2" in registered_methods()
    assert get_method("mocov2").name == "mocov2"


def test_unknown_method_is_one_line_listing_registered():
    with pytest.raises(UnknownMethodError) as info:
        get_method("nope")
    assert (
        str(info.value)
        == f"unknown method 'nope'; registered methods: {', '.join(registered_methods())}"
    )


def test_register_rejects_non_methods_and_duplicates(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    with pytest.raises(TypeError):
        register_method("thing")(object)

    @register_method("toy")
    class Toy(Method):
        pass

    assert get_method("toy") is Toy
    with pytest.raises(ValueError, match="already registered"):

        @register_method("toy")
        class Other(Method):
            pass


class EntryPointMethod(Method):
    """A third-party method found through the entry-point group."""


def test_entry_point_plugins_are_loaded(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    ep = EntryPoint("thirdparty", f"{__name__}:EntryPointMethod", registry.ENTRY_POINT_GROUP)
    seen = {}

    def fake_entry_points(group: str):
        seen["group"] = group
        return [ep]

    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    assert get_method("thirdparty") is EntryPointMethod
    assert seen["group"] == "concl_bench.methods"
    assert "thirdparty" in registered_methods()
