"""Money: exact decimals only. The ledger's scale, rounding to it, printing, and parsing
amounts from configuration files (the price book, the policy)."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

SCALE = Decimal("0.000000001")  # 9 places: the journal's numeric(38, 9)


def quantize(amount: Decimal) -> Decimal:
    """Round half-even to the ledger's 9 places."""
    return amount.quantize(SCALE, rounding=ROUND_HALF_EVEN)


def plain(amount: Decimal) -> str:
    """Plain notation, never exponent form: Decimal("0E-9") prints as "0.000000000"."""
    return format(Decimal(amount), "f")


def parse_money(value: object, where: str) -> Decimal:
    """A non-negative amount written as a quoted decimal string (never a float literal)."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: money must be a quoted decimal string, got {value!r}")
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise ValueError(f"{where}: not a decimal: {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{where}: must be a non-negative decimal, got {value!r}")
    return amount
