"""One error hierarchy for the ledger package, under one root."""


class LedgerError(Exception):
    """Root of every error the ledger raises on purpose."""


class ConfigError(LedgerError):
    """A setting (environment variable, CLI argument, policy or price book) is invalid."""


class StackError(LedgerError):
    """A local service (Kafka, PostgreSQL) could not be started, reached or stopped."""


# --- wire format -----------------------------------------------------------------------------


class DecodeError(LedgerError):
    """Bytes from Kafka could not be turned into an event. `reason` is a stable short code."""

    reason = "undecodable"


class BadMagicError(DecodeError):
    reason = "bad_magic"


class TombstoneError(DecodeError):
    """A record with no value (a Kafka tombstone): there is no event to journal."""

    reason = "tombstone"


class OversizedEventError(DecodeError):
    """A record value larger than any event the journal accepts."""

    reason = "oversized_event"


class UnknownFingerprintError(DecodeError):
    reason = "unknown_fingerprint"


class TruncatedBodyError(DecodeError):
    reason = "truncated_body"


class SchemaViolationError(DecodeError):
    """The body decoded but does not satisfy the schema (or the event's own rules)."""

    reason = "schema_violation"


class UnknownEnumValueError(SchemaViolationError):
    """An enum field holds a symbol (or index) the reader schema does not know."""

    reason = "unknown_enum_value"


class UnstorableValueError(SchemaViolationError):
    """A string the journal cannot store (a NUL character, a control character in an id)."""

    reason = "unstorable_value"


class OversizedFieldError(SchemaViolationError):
    """An identifier or string longer than the journal's bounds (`ledger.bounds`)."""

    reason = "oversized_field"


class InvalidEventError(LedgerError):
    """A producer was handed an event that does not match its schema; nothing was sent."""

    def __init__(self, event_type: str, field: str, message: str):
        self.event_type = event_type
        self.field = field
        super().__init__(f"{event_type}.{field}: {message}")


class UnfoldableEntryError(LedgerError):
    """A journal entry the projections cannot fold: its payload or detail is not what the
    writer stores (only a change behind the writer's back makes one)."""
