"""The read-only web console (`ledger console`)."""
