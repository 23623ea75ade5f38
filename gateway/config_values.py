"""Reading TOML values and tables into typed values, with errors that name the file, the key and the reason.

Rule: every reader either returns a typed value or raises `ValueError` with a reason a person can act on; a
`Table` remembers which keys were read, so a key nobody asked for (a typo) is an error rather than ignored. Used
by `gateway.config` and by the admission settings (`gateway.auth.settings`); pure, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "ConfigError",
    "Fields",
    "GiB",
    "KiB",
    "MiB",
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

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class ConfigError(Exception):
    """A config file that cannot be used, with the key at fault and why."""

    def __init__(self, source: Path | str, key: str, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")
        self.source = str(source)
        self.key = key
        self.reason = reason


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


class Table:
    """A TOML table being read; `finish` rejects keys nobody asked for (a typo must not be silently ignored)."""

    def __init__(self, data: Mapping[str, Any], path: str, source: Path | str) -> None:
        self._data = data
        self._path = path
        self._source = source
        self._seen: set[str] = set()

    @property
    def source(self) -> Path | str:
        """The file this table was read from."""
        return self._source

    def names(self) -> list[str]:
        """The keys of this table (for tables whose keys are names, such as a header map)."""
        return list(self._data)

    def path_of(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self._source, self.path_of(key) if key else self._path, reason)

    def has(self, key: str) -> bool:
        return key in self._data

    def get(self, key: str, read: Callable[[object], _T], default: _T | None = None) -> _T:
        self._seen.add(key)
        if key not in self._data:
            if default is None:
                raise self.error(key, "is required")
            return default
        try:
            return read(self._data[key])
        except ValueError as e:
            raise self.error(key, str(e)) from None

    def table(self, key: str) -> Table | None:
        self._seen.add(key)
        if key not in self._data:
            return None
        value = self._data[key]
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table, got {describe(value)}")
        return Table(value, self.path_of(key), self._source)

    def tables(self, key: str, *, required: bool = False) -> list[Table]:
        """An array of tables (`[[key]]`)."""
        self._seen.add(key)
        if key not in self._data:
            if required:
                raise self.error(key, f"is required (add at least one [[{key}]] table)")
            return []
        value = self._data[key]
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(key, f"must be an array of tables ([[{key}]]), got {describe(value)}")
        return [Table(v, f"{self.path_of(key)}[{i}]", self._source) for i, v in enumerate(value)]

    def named_tables(self, key: str) -> list[tuple[str, Table]]:
        """A table of tables (`[key.name]`)."""
        outer = self.table(key)
        if outer is None:
            return []
        result = []
        for name in outer._data:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise outer.error(name, "a name may contain only letters, digits and -_.")
            inner = outer.table(name)
            assert inner is not None
            result.append((name, inner))
        return result

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise self.error(unknown[0], "unknown key (check its spelling and the section it is in)")


def read_fields(table: Table | None, base: _T, readers: Fields) -> _T:
    """`base` with the keys present in `table` replaced; every key must be known."""
    if table is None:
        return base
    changes = {key: table.get(key, read) for key, read in readers.items() if table.has(key)}
    table.finish()
    return replace(base, **changes)  # type: ignore[type-var]


def string_list(value: object) -> tuple[str, ...]:
    """An array of non-empty strings."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be an array of strings, got {describe(value)}")
    if not all(v.strip() for v in value):
        raise ValueError("must not contain an empty string")
    return tuple(value)


Fields = Mapping[str, Callable[[object], Any]]
