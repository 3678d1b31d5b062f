"""A small typed registry with decorator registration and entry-point plug-ins.

Strategies and codecs are found by name only through a :class:`Registry`; the core never
branches on names. Third-party packages extend a registry without editing clbench by
declaring an entry point in the registry's group, e.g. in their ``pyproject.toml``::

    [project.entry-points."clbench.codecs"]
    mine = "my_pkg.my_codec:MyCodec"

We write this instead of using e.g. ``catalogue`` because it is ~60 lines, and the error
messages (which list the valid names) are part of our user-facing contract.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from clbench.errors import ClbenchError

T = TypeVar("T")


class UnknownNameError(ClbenchError):
    """A name that is not registered."""


class Registry(Generic[T]):
    """Maps names to factories (classes or functions).

    Args:
        kind: what is registered, used in messages ("strategy", "codec").
        group: the entry-point group scanned lazily for plug-ins ("clbench.codecs").
        builtins: module names imported lazily on first lookup, so that importing the
            registry is cheap and built-ins register themselves with the decorator.
    """

    def __init__(self, kind: str, group: str | None = None, builtins: tuple[str, ...] = ()):
        self.kind = kind
        self.group = group
        self._builtins = builtins
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")``."""

        def deco(obj: T) -> T:
            for n in (name, *aliases):
                if n in self._items and self._items[n] is not obj:
                    raise ValueError(f"{self.kind} {n!r} is registered twice")
                self._items[n] = obj
            return obj

        return deco

    def register_named(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Like :meth:`register`, and a class whose ``name`` is still empty gets ``name``, so
        that an instance can say what it was registered as (codecs, metrics, executors...)."""

        def deco(obj: T) -> T:
            if isinstance(obj, type) and not getattr(obj, "name", ""):
                obj.name = name  # type: ignore[attr-defined]
            return self.register(name, *aliases)(obj)

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        import importlib

        for mod in self._builtins:
            importlib.import_module(mod)
        if self.group:
            for ep in entry_points(group=self.group):
                if ep.name not in self._items:
                    self._items[ep.name] = ep.load()

    def get(self, name: str) -> T:
        """Return the factory registered as ``name`` or raise a one-line error listing names."""
        self._load()
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint}; valid {self.kind} names: "
                f"{', '.join(sorted(self._items))}"
            ) from None

    def build(self, name: str, options: dict[str, Any], prefix: str = "") -> Any:
        """Call the factory ``name`` with ``options`` as keywords. An option its signature
        does not take (unless it takes ``**kwargs``) is a one-line error listing the valid
        ones; a ``TypeError``/``ValueError`` from the factory becomes a one-line error."""
        factory = self.get(name)
        what = f"{prefix}{self.kind} {name!r}"
        try:
            params = dict(inspect.signature(factory).parameters)
        except (TypeError, ValueError):  # no introspectable signature: let the call decide
            params = None
        if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            valid = list(params)
            unknown = sorted(set(options) - set(valid))
            if unknown:
                raise ClbenchError(
                    f"{what} has no option {unknown[0]!r}; valid options: {', '.join(valid) or 'none'}"
                )
        try:
            return factory(**options)
        except (TypeError, ValueError) as e:
            raise ClbenchError(f"{what}: {e}") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
