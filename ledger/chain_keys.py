"""The keys of the journal's hash chain, held outside the database.

Each journal entry's link is an HMAC-SHA256 under one of these keys (`ledger.book.chain_link`),
and the entry records the id of the key it was linked with. Someone who can rewrite the
database but has not got the key cannot make a changed entry, or anything after it, verify.

The key file (LEDGER_CHAIN_KEY_FILE; default `<home>/chain.keys`, which the local stack makes)
is UTF-8 text, one key per line; `#` comments and blank lines are ignored:

    # key id     secret: at least 64 hex digits (32 bytes)
    k20261201   9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    k20270301   60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752

Key ids are 1-64 characters of `A-Za-z0-9._-` (starting with a letter or digit), each used
once. The LAST key is the current one: new entries are linked with it; earlier keys stay for
verifying what they linked. Rotating: append a key (`ledger keys new`) and restart the ledger
and relay roles; never remove a key that entries were linked with (verify would report them
as unverifiable). The file should be readable by the ledger's user only (mode 0600, or 0640/0440
with a group of its own, e.g. a Kubernetes Secret with fsGroup); a file any user can read is
logged as a warning. Secrets are never logged or printed.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path

import structlog

from ledger.errors import ConfigError
from ledger.settings import Settings

log = structlog.get_logger(__name__)

MIN_SECRET_BYTES = 32
KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEADER = (
    "# billing-ledger chain keys: `<key id> <secret, hex>`, one per line; the last one links\n"
    "# new journal entries, the others verify older ones. Keep this file outside the database\n"
    "# and its backups, readable by the ledger only (mode 0600). Never remove a key in use.\n"
)


@dataclasses.dataclass(frozen=True)
class ChainKeys:
    """Key id → secret, in file order; the last one is `current`."""

    secrets: dict[str, bytes] = dataclasses.field(repr=False)
    source: str = ""
    _macs: dict[str, hmac.HMAC] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def current(self) -> str:
        """The id of the key new entries are linked with."""
        if not self.secrets:
            raise ConfigError(f"{self.source or 'chain keys'}: no key")
        return next(reversed(self.secrets))

    def secret(self, key_id: str) -> bytes | None:
        return self.secrets.get(key_id)

    def mac(self, key_id: str) -> hmac.HMAC | None:
        """An HMAC-SHA256 keyed with `key_id`'s secret, nothing fed yet (copy it to use it:
        the key schedule is done once); None for a key the file does not hold."""
        if key_id not in self._macs:
            secret = self.secrets.get(key_id)
            if secret is None:
                return None
            self._macs[key_id] = hmac.new(secret, digestmod="sha256")
        return self._macs[key_id]

    def __repr__(self) -> str:
        return f"ChainKeys(ids={list(self.secrets)}, source={self.source!r})"


def key_file(settings: Settings) -> Path:
    """Where the chain keys are: LEDGER_CHAIN_KEY_FILE, or `<home>/chain.keys`."""
    if settings.chain_key_file is not None:
        return settings.chain_key_file
    return settings.home.resolve() / "chain.keys"


def load(settings: Settings) -> ChainKeys:
    """The chain keys of these settings; ConfigError (naming the file, never a secret) if the
    file is missing, unreadable or malformed, or a key is too short."""
    path = key_file(settings)
    if not path.is_file():
        how = (
            "LEDGER_CHAIN_KEY_FILE"
            if settings.chain_key_file is not None
            else f"no LEDGER_CHAIN_KEY_FILE, and the default {path}"
        )
        raise ConfigError(
            f"{how}: no chain key file at {path}. The journal's hash chain needs a key held "
            "outside the database: `ledger keys new` makes one (`ledger stack up` does for the "
            "local stack)"
        )
    return parse(path.read_text("utf-8"), source=str(path), mode=path.stat().st_mode)


def parse(text: str, *, source: str, mode: int | None = None) -> ChainKeys:
    found: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number}"
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"{where}: expected `<key id> <hex secret>`")
        key_id, hexed = parts
        if not KEY_ID.fullmatch(key_id):
            raise ConfigError(
                f"{where}: key id {key_id[:70]!r} must be 1-64 of A-Za-z0-9._- "
                "(starting with a letter or digit)"
            )
        if key_id in found:
            raise ConfigError(f"{where}: key id {key_id!r} appears twice")
        try:
            secret = bytes.fromhex(hexed)
        except ValueError:
            raise ConfigError(f"{where}: the secret of key {key_id!r} is not hex") from None
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"{where}: the secret of key {key_id!r} has {len(secret)} bytes; at least "
                f"{MIN_SECRET_BYTES} (64 hex digits) are needed"
            )
        found[key_id] = secret
    if not found:
        raise ConfigError(f"{source}: no chain key in the file")
    if mode is not None and mode & 0o007:
        log.warning(
            "chain_key_file_readable_by_others", file=source, mode=oct(mode & 0o777), want="0o600"
        )
    return ChainKeys(found, source)


def new_key_id(existing: set[str]) -> str:
    """A fresh key id from the time: `k20261203T101500Z` (with a suffix if taken)."""
    base = "k" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    key_id, n = base, 1
    while key_id in existing:
        n += 1
        key_id = f"{base}.{n}"
    return key_id


def add_key(path: Path, key_id: str | None = None) -> str:
    """Append a new random key to the key file (made with mode 0600 if missing); it becomes
    the current key. Returns its id (the secret is never returned or printed)."""
    existing: set[str] = set()
    if path.exists():
        existing = set(parse(path.read_text("utf-8"), source=str(path)).secrets)
    key_id = key_id or new_key_id(existing)
    if not KEY_ID.fullmatch(key_id):
        raise ConfigError(f"key id {key_id[:70]!r} must be 1-64 of A-Za-z0-9._-")
    if key_id in existing:
        raise ConfigError(f"{path}: key id {key_id!r} exists already")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as out:
        if not existing and out.tell() == 0:
            out.write(_HEADER)
        out.write(f"{key_id} {secrets.token_hex(MIN_SECRET_BYTES)}\n")
        out.flush()
        os.fsync(out.fileno())
    log.info("chain_key_added", file=str(path), key_id=key_id)
    return key_id


def ensure_local(settings: Settings) -> Path | None:
    """For the local stack: make `<home>/chain.keys` with one key if there is no key file and
    LEDGER_CHAIN_KEY_FILE is not set. Never touches a configured key file. Returns the path
    made, or None."""
    if settings.chain_key_file is not None:
        return None
    path = key_file(settings)
    if path.exists():
        return None
    add_key(path)
    return path
