"""Reading TOML values and tables into typed values, with errors that name the file, the key and the reason.

Rules:
* Every reader either returns a typed value or raises `ValueError` with a reason a person can act on.
* One load reports every error in the file, not only the first: the `Table`s of a load share one `Errors`, a bad
  value is recorded there and reading goes on (with the key's default, or without the item it belongs to: a
  listener, a route...), and the load ends with one `ConfigError` listing them all.
* A check that depends on a value already refused is not made (it would report the default put in its place), and
  neither is a reference to an item that could not be read (a route naming an upstream whose url was refused).
* A `Table` remembers which keys were read, so a key nobody asked for (a typo) is an error rather than ignored;
  one close to a key the table knows is reported with that key ("did you mean"), and stands for it when that key
  is required and missing.

Used by `gateway.config` and by the admission settings (`gateway.auth.settings`); pure, no I/O.
"""

from __future__ import annotations

import difflib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "ConfigError",
    "Errors",
    "Fields",
    "GiB",
    "Invalid",
    "KiB",
    "MiB",
    "Problem",
    "Table",
    "boolean",
    "describe",
    "nonempty_string",
    "positive_int",
    "positive_seconds",
    "positive_size",
    "read_fields",
    "string",
    "string_list",
]

_T = TypeVar("_T")
_D = TypeVar("_D", bound="DataclassInstance")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True, slots=True)
class Problem:
    """One error in a config file: the file, the key path ("" for the file as a whole) and the reason."""

    source: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.reason}" if self.key else f"{self.source}: {self.reason}"


class ConfigError(Exception):
    """A config file that cannot be used: every error found in it (`errors`, in the order they were found), one
    per line; `source`, `key` and `reason` are those of the first."""

    def __init__(
        self, source: Path | str = "", key: str = "", reason: str = "", *, errors: Sequence[Problem] = ()
    ) -> None:
        self.errors: tuple[Problem, ...] = tuple(errors) or (Problem(str(source), key, reason),)
        super().__init__("\n".join(str(problem) for problem in self.errors))
        first = self.errors[0]
        self.source = first.source
        self.key = first.key
        self.reason = first.reason


class Invalid(Exception):
    """An item (a listener, a route, a method...) that cannot be built: why is recorded in the load's `Errors`
    already, so whoever reads the item leaves it out and reads on."""


class Errors:
    """The errors of one load, in the order they were found; shared by every `Table` read in it."""

    def __init__(self) -> None:
        self._problems: list[Problem] = []

    def add(self, source: Path | str, key: str, reason: str) -> None:
        problem = Problem(str(source), key, reason)
        if problem not in self._problems:  # a value read twice is reported once
            self._problems.append(problem)

    def about(self, source: Path | str, path: str) -> bool:
        """Whether an error was recorded at `path` of `source`, inside it or at a table holding it: a reference
        to it would be refused for that error, which is reported already."""
        return any(
            problem.source == str(source) and (_within(problem.key, path) or _within(path, problem.key))
            for problem in self._problems
        )

    def check(self) -> None:
        """Raise one `ConfigError` with every error recorded, if there is any."""
        if self._problems:
            raise ConfigError(errors=self._problems)


def _within(path: str, outer: str) -> bool:
    return path == outer or not outer or (path.startswith(outer) and path[len(outer)] in ".[")


def positive_seconds(value: object) -> float:
    """Seconds as a number or a string with a unit: 5, 2.5, "250ms", "30s", "2m", "1h"."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*", value.lower())
        if not m:
            raise ValueError(f'must be seconds as a number or a string such as "250ms", "30s", "2m", got {value!r}')
        seconds = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ValueError(f"must be a number of seconds, got {describe(value)}")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"must be a positive number of seconds, got {value!r}")
    return seconds


SIZE_UNITS = {"": 1, "b": 1, "kib": KiB, "mib": MiB, "gib": GiB, "kb": 1000, "mb": 1000**2, "gb": 1000**3}


def positive_size(value: object) -> int:
    """Bytes as an integer or a string with a unit: 65536, "64KiB", "1GiB", "10MB"."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", value)
        unit = m.group(2).lower() if m else ""
        if not m or unit not in SIZE_UNITS:
            raise ValueError(f'must be bytes as an integer or a string such as "64KiB", "1GiB", got {value!r}')
        size = int(m.group(1)) * SIZE_UNITS[unit]
    elif isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        raise ValueError(f"must be a whole number of bytes, got {describe(value)}")
    if size <= 0:
        raise ValueError(f"must be a positive number of bytes, got {value!r}")
    return size


def positive_int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"must be an integer, got {describe(value)}")
    if value <= 0:
        raise ValueError(f"must be a positive integer, got {value}")
    return value


def string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {describe(value)}")
    return value


def nonempty_string(value: object) -> str:
    text = string(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {describe(value)}")
    return value


def describe(value: object) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)


# --- tables: a table remembers which keys were read so that unknown keys are errors ------------------------

_UNKNOWN = "unknown key (check its spelling and the section it is in)"


class Table:
    """A TOML table being read: its errors go to the load's `Errors`, and `finish` reports the keys nobody asked
    for (a typo must not be silently ignored)."""

    def __init__(self, data: Mapping[str, Any], path: str, source: Path | str, errors: Errors | None = None) -> None:
        self._data = data
        self._path = path
        self._source = source
        self.errors = Errors() if errors is None else errors
        self._known: set[str] | None = None
        self._asked: set[str] = set()
        self._seen: set[str] = set()
        self._bad: set[str] = set()
        """Keys with an error recorded: a check that depends on one is not made, and none is reported unknown."""

    @property
    def source(self) -> Path | str:
        """The file this table was read from."""
        return self._source

    def known(self, keys: Iterable[str]) -> None:
        """Declare keys this table may have (adding to those declared before): the keys an unknown one is compared
        with ("did you mean"), and what is known of a table whose reading stopped before its end."""
        self._known = (self._known or set()) | set(keys)

    def names(self) -> list[str]:
        """The keys of this table (for tables whose keys are names, such as a header map)."""
        return list(self._data)

    def path_of(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def report(self, key: str, reason: str) -> None:
        """Record an error about `key` ("" for the table itself) and read on."""
        self._bad.add(key)
        self.errors.add(self._source, self.path_of(key) if key else self._path, reason)

    def error(self, key: str, reason: str) -> Invalid:
        """Record an error about `key` ("" for the table itself); raise what this returns to leave the item out."""
        self.report(key, reason)
        return Invalid()

    def valid(self, *keys: str) -> bool:
        """Whether none of `keys` had an error: a check between keys is made only on values that were read."""
        return not self._bad.intersection(keys)

    def failed(self, key: str = "") -> bool:
        """Whether an error was recorded at `key` of this table ("" for the table), inside it, or above it."""
        return self.errors.about(self._source, self.path_of(key) if key else self._path)

    def has(self, key: str) -> bool:
        self._ask(key)
        return key in self._data

    def get(self, key: str, read: Callable[[object], _T], default: _T | None = None) -> _T:
        """The value of `key` read by `read`. A wrong value is recorded and gives `default`; without a default
        (the key is required), a wrong or missing value is recorded and raises `Invalid`."""
        self._ask(key, read=True)
        if key not in self._data:
            if default is None:
                raise self._missing(key, "is required")
            return default
        try:
            return read(self._data[key])
        except ValueError as e:
            invalid = self.error(key, str(e))
            if default is None:
                raise invalid from None
            return default

    def skip(self, *keys: str) -> None:
        """Leave `keys` unread because a value they depend on was refused: they are not unknown."""
        for key in keys:
            self._ask(key, read=True)

    def require(self, key: str, read: Callable[[object], _T]) -> _T | None:
        """The value of a required `key`, or None when it is missing or wrong (recorded): for an item that reads
        on, to report its other errors, before it is left out."""
        try:
            return self.get(key, read)
        except Invalid:
            return None

    def table(self, key: str) -> Table | None:
        """The table at `key`; None when there is none, or when the value is not a table (recorded)."""
        self._ask(key, read=True)
        if key not in self._data:
            return None
        value = self._data[key]
        if not isinstance(value, dict):
            self.report(key, f"must be a table, got {describe(value)}")
            return None
        return Table(value, self.path_of(key), self._source, self.errors)

    def tables(
        self, key: str, *, required: bool = False, name: Callable[[Mapping[str, Any]], str | None] | None = None
    ) -> list[Table]:
        """An array of tables (`[[key]]`); [] when there is none, or when the value is not one (recorded). Each is
        named in errors by what `name` gives for it (`routes["api"]`), or by its index where that is nothing or is
        not unique (`routes[2]`)."""
        self._ask(key, read=True)
        if key not in self._data:
            if required:
                self._missing(key, f"is required (add at least one [[{key}]] table)")
            return []
        value = self._data[key]
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.report(key, f"must be an array of tables ([[{key}]]), got {describe(value)}")
            return []
        labels = [name(v) if name is not None else None for v in value]
        count = Counter(labels)
        paths = [self.path_of(key) + _subscript(n if n and count[n] == 1 else i) for i, n in enumerate(labels)]
        return [Table(v, path, self._source, self.errors) for v, path in zip(value, paths, strict=True)]

    def named_tables(self, key: str) -> list[tuple[str, Table]]:
        """A table of tables (`[key.name]`); a name that is not allowed, or a value that is not a table, is
        recorded and left out."""
        outer = self.table(key)
        if outer is None:
            return []
        result = []
        for name in outer._data:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                outer.report(name, "a name may contain only letters, digits and -_.")
                continue
            inner = outer.table(name)
            if inner is not None:
                result.append((name, inner))
        return result

    def attempt(self, read: Callable[[Table], _T]) -> _T | None:
        """`read(self)`, or None when it leaves the item out (`Invalid`); then the keys of this table that no
        declared key accounts for are reported as unknown (its reading stopped before `finish`)."""
        try:
            return read(self)
        except Invalid:
            if self._known is not None:
                for key in self._data:
                    if key not in self._known and key not in self._seen and key not in self._bad:
                        self._unknown(key)
            return None

    def finish(self) -> None:
        """Report every key nobody asked for (a typo must not be silently ignored), naming the known key it is
        closest to, if there is one."""
        for key in sorted(set(self._data) - self._seen - self._bad):
            self._unknown(key)

    def _ask(self, key: str, *, read: bool = False) -> None:
        assert self._known is None or key in self._known, f"{self._path or 'the top table'}: {key} is not declared"
        self._asked.add(key)
        if read:
            self._seen.add(key)

    def _unknown(self, key: str) -> None:
        closest = self._closest(key)
        self.report(key, f'unknown key; did you mean "{closest}"?' if closest else _UNKNOWN)

    def _closest(self, key: str) -> str | None:
        """The known key this table does not have that `key` is most likely a misspelling of."""
        known = self._known if self._known is not None else self._asked
        match = difflib.get_close_matches(key, [k for k in known if k not in self._data], n=1)
        return match[0] if match else None

    def _missing(self, key: str, reason: str) -> Invalid:
        """A required key that is missing: when a key nobody asked for is a misspelling of it, that one is the
        error (one error naming the key that was written, not one about the key that was not)."""
        if self._known is not None:
            for written in self._data:
                if written not in self._known and written not in self._bad and self._closest(written) == key:
                    self._bad.add(key)
                    return self.error(written, f'unknown key; did you mean "{key}"?')
        return self.error(key, reason)


def _subscript(label: str | int) -> str:
    """`[2]`, or `["api"]` for a name (quoted as a JSON string, so no name can read as another path)."""
    return f"[{label}]" if isinstance(label, int) else f"[{json.dumps(label, ensure_ascii=False)}]"


def read_fields(table: Table | None, base: _D, readers: Fields) -> _D:
    """`base` with the keys present in `table` replaced (a wrong value keeps `base`'s, recorded); every key
    must be one of `readers`."""
    if table is None:
        return base
    table.known(readers)
    values = {key: table.require(key, read) for key, read in readers.items() if table.has(key)}
    table.finish()
    return replace(base, **{k: v for k, v in values.items() if v is not None})


def string_list(value: object) -> tuple[str, ...]:
    """An array of non-empty strings."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be an array of strings, got {describe(value)}")
    if not all(v.strip() for v in value):
        raise ValueError("must not contain an empty string")
    return tuple(value)


Fields = Mapping[str, Callable[[object], Any]]
