"""Secrets never reach a terminal or a log: the one redaction helper.

`redact(text)` replaces the password of every URL with credentials (`scheme://user:PASSWORD@`)
and every `password=...` (libpq key/value connection strings, URL query parameters) with
`***`. Everything that prints or logs a DSN, a settings value or an exception message goes
through it: the CLI's output and error lines, the settings errors, `ledger.db`'s errors and
every log line (`ledger.log` redacts each rendered line).
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://user:password@  (the password stops at @, whitespace or a quote)
_URL_PASSWORD = re.compile(r"""([A-Za-z][A-Za-z0-9+.\-]*://[^:@/\s"']*):[^@\s"']*@""")
# password=secret, password = 'two words', ?password=secret&...
_KEY_PASSWORD = re.compile(
    r"""(\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s&'";,]+)""", re.IGNORECASE
)


def redact(text: str) -> str:
    """`text` with every password in it replaced by `***`."""
    text = _URL_PASSWORD.sub(rf"\1:{MASK}@", text)
    return _KEY_PASSWORD.sub(rf"\g<1>{MASK}", text)
