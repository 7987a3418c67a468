"""Persistent classes used by the tests (module level, so records can name them)."""

from __future__ import annotations

from typing import Any

from amberdb import Persistent, PersistentList


class Book(Persistent):
    """The seed's Book: a title, a plain tuple of authors and a class default."""

    publisher = "UNKNOWN"

    def __init__(self, title: str, publisher: str | None = None) -> None:
        self.title = title
        self.authors: tuple[str, ...] = ()
        if publisher is not None:
            self.publisher = publisher

    def add_author(self, author: str) -> None:
        self.authors += (author,)


class ListBook(Persistent):
    """A book whose authors are a plain list: changes need ``_p_changed = True``."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.authors: list[str] = []

    def add_author(self, author: str, mark: bool = True) -> None:
        self.authors.append(author)
        if mark:
            self._p_changed = True


class Library(Persistent):
    def __init__(self) -> None:
        self.shelves: PersistentList[Any] = PersistentList()


class Node(Persistent):
    """A linked node for graph and big-transaction tests."""

    def __init__(self, value: Any, next: Any = None) -> None:
        self.value = value
        self.next = next


class Slotted(Persistent):
    __slots__ = ("__private", "x", "y")

    def __init__(self, x: Any, y: Any) -> None:
        self.x = x
        self.y = y
        self.__private = "hidden"

    def private(self) -> str:
        return self.__private


class Temperature(Persistent):
    """Stores kelvin; exposes celsius through a property."""

    def __init__(self) -> None:
        self.kelvin = 273.15

    @property
    def celsius(self) -> float:
        return self.kelvin - 273.15

    @celsius.setter
    def celsius(self, value: float) -> None:
        self.kelvin = value + 273.15


class Compact(Persistent):
    """Overrides __getstate__/__setstate__ to store a tuple."""

    def __init__(self, a: int, b: int) -> None:
        self.a = a
        self.b = b

    def __getstate__(self) -> Any:
        return (self.a, self.b, "v2")

    def __setstate__(self, state: Any) -> None:
        self.a, self.b, self.version = state


class Image(Persistent):
    """Caches an expensive value in a volatile attribute, as in the seed."""

    computations = 0

    def __init__(self, size: int) -> None:
        self.size = size

    def image(self) -> str:
        if hasattr(self, "_v_image"):
            return self._v_image  # type: ignore[no-any-return]
        type(self).computations += 1
        self._v_image = "#" * self.size
        return self._v_image


class Address:
    """A plain (non-persistent) class stored inline when its module is allowed."""

    def __init__(self, street: str) -> None:
        self.street = street

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Address) and other.street == self.street

    __hash__ = None  # type: ignore[assignment]
