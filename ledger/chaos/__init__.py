"""Seeded fault injection against real services: `make chaos`, `python -m ledger.chaos`."""
