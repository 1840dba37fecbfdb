"""Name -> factory registries for methods and backbones (in the spirit of timm's
``register_model`` / ``create_model``). Each entry carries a ``cfg``, what the factory
declares about itself (timm's ``pretrained_cfg``: a backbone's preprocessing; a method's needs
of its backbone). The CLI and the GUI fill their menus from these."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")
C = TypeVar("C")


@dataclass(frozen=True)
class Entry(Generic[T, C]):
    """A registered factory: its ``name``, the ``factory`` itself, a one-line
    ``description`` (the factory's docstring's first line unless given) and its ``cfg``."""

    name: str
    factory: Callable[..., T]
    description: str
    cfg: C


class Registry(Generic[T, C]):
    """A named collection of factories. ``register`` is a decorator; ``create`` builds by name.
    ``default_cfg``: the ``cfg`` of an entry registered without one."""

    def __init__(self, kind: str, default_cfg: C) -> None:
        self.kind = kind
        self.default_cfg = default_cfg
        self._entries: dict[str, Entry[T, C]] = {}

    def register(
        self, name: str, *, description: str = "", cfg: C | None = None
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            lines = (factory.__doc__ or "").strip().splitlines()
            text = description or (lines[0] if lines else "")
            self._entries[name] = Entry(name, factory, text,
                                        self.default_cfg if cfg is None else cfg)
            return factory

        return decorator

    def get(self, name: str) -> Entry[T, C]:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise KeyError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name).factory(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T, C]]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries


class LazyNames(Sequence[str]):
    """Registry names that ``load()`` reads (importing the module that fills the registry),
    read on first use: argparse ``choices`` that keep building a parser free of that import
    (``fewshot-studio --help`` imports no torch)."""

    def __init__(self, load: Callable[[], list[str]]) -> None:
        self._load = load

    def _names(self) -> list[str]:
        return self._load()

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...
    def __getitem__(self, i: int | slice) -> str | Sequence[str]:
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()
