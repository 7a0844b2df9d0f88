"""Append-only, self-describing results store in SQLite: one row per finished task.

SQLite rather than JSONL because each row commits atomically (a ``kill -9`` leaves either the
whole row or none, never a torn line), the primary key makes a duplicate task row impossible,
concurrent runs are serialised by SQLite's own locking, and triggers refuse UPDATE and DELETE.

Every row is bound to exactly what produced it: the manifest's content hash (which covers the
protocol hash, the data fingerprint, the seed and every task index), the configuration hash
(parameters, backbone and the content hash of every file they point to) and the code
fingerprint (package version and the source of the method and the harness). A row also
describes itself (family, budget, data note, non-default parameters) so reports need nothing
but the store.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeVar

import pandas as pd

from fewshot_bench.errors import FsbenchError

SCHEMA_VERSION = 2


@dataclass(frozen=True)
class ResultRow:
    """One finished task, with the provenance that binds it to its tasks, code and weights."""

    protocol: str
    family: str
    protocol_hash: str
    manifest_hash: str  # content hash of the manifest (header + arrays) the task came from
    task_source: str  # "sampled" or "imported:<file name>:sha256=<hash of the file>"
    data_fingerprint: str
    data_note: str  # e.g. "JPEG copy of CIFAR-10"; "" when there is nothing to say
    method: str
    config_hash: str
    code_fingerprint: str
    params: str  # JSON: the parameters that differ from the method's defaults, as run
    config: str  # JSON: the full configuration that config_hash covers
    setting: str  # what the runner gave the method: inductive / transductive / semi-supervised
    backbone: str
    backbone_hash: str  # content hash of a checkpoint backbone ("" for pixels / images)
    budget: int | None
    seed: int
    task_index: int
    accuracy: float
    top5: float | None
    n_query: int
    seconds: float
    device: str
    hardware: str
    x_value: float | None
    x_label: str
    package_version: str
    git_commit: str
    timestamp: str


COLUMNS = [f.name for f in fields(ResultRow)]
KEY = [
    "protocol",
    "manifest_hash",
    "method",
    "config_hash",
    "code_fingerprint",
    "backbone",
    "seed",
    "task_index",
]
#: The key of one method configuration on one task set: every ``KEY`` column but the task.
ENTRY_KEY = [c for c in KEY if c != "task_index"]
_SQL_TYPES = {"int": "INTEGER", "float": "REAL", "str": "TEXT"}


def _column_sql(f) -> str:
    base, _, optional = str(f.type).partition(" | ")
    sql = _SQL_TYPES[base]
    return f"{f.name} {sql}" + ("" if optional else " NOT NULL")


SCHEMA = f"""
CREATE TABLE IF NOT EXISTS results (
    {", ".join(_column_sql(f) for f in fields(ResultRow))},
    PRIMARY KEY ({", ".join(KEY)})
);
CREATE TRIGGER IF NOT EXISTS results_no_update BEFORE UPDATE ON results
BEGIN SELECT RAISE(ABORT, 'the results store is append-only'); END;
CREATE TRIGGER IF NOT EXISTS results_no_delete BEFORE DELETE ON results
BEGIN SELECT RAISE(ABORT, 'the results store is append-only'); END;
PRAGMA user_version = {SCHEMA_VERSION};
"""

#: How long a writer waits in total for another process's lock before giving up.
LOCK_PATIENCE_S = 600.0
_FIX = "Point --workdir at a new folder; keep this file if it holds results you need."
T = TypeVar("T")


def _is_lock(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


class StoreError(FsbenchError):
    """The results store cannot be opened or written as asked."""


class ResultsStore:
    """The SQLite file at ``path``; safe to share between concurrent processes.

    ``readonly=True`` opens an existing store without creating or changing anything (reports).
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if readonly and not self.path.is_file():
            raise StoreError(
                f"no results store at {self.path}; run `fsbench run` first or pass --workdir"
            )
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if readonly:
                uri = f"file:{self.path.resolve()}?mode=ro"
                self.conn = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
            else:
                self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open results store {self.path} ({exc}). {_FIX}") from None
        tables, version = self._retry_locked(self._inspect, f"read {self.path}")
        if tables and "results" not in tables:
            raise StoreError(
                f"{self.path} is an SQLite database of another program (tables "
                f"{sorted(tables)}), not a fewshot-bench results store. {_FIX}"
            )
        if "results" in tables and version != SCHEMA_VERSION:
            raise StoreError(
                f"results store {self.path} has schema version {version}, this fewshot-bench "
                f"writes version {SCHEMA_VERSION}: its rows are not bound to the manifests, code "
                "and weights that produced them, so they cannot be verified or resumed. Keep it "
                "for reference, and rerun into a new --workdir."
            )
        if readonly:
            if "results" not in tables:
                raise StoreError(f"{self.path} holds no results table; run `fsbench run` first")
            return
        self._retry_locked(self._create_schema, f"create the results table in {self.path}")

    def _inspect(self) -> tuple[set[str], int]:
        try:
            tables = {
                r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if _is_lock(exc):
                raise
            raise StoreError(
                f"results store {self.path} is not a readable SQLite database ({exc}). {_FIX}"
            ) from None
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"results store {self.path} is not a readable SQLite database ({exc}). {_FIX}"
            ) from None
        return tables, int(version)

    def _create_schema(self) -> None:
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(SCHEMA)
        except sqlite3.OperationalError as exc:
            if _is_lock(exc):
                raise
            raise StoreError(
                f"results store {self.path} cannot be written ({exc}). {_FIX}"
            ) from None
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"results store {self.path} cannot be written ({exc}). {_FIX}"
            ) from None

    def _retry_locked(self, action: Callable[[], T], what: str) -> T:
        """Run ``action``, waiting with backoff (up to ``LOCK_PATIENCE_S``) while another
        process holds the database lock."""
        deadline, pause = time.monotonic() + LOCK_PATIENCE_S, 0.05
        while True:
            try:
                return action()
            except sqlite3.OperationalError as exc:
                if not _is_lock(exc):
                    raise StoreError(f"cannot {what}: {exc}") from None
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"cannot {what}: it stayed locked by another process for over "
                        f"{LOCK_PATIENCE_S:.0f} s. Stop the other writer and rerun the same "
                        "command to resume."
                    ) from None
                time.sleep(pause)
                pause = min(2 * pause, 5.0)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(self, rows: Iterable[ResultRow]) -> int:
        """Insert rows in one transaction; rows already present (same key) are skipped.

        Waits for another writer's lock with backoff, so a computed batch is not thrown away
        because a concurrent run is committing.
        """
        values = [tuple(getattr(r, c) for c in COLUMNS) for r in rows]
        if not values:
            return 0
        placeholders = ", ".join("?" for _ in COLUMNS)
        sql = f"INSERT OR IGNORE INTO results ({', '.join(COLUMNS)}) VALUES ({placeholders})"

        def insert() -> int:
            with self.conn:
                self.conn.execute("BEGIN IMMEDIATE")
                before = self.conn.total_changes
                self.conn.executemany(sql, values)
                return self.conn.total_changes - before

        return self._retry_locked(insert, f"store {len(values)} computed rows in {self.path}")

    def stored_accuracies(self, key: dict[str, object]) -> dict[int, float]:
        """``{task_index: accuracy}`` of the stored rows whose every ``KEY`` column but
        ``task_index`` matches ``key``."""
        missing = set(ENTRY_KEY) - set(key)
        if missing:
            raise ValueError(f"a row key needs {sorted(missing)}")
        where = " AND ".join(f"{c}=?" for c in ENTRY_KEY)
        cur = self.conn.execute(
            f"SELECT task_index, accuracy FROM results WHERE {where}", [key[c] for c in ENTRY_KEY]
        )
        return dict(cur.fetchall())

    def done_tasks(self, key: dict[str, object]) -> set[int]:
        """Task indices already stored under ``key`` (see :meth:`stored_accuracies`)."""
        return set(self.stored_accuracies(key))

    def dataframe(self, protocols: list[str] | None = None) -> pd.DataFrame:
        """All rows (optionally of some protocols or families) as a DataFrame."""
        query = f"SELECT {', '.join(COLUMNS)} FROM results"
        params: list = []
        if protocols:
            marks = ", ".join("?" for _ in protocols)
            query += f" WHERE protocol IN ({marks}) OR family IN ({marks})"
            params = list(protocols) * 2
        return pd.read_sql_query(
            query + " ORDER BY protocol, method, seed, task_index", self.conn, params=params
        )


def load_results(path: str | Path, protocols: list[str] | None = None) -> pd.DataFrame:
    """Read a results store (never creating one) into a DataFrame; ``protocols`` may name
    protocols or families."""
    with ResultsStore(path, readonly=True) as store:
        return store.dataframe(protocols)


def config_json(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)
