"""Append-only results store in SQLite: one row per finished task.

SQLite rather than JSONL because each row commits atomically (a ``kill -9`` leaves either the
whole row or none, never a torn line), the primary key makes a duplicate task row impossible,
concurrent runs are serialised by SQLite's own locking, and triggers refuse UPDATE and DELETE.
``fsbench results --export`` writes CSV/JSONL for other tools.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from fewshot_bench.errors import FsbenchError

COLUMNS = [
    "protocol",
    "protocol_hash",
    "method",
    "config_hash",
    "setting",
    "backbone",
    "seed",
    "task_index",
    "accuracy",
    "top5",
    "n_query",
    "seconds",
    "device",
    "x_value",
    "x_label",
    "config",
    "timestamp",
]
KEY = ["protocol", "protocol_hash", "method", "config_hash", "backbone", "seed", "task_index"]

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS results (
    protocol TEXT NOT NULL, protocol_hash TEXT NOT NULL, method TEXT NOT NULL,
    config_hash TEXT NOT NULL, setting TEXT NOT NULL, backbone TEXT NOT NULL,
    seed INTEGER NOT NULL, task_index INTEGER NOT NULL,
    accuracy REAL NOT NULL, top5 REAL, n_query INTEGER NOT NULL, seconds REAL NOT NULL,
    device TEXT NOT NULL, x_value REAL, x_label TEXT, config TEXT NOT NULL, timestamp TEXT NOT NULL,
    PRIMARY KEY ({", ".join(KEY)})
);
CREATE TRIGGER IF NOT EXISTS results_no_update BEFORE UPDATE ON results
BEGIN SELECT RAISE(ABORT, 'the results store is append-only'); END;
CREATE TRIGGER IF NOT EXISTS results_no_delete BEFORE DELETE ON results
BEGIN SELECT RAISE(ABORT, 'the results store is append-only'); END;
"""


@dataclass(frozen=True)
class ResultRow:
    """One finished task."""

    protocol: str
    protocol_hash: str
    method: str
    config_hash: str
    setting: str
    backbone: str
    seed: int
    task_index: int
    accuracy: float
    top5: float | None
    n_query: int
    seconds: float
    device: str
    x_value: float | None
    x_label: str
    config: str
    timestamp: str


class ResultsStore:
    """The SQLite file at ``path``; safe to share between concurrent processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path, timeout=120, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise FsbenchError(
                f"results store {self.path} is not a readable SQLite database ({exc}). "
                "Point --workdir elsewhere; do not delete it if it holds results you need."
            ) from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(self, rows: Iterable[ResultRow]) -> int:
        """Insert rows in one transaction; rows already present (same key) are skipped. Returns count added."""
        values = [tuple(asdict(r)[c] for c in COLUMNS) for r in rows]
        if not values:
            return 0
        placeholders = ", ".join("?" for _ in COLUMNS)
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            before = self.conn.total_changes
            self.conn.executemany(
                f"INSERT OR IGNORE INTO results ({', '.join(COLUMNS)}) VALUES ({placeholders})",
                values,
            )
            return self.conn.total_changes - before

    def done_tasks(
        self,
        protocol: str,
        protocol_hash: str,
        method: str,
        config_hash: str,
        backbone: str,
        seed: int,
    ) -> set[int]:
        """Task indices already stored for this (protocol, method configuration, seed)."""
        cur = self.conn.execute(
            "SELECT task_index FROM results WHERE protocol=? AND protocol_hash=? AND method=? "
            "AND config_hash=? AND backbone=? AND seed=?",
            (protocol, protocol_hash, method, config_hash, backbone, seed),
        )
        return {r[0] for r in cur.fetchall()}

    def dataframe(self, protocols: list[str] | None = None) -> pd.DataFrame:
        """All rows (optionally of some protocols) as a DataFrame with the store's columns."""
        query = f"SELECT {', '.join(COLUMNS)} FROM results"
        params: list = []
        if protocols:
            query += f" WHERE protocol IN ({', '.join('?' for _ in protocols)})"
            params = list(protocols)
        df = pd.read_sql_query(
            query + " ORDER BY protocol, method, seed, task_index", self.conn, params=params
        )
        return df


def load_results(path: str | Path, protocols: list[str] | None = None) -> pd.DataFrame:
    """Read a results store into a DataFrame (empty frame with the columns if it has no rows)."""
    path = Path(path)
    if not path.exists():
        raise FsbenchError(f"no results store at {path}; run `fsbench run` first or pass --workdir")
    with ResultsStore(path) as store:
        return store.dataframe(protocols)


def config_json(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)
