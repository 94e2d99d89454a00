"""Logging set-up, done once at start-up: JSON when stderr is not a terminal, console when it is.

The ledger's own events are structlog events. The client libraries (kafka-python, psycopg,
psycopg.pool) log through the standard library; their records are rendered by the same
structlog renderer (`structlog.stdlib.ProcessorFormatter`), at WARNING (ERROR when
`LEDGER_LOG_LEVEL=ERROR`), without tracebacks (the exception's class and message go in the
`error` field), and a message a library repeats while a dependency is down is printed once
per `LIBRARY_REPEAT_S` per kind (logger, level, message template), the next one carrying
`repeated=N` for the ones held back. `LEDGER_LOG_LEVEL=DEBUG` shows every library record,
with its traceback. Tracebacks are plain text (no `rich` frames with local variables).
Every rendered line has its passwords redacted (`ledger.redact`).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from ledger.redact import redact
from ledger.settings import Settings

LIBRARY_LOGGERS = ("kafka", "psycopg", "psycopg.pool")
LIBRARY_REPEAT_S = 5.0
_MAX_ERROR_CHARS = 300

_configured = False


def describe_error(exc: BaseException) -> str:
    """`ErrorClass: message` on one line (whitespace collapsed, long messages cut)."""
    name = type(exc).__name__
    text = " ".join(str(exc).split())
    if text == name or text.startswith(f"{name}:"):  # kafka-python's errors name themselves
        text = text[len(name) :].lstrip(": ")
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 3] + "..."
    return f"{name}: {text}" if text else name


class RepeatFilter(logging.Filter):
    """A handler filter for library records.

    With `window_s` > 0, the first record of each kind (logger name, level, message
    template) passes, then at most one per `window_s`; the one that passes after a quiet
    spell carries `repeated=N`, the number held back. Unless `keep_tracebacks`, a record's
    exception is reduced to its one-line description in `error`."""

    _MAX_KINDS = 1000

    def __init__(
        self,
        window_s: float = LIBRARY_REPEAT_S,
        *,
        keep_tracebacks: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        self.window_s = window_s
        self.keep_tracebacks = keep_tracebacks
        self.clock = clock
        self._kinds: dict[tuple[str, int, str], list] = {}  # kind -> [last shown, held back]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not self.keep_tracebacks:
            exc = record.exc_info[1]
            if exc is not None:
                record.error = describe_error(exc)
            record.exc_info = None
            record.exc_text = None
        if self.window_s <= 0:
            return True
        kind = (record.name, record.levelno, str(record.msg))
        with self._lock:
            now = self.clock()
            seen = self._kinds.get(kind)
            if seen is not None and now - seen[0] < self.window_s:
                seen[1] += 1
                return False
            if len(self._kinds) >= self._MAX_KINDS:
                self._kinds.clear()
            self._kinds[kind] = [now, 0]
        if seen is not None and seen[1]:
            record.repeated = seen[1]
        return True


_SECRET_NAME = re.compile(r"password|secret", re.I)
MASK = "********"


class SecretFilter(logging.Filter):
    """A handler filter for library records: values under a key that names a password or a
    secret in a mapping the record formats (kafka-python logs a client's whole configuration
    at DEBUG, SASL password included) are replaced by a mask before anything is rendered."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, dict):
            record.args = _masked(record.args)
        elif isinstance(record.args, tuple):
            record.args = tuple(_masked(a) if isinstance(a, dict) else a for a in record.args)
        return True


def _masked(mapping: dict) -> dict:
    return {
        k: MASK if isinstance(k, str) and _SECRET_NAME.search(k) and v is not None else v
        for k, v in mapping.items()
    }


def _renderer(fmt: str) -> structlog.typing.Processor:
    """The line renderer; every rendered line (fields, error messages, tracebacks) has its
    passwords redacted (`ledger.redact`), so no DSN or credential reaches a log."""
    if fmt == "console":
        render = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    else:
        render = structlog.processors.JSONRenderer(sort_keys=False)

    def redacted(logger: Any, name: str, event: Any) -> str:
        return redact(render(logger, name, event))

    return redacted


def configure_logging(
    settings: Settings, *, force: bool = False, cache_loggers: bool = True
) -> None:
    """Configure structlog and route the standard library's loggers through it. Once per
    process (again with `force`); `cache_loggers=False` keeps structlog reconfigurable
    afterwards (tests that restore the previous configuration)."""
    global _configured
    if _configured and not force:
        return
    fmt = settings.log_format
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    level = logging.getLevelName(settings.log_level.upper())
    exceptions = (
        structlog.processors.format_exc_info if fmt == "json" else structlog.dev.set_exc_info
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.StackInfoRenderer(),
            exceptions,
            _renderer(fmt),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=cache_loggers,
    )
    _route_library_logs(fmt, level, timestamper)
    _configured = True


def _route_library_logs(fmt: str, level: int, timestamper: structlog.typing.Processor) -> None:
    """Standard-library records (kafka-python, psycopg) through the structlog renderer."""
    library_level = logging.DEBUG if level <= logging.DEBUG else max(level, logging.WARNING)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
            structlog.stdlib.ExtraAdder(allow=("error", "repeated")),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *([structlog.processors.format_exc_info] if fmt == "json" else []),
            _renderer(fmt),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    debug = library_level <= logging.DEBUG
    handler.addFilter(SecretFilter())
    handler.addFilter(RepeatFilter(0 if debug else LIBRARY_REPEAT_S, keep_tracebacks=debug))
    handler._ledger_handler = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_ledger_handler", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(library_level)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(library_level)
