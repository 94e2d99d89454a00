"""Avro schemas of the billing events (package data; loaded by `ledger.codec`)."""
