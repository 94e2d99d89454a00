"""How every Kafka client of the ledger authenticates: the one place the LEDGER_KAFKA_* security
settings become kafka-python options.

    KafkaConsumer(..., **client_options(settings))
    KafkaProducer(..., **client_options(settings))
    KafkaAdminClient(..., **client_options(settings))

PLAINTEXT gives no options (kafka-python's defaults). SASL_PLAINTEXT / SASL_SSL add the
mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), the user name and the password (from
LEDGER_KAFKA_PASSWORD or read from LEDGER_KAFKA_PASSWORD_FILE); SSL / SASL_SSL add the CA,
certificate and key files (host names are checked). The password is never logged: settings
keep it out of their repr, and these options are handed straight to the client.
"""

from __future__ import annotations

from typing import Any

from ledger.errors import ConfigError
from ledger.settings import Settings


def client_options(settings: Settings) -> dict[str, Any]:
    """kafka-python keyword arguments for the configured security protocol."""
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return {}
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol.startswith("SASL_"):
        options |= {
            "sasl_mechanism": settings.kafka_sasl_mechanism,
            "sasl_plain_username": settings.kafka_username,
            "sasl_plain_password": password(settings),
        }
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_check_hostname"] = True
        for option, path in (
            ("ssl_cafile", settings.kafka_ssl_cafile),
            ("ssl_certfile", settings.kafka_ssl_certfile),
            ("ssl_keyfile", settings.kafka_ssl_keyfile),
        ):
            if path is not None:
                options[option] = str(path)
    return options


def password(settings: Settings) -> str:
    """The SASL password: LEDGER_KAFKA_PASSWORD, or the first line of
    LEDGER_KAFKA_PASSWORD_FILE (a trailing newline is not part of it)."""
    if settings.kafka_password is not None:
        return settings.kafka_password
    path = settings.kafka_password_file
    if path is None:
        raise ConfigError("SASL needs LEDGER_KAFKA_PASSWORD or LEDGER_KAFKA_PASSWORD_FILE")
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise ConfigError(
            f"LEDGER_KAFKA_PASSWORD_FILE={str(path)!r}: cannot read it ({exc.strerror})"
        ) from None
    secret = text.splitlines()[0] if text else ""
    if not secret:
        raise ConfigError(f"LEDGER_KAFKA_PASSWORD_FILE={str(path)!r}: the file is empty")
    return secret
