"""The one place settings come from: `LEDGER_*` environment variables, read once at start-up.

`Settings.from_env()` builds a frozen object; a bad value raises `ConfigError` naming the
variable. Nothing else in the project reads `os.environ`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from ledger.errors import ConfigError
from ledger.redact import redact

PREFIX = "LEDGER_"

# A dead-letter copy (raw value + key + headers) larger than this is written as a reference to
# its `rejected_events` row instead of the bytes: well under Kafka's default 1 MB limit
# (message.max.bytes, and the producer's max_request_size).
DEADLETTER_MAX_BYTES = 900 * 1024

# A PostgreSQL role name the migrations can quote safely: lower case, at most 63 bytes.
_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class DbRoles(NamedTuple):
    """The ledger's PostgreSQL roles: `owner` owns the schema (DDL, `ledger db migrate`),
    `writer` is every worker role's, `reader` may only read."""

    owner: str = "ledger_owner"
    writer: str = "ledger_writer"
    reader: str = "ledger_reader"


@dataclasses.dataclass(frozen=True)
class Settings:
    # Existing services; when set, the local stack starts nothing.
    kafka_bootstrap: str | None = None
    # The writer role's database (the workers'); the owner's (`ledger db migrate`) and the
    # reader's (audit, verify, reports) default to it when not given.
    database_url: str | None = None
    owner_database_url: str | None = None
    reader_database_url: str | None = None
    # PostgreSQL role names: the migrations grant to them, the local stack creates them.
    db_owner_role: str = DbRoles().owner
    db_writer_role: str = DbRoles().writer
    db_reader_role: str = DbRoles().reader
    # Local stack.
    home: Path = dataclasses.field(default_factory=lambda: default_home())
    cache_dir: Path = Path.home() / ".cache" / "billing-ledger"
    broker: str = "auto"  # auto | kafka | tansu
    # Topics.
    topic_prefix: str = ""
    partitions: int = 8
    # Ledger consumer.
    consumer_group: str = "ledger"
    # Shards (partition numbers) this worker's ledger consumer may own, e.g. "0-3,6";
    # None: all of them (each shard is held by one worker at a time; others stand by).
    shards: list[int] | None = None
    # Seconds after which a shard lease not renewed (its holder crashed, froze or lost the
    # database) may be taken over by a standby.
    lease_timeout_s: int = 10
    batch_max_events: int = 2000
    batch_max_ms: int = 200
    # Projection and relay.
    poll_interval_ms: int = 200
    # Dead-letter copies larger than this (bytes) carry a reference to the reject instead.
    deadletter_max_bytes: int = DEADLETTER_MAX_BYTES
    # Scheduler: seconds between PeriodTicks.
    tick_interval_s: int = 60
    # Business configuration files (None: the defaults shipped with the package).
    price_book: Path | None = None
    policy: Path | None = None
    # Retention (`ledger prune`): published outbox rows and resolved rejects older than this
    # many days are deleted; the journal keeps everything.
    outbox_retention_days: int = 7
    rejects_retention_days: int = 90
    # Prometheus metrics, /healthz and /readyz of `ledger worker` on this port (0: off).
    metrics_port: int = 0
    # /readyz answers 503 while a ledger consumer's lag (records) or the projection's lag
    # (journal entries) exceeds this.
    ready_max_lag: int = 100_000
    # Logging.
    log_level: str = "INFO"
    log_format: str = "auto"  # auto | json | console
    # Tamper evidence: the keys of the journal's hash chain (a file held outside the database;
    # None: `<home>/chain.keys`, made by the local stack), and how often the relay publishes
    # every shard's chain head to the checkpoint topic.
    chain_key_file: Path | None = None
    checkpoint_interval_s: int = 10
    # Kafka security, for every client the ledger makes (`ledger.kafka_auth`).
    kafka_security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    kafka_sasl_mechanism: str | None = None  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    kafka_username: str | None = None
    kafka_password: str | None = dataclasses.field(default=None, repr=False)  # never printed
    kafka_password_file: Path | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    # The read-only web console (`ledger console`): where it listens.
    console_host: str = "127.0.0.1"
    console_port: int = 8780

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        names = sorted(PREFIX + n.upper() for n in known)
        for key in env:
            if key.startswith(PREFIX) and key[len(PREFIX) :].lower() not in known:
                # A near miss is a typo; anything else (hledger's LEDGER_FILE) is not ours.
                close = difflib.get_close_matches(key, names, n=1, cutoff=0.8)
                if close:
                    raise ConfigError(
                        f"{key}: unknown setting; did you mean {close[0]}? "
                        f"(known: {', '.join(names)})"
                    )
        for field in dataclasses.fields(cls):
            var = PREFIX + field.name.upper()
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            values[field.name] = _parse(var, field.name, raw)
        return cls(**values)

    def __post_init__(self) -> None:
        _check_choice("LEDGER_BROKER", self.broker, ("auto", "kafka", "tansu"))
        _check_choice("LEDGER_LOG_FORMAT", self.log_format, ("auto", "json", "console"))
        _check_choice(
            "LEDGER_LOG_LEVEL", self.log_level.upper(), ("DEBUG", "INFO", "WARNING", "ERROR")
        )
        for name, low, high in (
            ("partitions", 1, 10_000),
            # Two batches can be in memory at once (one written, the next prepared), ~4.4 KB
            # per record each: the worker's peak RSS was 116 MiB at 2,000, 180 MiB at 10,000
            # and 263-268 MiB at 20,000 (`make bench`), over the 250 MB budget.
            ("batch_max_events", 1, 10_000),
            ("batch_max_ms", 1, 600_000),
            ("poll_interval_ms", 1, 600_000),
            ("tick_interval_s", 1, 86_400),
            ("lease_timeout_s", 3, 600),
            ("deadletter_max_bytes", 1024, 1_000_000),
            ("outbox_retention_days", 1, 36_500),
            ("rejects_retention_days", 1, 36_500),
            ("checkpoint_interval_s", 1, 86_400),
            ("metrics_port", 0, 65_535),
            ("ready_max_lag", 0, 10**12),
            ("console_port", 1, 65_535),
        ):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(f"LEDGER_{name.upper()}={value}: must be in [{low}, {high}]")
        for name in ("database_url", "owner_database_url", "reader_database_url"):
            url = getattr(self, name)
            if url is not None and not url.startswith(("postgresql://", "postgres://")):
                raise ConfigError(
                    f"LEDGER_{name.upper()}={redact(url)!r}: must be a postgresql:// URL"
                )
        for name in ("owner_database_url", "reader_database_url"):
            if getattr(self, name) is not None and self.database_url is None:
                raise ConfigError(
                    f"LEDGER_{name.upper()} needs LEDGER_DATABASE_URL too (the writer's); "
                    "without it the local stack's roles are used"
                )
        for name in ("db_owner_role", "db_writer_role", "db_reader_role"):
            role = getattr(self, name)
            if not _ROLE_NAME.fullmatch(role):
                raise ConfigError(
                    f"LEDGER_{name.upper()}={role!r}: a role name is lower-case letters, "
                    "digits and _, at most 63, not starting with a digit"
                )
        if len(set(self.db_roles)) != 3:
            raise ConfigError(
                "LEDGER_DB_OWNER_ROLE, LEDGER_DB_WRITER_ROLE and LEDGER_DB_READER_ROLE must be "
                f"three different roles, got {', '.join(self.db_roles)}"
            )
        if self.kafka_bootstrap is not None:
            for hostport in self.kafka_bootstrap.split(","):
                host, _, port = hostport.strip().rpartition(":")
                if not host or not port.isdigit():
                    raise ConfigError(
                        f"LEDGER_KAFKA_BOOTSTRAP={self.kafka_bootstrap!r}: "
                        "expected host:port[,host:port...]"
                    )

        _check_kafka_security(self)
        if not self.console_host or any(c.isspace() or c in "/?#" for c in self.console_host):
            raise ConfigError(
                f"LEDGER_CONSOLE_HOST={self.console_host!r}: expected a host name or an IP "
                "address to listen on, e.g. 127.0.0.1 (0.0.0.0: every interface)"
            )

    def to_env(self) -> dict[str, str]:
        """These settings as the LEDGER_* variables `from_env` reads back, for a child
        process: unset ones left out, paths absolute, shard lists as `0,1,2`."""
        env = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if isinstance(value, Path):
                value = value.resolve()
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            env[PREFIX + field.name.upper()] = str(value)
        return env

    def __repr__(self) -> str:  # no password (in a DSN or a field) reaches a log or traceback
        fields = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr
        )
        return redact(f"Settings({fields})")

    @property
    def db_roles(self) -> DbRoles:
        return DbRoles(self.db_owner_role, self.db_writer_role, self.db_reader_role)

    @property
    def uses_existing_services(self) -> bool:
        return self.kafka_bootstrap is not None and self.database_url is not None

    @property
    def console_url(self) -> str:
        """Where `ledger console` serves (LEDGER_CONSOLE_HOST, LEDGER_CONSOLE_PORT)."""
        host = f"[{self.console_host}]" if ":" in self.console_host else self.console_host
        return f"http://{host}:{self.console_port}/"

    def topic(self, name: str) -> str:
        """The full name of one of the ledger's topics, e.g. `billing.usage.v1`."""
        return self.topic_prefix + name


def _parse(var: str, name: str, raw: str) -> object:
    kind = {f.name: f.type for f in dataclasses.fields(Settings)}[name]
    if name == "shards":
        return parse_shards(var, raw)
    if "int" in str(kind):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{var}={raw!r}: not an integer") from None
    if "Path" in str(kind):
        path = Path(raw).expanduser()
        if name in _MUST_EXIST and not path.is_file():
            raise ConfigError(f"{var}={raw!r}: no such file")
        return path
    return raw


# Files that must exist when the setting is read (the chain key file may be made later, by
# `ledger keys new`; it is checked when the keys are loaded).
_MUST_EXIST = (
    "price_book",
    "policy",
    "kafka_password_file",
    "kafka_ssl_cafile",
    "kafka_ssl_certfile",
    "kafka_ssl_keyfile",
)

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _check_kafka_security(s: Settings) -> None:
    """The LEDGER_KAFKA_* security settings agree with each other: SASL needs a mechanism, a
    user name and one password (inline or from a file); TLS files only with SSL protocols."""
    protocol = s.kafka_security_protocol
    _check_choice("LEDGER_KAFKA_SECURITY_PROTOCOL", protocol, SECURITY_PROTOCOLS)
    sasl = protocol.startswith("SASL_")
    given = {
        "LEDGER_KAFKA_SASL_MECHANISM": s.kafka_sasl_mechanism,
        "LEDGER_KAFKA_USERNAME": s.kafka_username,
        "LEDGER_KAFKA_PASSWORD": s.kafka_password,
        "LEDGER_KAFKA_PASSWORD_FILE": s.kafka_password_file,
    }
    if not sasl:
        for var, value in given.items():
            if value is not None:
                raise ConfigError(
                    f"{var} is set but LEDGER_KAFKA_SECURITY_PROTOCOL={protocol}: SASL settings "
                    "need SASL_PLAINTEXT or SASL_SSL"
                )
    else:
        if s.kafka_sasl_mechanism is None:
            raise ConfigError(
                f"LEDGER_KAFKA_SECURITY_PROTOCOL={protocol} needs LEDGER_KAFKA_SASL_MECHANISM "
                f"({', '.join(SASL_MECHANISMS)})"
            )
        _check_choice("LEDGER_KAFKA_SASL_MECHANISM", s.kafka_sasl_mechanism, SASL_MECHANISMS)
        if not s.kafka_username:
            raise ConfigError(
                f"LEDGER_KAFKA_SECURITY_PROTOCOL={protocol} needs LEDGER_KAFKA_USERNAME"
            )
        if (s.kafka_password is None) == (s.kafka_password_file is None):
            raise ConfigError(
                f"LEDGER_KAFKA_SECURITY_PROTOCOL={protocol} needs exactly one of "
                "LEDGER_KAFKA_PASSWORD and LEDGER_KAFKA_PASSWORD_FILE"
            )
    tls = protocol in ("SSL", "SASL_SSL")
    files = {
        "LEDGER_KAFKA_SSL_CAFILE": s.kafka_ssl_cafile,
        "LEDGER_KAFKA_SSL_CERTFILE": s.kafka_ssl_certfile,
        "LEDGER_KAFKA_SSL_KEYFILE": s.kafka_ssl_keyfile,
    }
    for var, value in files.items():
        if value is not None and not tls:
            raise ConfigError(
                f"{var} is set but LEDGER_KAFKA_SECURITY_PROTOCOL={protocol}: TLS files need SSL "
                "or SASL_SSL"
            )
    if s.kafka_ssl_keyfile is not None and s.kafka_ssl_certfile is None:
        raise ConfigError("LEDGER_KAFKA_SSL_KEYFILE needs LEDGER_KAFKA_SSL_CERTFILE")


def parse_shards(var: str, raw: str) -> list[int]:
    """ "0-3,6" → [0, 1, 2, 3, 6]."""
    shards: set[int] = set()
    try:
        for part in raw.split(","):
            first, _, last = part.strip().partition("-")
            low, high = int(first), int(last or first)
            if low < 0 or high < low:
                raise ValueError(part)
            shards.update(range(low, high + 1))
    except ValueError:
        raise ConfigError(f"{var}={raw!r}: expected shard numbers like 0-3,6") from None
    return sorted(shards)


def _check_choice(var: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{var}={value!r}: must be one of {', '.join(choices)}")


def default_home(environ: Mapping[str, str] | None = None) -> Path:
    """Where the local stack lives unless LEDGER_HOME says otherwise: one place per user
    (`$XDG_STATE_HOME/billing-ledger`, else `~/.local/state/billing-ledger`), so every command
    finds the same stack from any directory."""
    env = os.environ if environ is None else environ
    state = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "billing-ledger"
