"""`python -m ledger.bench`: see `ledger.bench`. Exit code 1 when a phase fails."""

import sys

from ledger.bench.cli import main
from ledger.bench.report import say
from ledger.errors import LedgerError

if __name__ == "__main__":
    try:
        sys.exit(main())
    except LedgerError as exc:
        say(f"bench: {exc}", file=sys.stderr)
        sys.exit(1)
