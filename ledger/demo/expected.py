"""What the ledger must show for the simulated traffic."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

ZERO = Decimal(0)


@dataclasses.dataclass
class Expected:
    """What the ledger must show for the simulated traffic, computed with the same price book
    (order-independent totals only), and what bounds the rest."""

    revenue: Decimal = ZERO  # sum of priced usage charges
    promotional: Decimal = ZERO  # sign-up credits + goodwill and promotional grants − revoked
    cash: Decimal = ZERO  # credit purchases + paid invoices
    unpriced: int = 0  # usage entries journaled as unpriced
    rejected: int = 0  # events the ledger must refuse (meter glitches)
    expiring: Decimal = ZERO  # promotional grants that expire in March: breakage ≤ this
    expiring_grants: int = 0  # GrantExpired entries ≤ this (one per grant with money left)
    revoked: int = 0  # CreditRevoked events
    # Estimates in the simulator's own (occurred_at) order; the ledger applies events in its
    # journal order, which can differ slightly across topics, so these are not checked.
    breakage: Decimal = ZERO
    limit_reached: int = 0  # accounts that reached their monthly spend limit
    # Accounts whose March spend reaches their limit as it stands at the end of March: in any
    # order, the ledger suspends these for SPEND_LIMIT_REACHED at some point in March.
    limit_certain: int = 0
