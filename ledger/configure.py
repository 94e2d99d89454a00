"""Publishing price-book and policy versions to the ledger (`ledger config publish|list`).

A publication is a row in `config_publications`; the ledger writer journals it on every shard
(see `ledger.config_versions`). Publishing is idempotent: a version already published with
the same content is left alone; the same name with a different content is refused, so an
edited file can never change what was journaled (publish the change under a new name).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import psycopg

from ledger.codec import Codec
from ledger.config_versions import (
    CONFIG_PUBLISHED,
    ConfigVersion,
    policy_version,
    price_versions,
)
from ledger.db import QUERIES
from ledger.errors import ConfigError, InvalidEventError


def configured_versions(
    price_book: Path | None, policy: Path | None, *, prices: bool = True, rules: bool = True
) -> list[ConfigVersion]:
    """The versions in the given files (the packaged ones where a path is None)."""
    out: list[ConfigVersion] = []
    if prices:
        out += price_versions(price_book)
    if rules:
        out.append(policy_version(policy))
    return out


def publish(conn: psycopg.Connection, versions: list[ConfigVersion]) -> list[tuple[str, str]]:
    """Register `versions` in one transaction; returns (reference, outcome) per version, the
    outcome `published` or `already published`. ConfigError (and nothing registered) if a
    name is already published with another content or a version is too large to journal."""
    codec = Codec.default()
    outcomes = []
    with conn.transaction():
        for v in versions:
            try:
                codec.encode(CONFIG_PUBLISHED, v.event(0, datetime.now(UTC)))
            except InvalidEventError as exc:
                raise ConfigError(
                    f"{v.kind} version {v.version}: cannot be journaled: {exc}"
                ) from None
            row = conn.execute(
                QUERIES["publish_config"],
                {
                    "kind": v.kind,
                    "version": v.version,
                    "effective_from": v.effective_from,
                    "document": v.document,
                    "sha256": v.sha256,
                },
            ).fetchone()
            if row is not None:
                outcomes.append((f"{v.kind} {v.ref}", "published"))
                continue
            existing = conn.execute(
                QUERIES["published_config"], {"kind": v.kind, "version": v.version}
            ).fetchone()
            if existing[4] != v.sha256:
                raise ConfigError(
                    f"{v.kind} version {v.version!r} is already published with content "
                    f"{existing[4][:12]}; this file's content is {v.sha256[:12]}. A published "
                    "version never changes: give the changed content a new version name"
                )
            outcomes.append((f"{v.kind} {v.ref}", "already published"))
    return outcomes


def published(conn: psycopg.Connection) -> list[dict]:
    """Every publication, oldest first, with the number of shards that journaled it."""
    rows = conn.execute(QUERIES["list_config"]).fetchall()
    conn.commit()
    keys = ("id", "kind", "version", "effective_from", "sha256", "published_at", "shards")
    return [dict(zip(keys, row, strict=True)) for row in rows]
