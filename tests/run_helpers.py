"""What the runner tests share: a quiet run into a results store, and a row count of a store
that another process may be writing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fewshot_bench.run.runner import run_protocol
from fewshot_bench.run.store import ResultsStore


def run_quietly(proto, specs, workdir: Path, store: Path | None = None, **kwargs) -> list:
    """``run_protocol`` of ``specs`` on ``proto`` into ``store`` (default
    ``WORKDIR/results.sqlite``), without progress bars; its summaries, one per method and seed."""
    with ResultsStore(store or workdir / "results.sqlite") as s:
        return run_protocol(proto, specs, s, workdir=workdir, progress=False, **kwargs)


def count_rows(db: Path) -> int:
    """Rows stored so far (0 while the store or its table does not exist yet)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=30) as c:
            return c.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
