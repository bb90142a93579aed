"""Reading user catalogs (providers, agents) from JSON or TOML: one reader, one set of errors.

A catalog file is ``{"<key>": [entry, ...]}`` (JSON, or the same tables in TOML by extension).
Entries are turned into objects by the caller's ``from_dict``; every problem is a ``CatalogError``
(also a ``ValueError``) naming the file and the entry.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from busted.errors import CatalogError

__all__ = ["entries", "read"]

T = TypeVar("T")


def read(path: str | Path, what: str) -> Any:
    """The parsed content of a JSON or TOML catalog file (``what`` names it in errors)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise CatalogError(f"{p}: cannot read {what}: {exc.strerror}") from exc
    try:
        if p.suffix == ".toml":
            import tomllib

            return tomllib.loads(raw.decode())
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {exc}") from exc


def entries(data: Any, key: str, where: str, from_dict: Callable[[dict[str, Any]], T],
            article: str = "a") -> list[T]:
    """``data[key]`` as objects made by ``from_dict``, in order."""
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise CatalogError(f"{where}: expected an object with {article} '{key}' list")
    out: list[T] = []
    for i, d in enumerate(data[key]):
        if not isinstance(d, dict):
            raise CatalogError(f"{where}: {key}[{i}] is not an object")
        try:
            out.append(from_dict(d))
        except (TypeError, ValueError) as exc:
            raise CatalogError(f"{where}: {key}[{i}] ({d.get('id', '?')}): {exc}") from exc
    return out
