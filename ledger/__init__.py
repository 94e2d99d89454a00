"""Event-sourced, double-entry billing ledger."""
