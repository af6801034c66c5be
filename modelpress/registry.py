"""One small registry, used for passes, compressed modules, exporters, metrics, zoo models, datasets and
prompt encoders: names to objects, filled by the modules that define them (importing a method package
registers its passes), looked up with a one-line error that lists what exists."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named objects of one sort (``what``: "pass type", "metric", ...). ``discover`` runs once, before the
    first lookup, to import the modules whose definitions register themselves."""

    def __init__(self, what: str, discover: Callable[[], None] | None = None) -> None:
        self.what = what
        self._items: dict[str, T] = {}
        self._discover = discover
        self._discovered = discover is None

    def add(self, name: str, obj: T, replace: bool = True) -> T:
        """Register ``obj`` as ``name``; with ``replace=False`` a second, different object of that name is an
        error (two passes named alike)."""
        if not name:
            raise TypeError(f"a {self.what} needs a name")
        if not replace and name in self._items and self._items[name] is not obj:
            raise TypeError(f"two {self.what}s are named {name!r}")
        self._items[name] = obj
        return obj

    def _ready(self) -> None:
        if not self._discovered:
            self._discovered = True
            assert self._discover is not None
            self._discover()

    def get(self, name: str) -> T:
        """The object named ``name``; a :class:`UserError` listing the known names otherwise."""
        self._ready()
        if name not in self._items:
            raise UserError(f"unknown {self.what} {name!r}; available: {', '.join(sorted(self._items)) or 'none'}")
        return self._items[name]

    def all(self) -> dict[str, T]:
        """Every registered object, by name."""
        self._ready()
        return dict(self._items)

    def __contains__(self, name: object) -> bool:
        self._ready()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.all())
