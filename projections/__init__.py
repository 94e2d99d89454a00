"""Projection workers: per-account state derived from the journal."""
