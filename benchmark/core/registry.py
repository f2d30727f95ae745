"""Method registry: ``@register_method`` for built-ins, entry points for third parties.

A third-party package adds a method with one line in its ``pyproject.toml``::

    [project.entry-points."concl_bench.methods"]
    mymethod = "my_package.mymethod:MyMethod"
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

from benchmark.core.errors import UserError

ENTRY_POINT_GROUP = "concl_bench.methods"
#: Modules of the built-in plugins; each registers itself with ``@register_method``.
BUILTIN_METHODS = (
    "methods.mocov1",
    "methods.mocov2",
    "methods.densecl",
    "methods.concl",
    "methods.pcl",
    "methods.byol",
    "methods.simclr",
    "methods.random_init",
    "methods.supervised",
)

M = TypeVar("M", bound=type)

#: name -> plugin class (a ``methods.base.Method`` subclass; the core does not import it).
_METHODS: dict[str, Any] = {}
_entry_points_loaded = False


class UnknownMethodError(UserError, KeyError):
    """A method name that no plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator that registers a ``Method`` subclass under ``name``."""

    def decorator(cls: M) -> M:
        # Structural check: the core stays free of torch, so it cannot name ``Method``.
        if not (
            isinstance(cls, type)
            and hasattr(cls, "config_class")
            and callable(getattr(cls, "forward", None))
        ):
            raise TypeError(f"@register_method({name!r}) needs a Method subclass, got {cls!r}")
        existing = _METHODS.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"method {name!r} is already registered by {existing.__module__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for module in BUILTIN_METHODS:
        importlib.import_module(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _METHODS:
            continue
        cls = ep.load()
        register_method(ep.name)(cls)


def registered_methods() -> list[str]:
    _load_entry_points()
    return sorted(_METHODS)


def get_method(name: str) -> Any:
    """The plugin class for ``name``; an unknown name lists the registered ones."""
    _load_entry_points()
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; registered methods: {', '.join(sorted(_METHODS))}"
        ) from None
