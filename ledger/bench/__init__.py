"""Throughput benchmark: how fast the ledger drains Kafka into PostgreSQL, against raw Kafka.

    python -m ledger.bench [--events N] [--partitions P] [--accounts A] [--keep] [--profile]

1. Brings up the local stack (or uses LEDGER_KAFKA_BOOTSTRAP / LEDGER_DATABASE_URL), creates
   fresh topics (prefix `bench-<ts>.`, P partitions) and a fresh, migrated database.
2. Pre-produces A AccountOpened events, PaymentMethodAdded for a share of the accounts, then N
   UsageRecorded events (skewed over the accounts, several products and priced models).
3. Times (a) raw kafka-python consumption of the input topics, (b) the same plus Avro decoding,
   (c) the ledger role as a real `ledger worker --role ledger` process draining everything into
   the journal, (d) the projection role draining the journal into account_status; then the
   storage the journal takes, (j) `ledger verify` as its own process, (g) rebuild, (h) replay,
   (i) scale-out over 1, 2, 4 ledger processes and (f) suspension latency under load.
   With --py-spy, py-spy samples the (c) and (d) workers (`ledger.bench.samples`).
   With --profile, also (e) LedgerWriter.write_batch in-process (no Kafka) on fresh databases:
   once with its steps wrapped in timers, once under cProfile (`<home>/bench-<ts>.prof`).
4. Prints a table and writes it as JSON to `<home>/bench-<ts>.json`. Each phase also reports
   the average cores used by the worker, PostgreSQL, the broker, this script and "other"
   processes: on a shared machine, "other" says how far to trust the rates.
5. Drops the database(s) and deletes the topics (unless --keep). The local stack
   itself is left running (`ledger stack down` stops it).

Rates "after warm-up" count from the first journaled row (or first record), so they leave out
process start-up, connecting and taking the shard leases.
"""

from ledger.errors import LedgerError


class BenchError(LedgerError):
    """The benchmark could not complete a phase."""
