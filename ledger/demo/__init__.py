"""`ledger demo`: the whole ledger on a fresh machine, with a simulated month of traffic.

    1. the local stack (or LEDGER_KAFKA_BOOTSTRAP / LEDGER_DATABASE_URL), a fresh topic prefix
       `demo-<run>.`, a fresh database `demo_<run>` (migrated) and consumer group per run;
    2. `ledger worker --role ledger --role projections --role relay` as a real subprocess (logs
       in `<home>/demo-worker.log`). No scheduler role: the wall clock has no say here, the
       demo is the clock;
    3. a downstream reader of the status topic that prints every output event it receives;
    4. `simulate()`: ~`accounts` accounts over March 2026 (event clock), produced to Kafka in
       occurred_at order, with a PeriodTick on every partition at each simulated midnight of
       March, one just after the month turns (limit suspensions lifted) and one once the grace
       period after March is over (March closed: invoices issued). Before each tick the demo
       waits until everything sent before it is journaled, so the ticks land in the journal
       where they belong in time (grants expire after the usage that came before them);
    5. progress until the journal, the projection, the outbox and the reader have caught up;
    6. SIGTERM to the worker (it must exit 0), then `summarise()`: a reconciliation of the
       journal against what the simulator sent, invoices against receivables, and the trial
       balance (must be zero).

Exit code 0 on success, 1 if anything failed or does not reconcile, 130 on Ctrl-C. This package
prints to stdout (it is a CLI program), like `ledger/cli.py`.

Its modules: `month` (March 2026 and its ticks), `traffic_mix` (models, personas, shares),
`account_state` and `account` (one simulated account), `expected` (what the ledger must show),
`simulation` (the month's events), `status_reader` (the downstream reader), `summary` (the
reconciliation), `render` (the tables and next steps), `worker_process` (the demo's worker) and
`orchestration` (the run itself).
"""

from ledger.demo.expected import Expected
from ledger.demo.month import MONTH, MONTH_END, MONTH_START, tick_times
from ledger.demo.orchestration import run, run_demo
from ledger.demo.simulation import Simulation, simulate
from ledger.demo.status_reader import StatusReader
from ledger.demo.summary import DemoResult, DemoSummary, summarise

__all__ = [
    "MONTH",
    "MONTH_END",
    "MONTH_START",
    "DemoResult",
    "DemoSummary",
    "Expected",
    "Simulation",
    "StatusReader",
    "run",
    "run_demo",
    "simulate",
    "summarise",
    "tick_times",
]
