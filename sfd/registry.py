"""Named choices defined once, beside their implementation.

Every option whose value picks an implementation (a sampler, a schedule, a REPA target source, a
REPA loss mode, a reader mode, a kernel setting) is a :class:`Registry`. The module that
implements the choices owns the registry and registers each one next to its code; config
validation, ``--help`` choices and dispatch all read that registry, so adding a choice is one
``register`` call in one place.

Code outside the library adds choices the same way. Entry points call :func:`load_plugins`
before they parse anything: it imports each module named in the ``SFD_PLUGINS`` environment
variable (comma-separated, importable from ``sys.path``/``PYTHONPATH``), and those modules
register what they add::

    # my_sampler.py
    from sfd.samplers import SAMPLERS

    @SAMPLERS.register("midpoint")
    def midpoint(...): ...

    $ SFD_PLUGINS=my_sampler python sample/grid.py ... -o method=midpoint
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

from sfd.config import ConfigError

T = TypeVar("T")

PLUGINS_ENV = "SFD_PLUGINS"


class UnknownChoice(ConfigError):
    """A name that no registry entry has; the message lists the valid ones. A :class:`ConfigError`
    (so a ``ValueError``): the entry points report it as one ``error:`` line, like any bad setting."""


class Registry(Generic[T]):
    """An ordered name → implementation table for one kind of choice (``what``: e.g. "sampler")."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, item: T) -> T: ...

    def register(self, name: str, item: T | None = None):  # type: ignore[no-untyped-def]
        """Add ``item`` under ``name`` (or use as a decorator); a name can be registered once."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} '{name}' is already registered")
            self._items[name] = obj
            return obj

        return add if item is None else add(item)

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def check(self, name: str, where: str | None = None) -> str:
        """``name`` if it is registered, else :class:`UnknownChoice` naming the valid choices."""
        if name not in self._items:
            prefix = f"{where}: " if where else ""  # the setting that holds the name, e.g. "kernels"
            raise UnknownChoice(f"{prefix}unknown {self.what} {name!r}; choose one of {' | '.join(self._items)}")
        return name

    def __getitem__(self, name: str) -> T:
        self.check(name)
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {' | '.join(self._items)})"


_loaded: set[str] = set()


def load_plugins(names: str | None = None) -> list[str]:
    """Import the plugin modules named in ``names`` (default: ``$SFD_PLUGINS``); each once."""
    spec = os.environ.get(PLUGINS_ENV, "") if names is None else names
    loaded = []
    for name in (n.strip() for n in spec.split(",")):
        if not name or name in _loaded:
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UnknownChoice(
                f"{PLUGINS_ENV}: cannot import plugin module {name!r} ({e}); put its folder on PYTHONPATH"
            ) from e
        _loaded.add(name)
        loaded.append(name)
    return loaded
