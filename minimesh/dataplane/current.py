"""`Current[T]`: the one value every request reads, swapped whole by a reload."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Current(Generic[T]):
    """Holds the value in force; `get` is one attribute read, `swap` replaces it atomically.

    A request reads it once and keeps what it got, so a swap mid-request never mixes two
    configs: in-flight requests finish on the snapshot they started with.
    """

    __slots__ = ("_value",)

    def __init__(self, value: T) -> None:
        self._value = value

    def get(self) -> T:
        return self._value

    def swap(self, value: T) -> T:
        old, self._value = self._value, value
        return old

    def __repr__(self) -> str:
        return f"<Current {self._value!r}>"
