"""Price-book and policy versions as journal events. Pure, no I/O.

What a replay reproduces must not depend on files that can be edited. So the ledger does not
rate or apply rules with whatever `pricebook.toml` and `policy.toml` say today: it uses the
versions journaled on the shard, in journal order.

- A *publication* registers one version (kind `price_book` or `policy`, a name, an
  `effective_from`, the content as a canonical JSON document and its SHA-256) in the database
  (`ledger config publish`; the worker publishes its configured files at start). A name is
  published once: the same name with a different content is refused.
- The ledger writer journals each publication on every shard it writes, as a `ConfigPublished`
  entry before the batch's events (a price version at once; a policy version once the ledger's
  clock reaches its `effective_from`). From that entry on, that shard rates with every price
  version journaled so far (the version in force at the usage's `occurred_at`) and applies the
  latest journaled policy. Entries that used a version record its `version@sha` reference.
- A price version that prices usage held as *unpriced* re-rates it: one `UsageRerated` entry
  per held usage event, right after the publication, charged as the usage would have been.
- A shard with nothing journaled yet (a journal from before publications existed) uses the
  configured files, as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ledger.book import LedgerFold, canonical_json
from ledger.config_files import load_toml
from ledger.policy import Policy
from ledger.rating import PriceBook, parse_version

PRICE_BOOK = "price_book"
POLICY = "policy"
KINDS = (PRICE_BOOK, POLICY)
# Journaled policies take effect from here unless the file says otherwise.
DEFAULT_POLICY_EFFECTIVE_FROM = datetime(2020, 1, 1, tzinfo=UTC)
# The pseudo-topic of a ConfigPublished raw event (partition = shard, offset = publication id).
CONFIG_TOPIC = "ledger.config"
CONFIG_PUBLISHED = "ConfigPublished"


@dataclasses.dataclass(frozen=True)
class ConfigVersion:
    kind: str
    version: str
    effective_from: datetime
    document: str  # canonical JSON
    sha256: str

    @property
    def ref(self) -> str:
        return f"{self.version}@{self.sha256[:12]}"

    @classmethod
    def of(cls, kind: str, version: str, effective_from: datetime, content: dict) -> ConfigVersion:
        document = canonical_json(_plain(content), floats=True)
        digest = hashlib.sha256(document.encode()).hexdigest()
        return cls(kind, version, effective_from, document, digest)

    def event(self, shard: int, published_at: datetime) -> dict[str, Any]:
        """The ConfigPublished event that journals this version on `shard`."""
        return {
            "event_id": event_id(self.kind, self.version, shard),
            "account_id": "",
            "occurred_at": published_at,
            "kind": self.kind,
            "version": self.version,
            "effective_from": self.effective_from,
            "document": self.document,
            "sha256": self.sha256,
        }

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> ConfigVersion:
        """The version a ConfigPublished event carries; ValueError if it does not hold together
        (unknown kind, a document whose hash is not `sha256`, a document that does not parse)."""
        kind = event["kind"]
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        effective = event["effective_from"]
        if isinstance(effective, str):
            effective = datetime.fromisoformat(effective)
        version = cls(kind, event["version"], effective, event["document"], event["sha256"])
        actual = hashlib.sha256(version.document.encode()).hexdigest()
        if actual != version.sha256:
            raise ValueError(f"document hashes to {actual[:12]}, not {version.sha256[:12]}")
        version.parsed()  # raises ValueError if the content is not a valid version
        return version

    def parsed(self) -> Any:
        """The PriceVersion or Policy this document describes."""
        content = json.loads(self.document)
        try:
            if self.kind == PRICE_BOOK:
                return parse_version(content, ref=self.ref)
            return Policy.from_document(content, ref=self.ref)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{self.kind} {self.version}: {exc}") from exc


def published_policy(payload: Any) -> Policy | None:
    """The policy that a journaled ConfigPublished entry (its payload) puts in force on its
    shard from that entry on; None for a price version, or for a payload that does not hold
    together (the writer journals none; verify reports a changed one by its link)."""
    try:
        version = ConfigVersion.from_event(payload)
        return version.parsed() if version.kind == POLICY else None
    except (ValueError, KeyError, TypeError):
        return None


def event_id(kind: str, version: str, shard: int) -> str:
    return f"config:{kind}:{version}:{shard}"


def price_versions(path: Path | None = None) -> list[ConfigVersion]:
    """Every version of the price book at `path` (or the packaged one), as publications."""

    def parse(data: dict) -> list[ConfigVersion]:
        out = []
        for raw in data.get("versions", []):
            parsed = parse_version(raw)  # refuse what would not rate
            out.append(ConfigVersion.of(PRICE_BOOK, parsed.version, parsed.effective_from, raw))
        return out

    return load_toml("price book", "pricebook.toml", path, parse)


def policy_version(path: Path | None = None) -> ConfigVersion:
    """The policy at `path` (or the packaged one) as a publication. Its name is the file's
    top-level `version` (else derived from its content); `effective_from` defaults to 2020."""

    def parse(data: dict) -> ConfigVersion:
        Policy.from_document(_plain(data))  # refuse what would not apply
        body = {k: v for k, v in data.items() if k not in ("version", "effective_from")}
        effective = data.get("effective_from", DEFAULT_POLICY_EFFECTIVE_FROM)
        if not isinstance(effective, datetime) or effective.tzinfo is None:
            raise ValueError("effective_from: must be a date-time with a UTC offset")
        draft = ConfigVersion.of(POLICY, "", effective, body)
        name = str(data.get("version") or f"sha-{draft.sha256[:12]}")
        return ConfigVersion.of(POLICY, name, effective, body)

    return load_toml("policy", "policy.toml", path, parse)


@dataclasses.dataclass
class ShardConfig:
    """The versions journaled on one shard so far, in journal order, and the fold they make."""

    prices: list[ConfigVersion] = dataclasses.field(default_factory=list)
    policy: ConfigVersion | None = None

    def add(self, version: ConfigVersion) -> None:
        if version.kind == PRICE_BOOK:
            self.prices = [p for p in self.prices if p.version != version.version] + [version]
        else:
            self.policy = version

    @property
    def empty(self) -> bool:
        return not self.prices and self.policy is None

    def fold(self, fallback: LedgerFold) -> LedgerFold:
        """The LedgerFold for this shard: journaled versions, the fallback's for a kind with
        none journaled yet."""
        pricebook = (
            PriceBook([p.parsed() for p in self.prices]) if self.prices else fallback.pricebook
        )
        policy = self.policy.parsed() if self.policy is not None else fallback.policy
        return LedgerFold(pricebook, policy)

    def policy_or(self, fallback: Policy) -> Policy:
        return self.policy.parsed() if self.policy is not None else fallback


def _plain(value: Any) -> Any:
    """TOML values as JSON values: date-times as ISO text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value
