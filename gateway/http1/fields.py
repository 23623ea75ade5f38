"""The header fields of one HTTP message, as the wire layer reads and writes them.

Rules:
* Names go out as they came in: byte-exact, never re-cased (a header the gateway adds has the gateway's spelling);
  lookups ignore case, as HTTP field names are case-insensitive (RFC 9110 section 5.1).
* Values are kept as llhttp handed them (checked for forbidden bytes, leading and trailing whitespace gone).
* The reading methods have the names of Twisted's `Headers` (`getRawHeaders`, `hasHeader`, `getAllRawHeaders`...),
  so admission code reads a request's fields and a side call's treq response alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Final, Protocol, TypeVar, overload

__all__ = ["Fields", "HeaderLookup", "read_field"]

_T = TypeVar("_T")


def read_field(entries: dict[bytes, tuple[bytes, list[bytes]]], name: bytes, value: bytes) -> None:
    """One header line as llhttp hands it, into the entries of a message whose head is being read: appended in
    place, as no copy shares the list yet (see `Fields.entries`), without the trailing whitespace llhttp keeps
    (rarely any: looked for before a method call is made for it, as this runs for every header line)."""
    if value.endswith(b" ") or value.endswith(b"\t"):
        value = value.rstrip(b" \t")
    key = _LOWER_NAMES.get(name)
    if key is None:
        key = name.lower()
        if len(_LOWER_NAMES) < _NAMES_KEPT:
            _LOWER_NAMES[name] = key
    entries.setdefault(key, (name, []))[1].append(value)


_LOWER_NAMES: Final[dict[bytes, bytes]] = {}
"""Header names as spelt -> lower-cased, for the names seen (a few dozen spellings, as a rule): one lookup, where
`lower` is a method call and a new key whose hash is not cached yet, for every header line of every message."""
_NAMES_KEPT: Final = 1024
"""How many spellings `_LOWER_NAMES` keeps: names a client makes up are lower-cased each time, never kept."""


class Fields:
    """Header fields: each name once (its first spelling), with every value in the order they came."""

    __slots__ = ("entries",)

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self.entries: dict[bytes, tuple[bytes, list[bytes]]] = {}
        """Lower-cased name -> (the name as spelt, its values). For `gateway.headers`, which copies fields in bulk
        and shares the entries (tuples and lists) between the copies: a list of values is never changed once its
        message's head is read (methods here make a new one), so that copying fields copies no list."""
        for name, value in pairs:
            self.addRawHeader(name, value)

    @overload
    def getRawHeaders(self, name: bytes) -> list[bytes] | None: ...
    @overload
    def getRawHeaders(self, name: bytes, default: _T) -> list[bytes] | _T: ...
    def getRawHeaders(self, name: bytes, default: _T | None = None) -> list[bytes] | _T | None:
        """Every value of `name`, or `default` when there is none."""
        entry = self.entries.get(name.lower())
        return entry[1] if entry is not None else default

    def hasHeader(self, name: bytes) -> bool:
        return name.lower() in self.entries

    def addRawHeader(self, name: bytes, value: bytes) -> None:
        """One more value of `name` (after those there are)."""
        key = name.lower()
        entry = self.entries.get(key)
        # A new list, never an append: fields copied from these may share the list (see `entries`).
        self.entries[key] = (name, [value]) if entry is None else (entry[0], [*entry[1], value])

    def setRawHeaders(self, name: bytes, values: Iterable[bytes]) -> None:
        """`name` with exactly these values, spelt as given here."""
        self.entries[name.lower()] = (name, list(values))

    def removeHeader(self, name: bytes) -> None:
        self.entries.pop(name.lower(), None)

    def getAllRawHeaders(self) -> Iterator[tuple[bytes, list[bytes]]]:
        """(name as spelt, values) for each name, in the order names first came."""
        return iter(self.entries.values())

    def pairs(self) -> list[tuple[bytes, bytes]]:
        """Every (name, value), in order: what a head is written from."""
        return [(name, value) for name, values in self.entries.values() for value in values]

    def copy(self) -> Fields:
        copied = Fields()
        copied.entries = dict(self.entries)
        return copied

    def __repr__(self) -> str:
        return f"Fields({self.pairs()!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Fields):
            return NotImplemented
        return self.entries == other.entries

    __hash__ = None  # type: ignore[assignment]  # unhashable (mutable); typeshed has object.__hash__ as a method


class HeaderLookup(Protocol):
    """What reads a message's fields needs: a request's `Fields`, or the Twisted `Headers` of a side call's
    response (treq), alike."""

    def getRawHeaders(self, name: bytes) -> Sequence[bytes] | None: ...
    def hasHeader(self, name: bytes) -> bool: ...
