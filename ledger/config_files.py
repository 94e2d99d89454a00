"""The business configuration files (price book, policy): TOML, shipped with the package or
given by path; any error names the file and what is wrong."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TypeVar

from ledger.errors import ConfigError

T = TypeVar("T")


def load_toml(what: str, packaged: str, path: Path | None, parse: Callable[[dict], T]) -> T:
    """`parse` the TOML at `path`, or the file `packaged` shipped in the ledger package."""
    if path is None:
        text = resources.files("ledger").joinpath(packaged).read_text("utf-8")
        where = f"ledger/{packaged}"
    else:
        text, where = path.read_text("utf-8"), str(path)
    try:
        return parse(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{what} {where}: {exc}") from exc
