"""Append-only, self-describing results store in SQLite: one row per finished task.

SQLite rather than JSONL because each row commits atomically (a ``kill -9`` leaves either the
whole row or none, never a torn line), the primary key makes a duplicate task row impossible,
concurrent runs are serialised by SQLite's own locking (a writer waits for another's lock and
never drops a computed batch: see :class:`ResultsStore`), triggers refuse UPDATE and DELETE, and
every open runs SQLite's integrity check, so a damaged file is refused, never read or extended.

Every row is bound to exactly what produced it: the manifest's content hash (which covers the
protocol hash, the data fingerprint, the seed and every task index), the configuration hash
(parameters, backbone and the content hash of every file they point to) and the code
fingerprint (package version and the source of the method and the harness). A row also
describes itself (family, budget, data note, non-default parameters) so reports need nothing
but the store.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeVar

import pandas as pd

from fewshot_bench.atomic import write_text_atomic
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

#: How long a writer waits in total for another process's lock before it stops waiting
#: (``$FSBENCH_LOCK_PATIENCE`` or the ``lock_patience`` argument override it).
LOCK_PATIENCE_S = 600.0
#: Seconds between the notes a waiting writer prints to stderr.
LOCK_NOTE_EVERY_S = 10.0
#: What SQLite itself waits for a lock per attempt; the retry loop around it prints the notes.
_BUSY_TIMEOUT_S = 2.0
#: Computed rows that could not be stored wait in ``<store name>.pending-*.jsonl`` beside it.
PENDING_GLOB = "{name}.pending-*.jsonl"
_FIX = "Point --workdir at a new folder; keep this file if it holds results you need."
_DAMAGED_FIX = (
    "Keep the file (restore it from a backup if you have one) and point --workdir at a new folder."
)
T = TypeVar("T")


def _is_lock(exc: sqlite3.Error) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def _is_damage(exc: BaseException) -> bool:
    text = str(exc)
    return any(s in text for s in ("malformed", "Could not decode", "corrupt"))


def _one_line(text: object, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _patience(value: float | None) -> float:
    if value is None:
        env = os.environ.get("FSBENCH_LOCK_PATIENCE")
        if env is None:
            return LOCK_PATIENCE_S
        try:
            value = float(env)
        except ValueError:
            raise StoreError(
                f"FSBENCH_LOCK_PATIENCE={env!r} is not a number of seconds; unset it or set "
                f"e.g. FSBENCH_LOCK_PATIENCE={LOCK_PATIENCE_S:.0f}"
            ) from None
    if not value >= 0:
        raise StoreError(f"the lock patience must be >= 0 seconds, got {value!r}")
    return float(value)


class StoreError(FsbenchError):
    """The results store cannot be opened or written as asked."""


class _GaveUp(Exception):
    """The lock stayed held for longer than the patience."""


class ResultsStore:
    """The SQLite file at ``path``; safe to share between concurrent processes.

    ``readonly=True`` opens an existing store without creating or changing anything (reports):
    a missing path, an empty or foreign file or a damaged database is a :class:`StoreError`.
    Every open runs SQLite's integrity check, so a damaged store is refused before a row is
    read from it or written to it.

    A computed batch is never thrown away because another process holds the lock: ``append``
    waits with backoff, printing a note to stderr about every ``LOCK_NOTE_EVERY_S`` seconds,
    for up to ``lock_patience`` seconds (default ``$FSBENCH_LOCK_PATIENCE``, else
    ``LOCK_PATIENCE_S``). If the lock is still held then (or the wait is interrupted), the rows
    go to a side file ``<store>.pending-<time>-<pid>.jsonl`` beside the store (JSON Lines, one
    row each, written atomically) and a :class:`StoreError` names it; the next writer that
    opens the store imports such files (duplicates are skipped) and deletes them, so rerunning
    the same command stores the rows and resumes. Waiting forever instead would hang a run
    behind a stuck process with its batch only in memory.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        readonly: bool = False,
        lock_patience: float | None = None,
    ) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.lock_patience = _patience(lock_patience)
        if readonly and not self.path.is_file():
            raise StoreError(self._missing_message())
        if not readonly:
            blocker = next((a for a in self.path.parents if a.exists()), None)
            if blocker is not None and not blocker.is_dir():
                raise StoreError(
                    f"{blocker} is a file, not a folder, so no results store can be created at "
                    f"{self.path}; pass a --workdir folder"
                )
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create the folder {self.path.parent} for the results store "
                    f"({exc.strerror}); pass a --workdir folder you can write"
                ) from None
            if self.path.is_dir():
                raise StoreError(
                    f"{self.path} is a folder, not a results store; move it away or pass "
                    "another --workdir"
                )
        busy = min(_BUSY_TIMEOUT_S, self.lock_patience)
        try:
            if readonly:
                uri = self.path.resolve().as_uri() + "?mode=ro"
                self.conn = sqlite3.connect(uri, uri=True, timeout=busy, isolation_level=None)
            else:
                self.conn = sqlite3.connect(self.path, timeout=busy, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open results store {self.path} ({exc}). {_FIX}") from None
        try:
            self._open()
        except BaseException:
            self.conn.close()
            raise

    def _missing_message(self) -> str:
        folder = self.path.parent
        where = "" if folder.is_dir() else f" (the folder {folder} does not exist)"
        return (
            f"no results store at {self.path}{where}; create one with `fsbench run PROTOCOL "
            f"-m METHOD --workdir {folder}`, or pass the --workdir of an earlier run"
        )

    def _open(self) -> None:
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
        if self.readonly:
            if "results" not in tables:
                empty = " (it is an empty file)" if self.path.stat().st_size == 0 else ""
                raise StoreError(
                    f"{self.path} holds no results table{empty}; fill it with `fsbench run "
                    f"PROTOCOL -m METHOD --workdir {self.path.parent}`, or pass the --workdir "
                    "of an earlier run"
                )
            pending = self.pending_files()
            if pending:
                n = sum(_count_lines(p) for p in pending)
                print(
                    f"fsbench: note: {n} computed rows wait in {len(pending)} side file(s) "
                    f"beside {self.path} (e.g. {pending[0].name}) and are not read here; the "
                    "next `fsbench run` or `fsbench sweep` into this workdir imports them",
                    file=sys.stderr,
                )
            return
        if "results" in tables:  # an existing store: opening it takes no write lock
            self.conn.execute("PRAGMA synchronous=NORMAL")
        else:
            self._retry_locked(self._create_schema, f"create the results table in {self.path}")
        self._import_pending()

    def _inspect(self) -> tuple[set[str], int]:
        try:
            tables = {
                r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if tables:
                problems = [r[0] for r in self.conn.execute("PRAGMA integrity_check(2)")]
                if problems != ["ok"]:
                    detail = "; ".join(problems).replace("*** in database main ***", "")
                    raise StoreError(
                        f"results store {self.path} is damaged (SQLite integrity check: "
                        f"{_one_line(detail, 100)}); nothing was read from or written to it. "
                        f"{_DAMAGED_FIX}"
                    )
        except sqlite3.Error as exc:
            if isinstance(exc, sqlite3.OperationalError) and _is_lock(exc):
                raise
            if _is_damage(exc):
                raise StoreError(
                    f"results store {self.path} is damaged ({_one_line(exc, 80)}); nothing "
                    f"was read from or written to it. {_DAMAGED_FIX}"
                ) from None
            raise StoreError(
                f"results store {self.path} is not a readable SQLite database ({exc}). {_FIX}"
            ) from None
        return tables, int(version)

    def _create_schema(self) -> None:
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(SCHEMA)
        except sqlite3.Error as exc:
            if isinstance(exc, sqlite3.OperationalError) and _is_lock(exc):
                raise
            raise StoreError(
                f"results store {self.path} cannot be written ({exc}). {_FIX}"
            ) from None

    def _wait_locked(self, action: Callable[[], T], what: str) -> T:
        """Run ``action``, waiting with backoff while another process holds the database lock
        (a note on stderr about every ``LOCK_NOTE_EVERY_S`` s); :class:`_GaveUp` after
        ``lock_patience`` seconds. Other SQLite errors become a :class:`StoreError`."""
        start = time.monotonic()
        deadline, pause, next_note = start + self.lock_patience, 0.05, start
        while True:
            try:
                return action()
            except (sqlite3.Error, pd.errors.DatabaseError) as exc:
                # pandas wraps the sqlite3 error it met
                err = exc.__cause__ if isinstance(exc.__cause__, sqlite3.Error) else exc
                if not (isinstance(err, sqlite3.OperationalError) and _is_lock(err)):
                    if _is_damage(err):
                        raise StoreError(
                            f"cannot {what}: the store is damaged ({_one_line(err, 80)}). "
                            f"{_DAMAGED_FIX}"
                        ) from None
                    raise StoreError(f"cannot {what}: {_one_line(err)}") from None
            now = time.monotonic()
            if now >= deadline:
                raise _GaveUp
            if now >= next_note:
                print(
                    f"fsbench: note: another process holds the lock on {self.path}; waiting to "
                    f"{what} ({now - start:.0f} s so far, at most {self.lock_patience:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                next_note = now + LOCK_NOTE_EVERY_S
            time.sleep(min(pause, max(deadline - now, 0.0)))
            pause = min(2 * pause, 1.0)

    def _retry_locked(self, action: Callable[[], T], what: str) -> T:
        """``action`` under :meth:`_wait_locked`; giving up is a :class:`StoreError`."""
        try:
            return self._wait_locked(action, what)
        except _GaveUp:
            raise StoreError(
                f"cannot {what}: another process held its lock for over "
                f"{self.lock_patience:.0f} s. Stop the other writer (or wait for it) and rerun "
                "the same command to resume."
            ) from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pending_files(self) -> list[Path]:
        """Side files of computed rows that waited for a lock too long, oldest first."""
        pattern = PENDING_GLOB.format(name=self.path.name)
        return sorted(self.path.parent.glob(pattern))

    def _insert(self, values: list[tuple]) -> int:
        placeholders = ", ".join("?" for _ in COLUMNS)
        sql = f"INSERT OR IGNORE INTO results ({', '.join(COLUMNS)}) VALUES ({placeholders})"
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            before = self.conn.total_changes
            self.conn.executemany(sql, values)
            return self.conn.total_changes - before

    def append(self, rows: Iterable[ResultRow]) -> int:
        """Insert rows in one transaction; rows already present (same key) are skipped.

        While another process holds the lock this waits (see the class docstring); rows it
        cannot store in time are saved to a side file that the next writer imports, and the
        :class:`StoreError` raised names it.
        """
        values = [tuple(getattr(r, c) for c in COLUMNS) for r in rows]
        if not values:
            return 0
        what = f"store {len(values)} computed rows in {self.path}"
        try:
            return self._wait_locked(lambda: self._insert(values), what)
        except _GaveUp:
            side = self._save_pending(values)
            raise StoreError(
                f"cannot {what}: another process held its lock for over "
                f"{self.lock_patience:.0f} s. The rows are saved in {side}; the next run into "
                f"{self.path.parent} imports them: stop or wait for the other writer, then "
                "rerun the same command to store them and resume."
            ) from None
        except KeyboardInterrupt:
            side = self._save_pending(values)
            print(
                f"fsbench: note: {len(values)} computed rows saved in {side}; the next run into "
                f"{self.path.parent} imports them",
                file=sys.stderr,
            )
            raise

    def _save_pending(self, values: list[tuple]) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        side = self.path.with_name(f"{self.path.name}.pending-{stamp}-{os.getpid()}.jsonl")
        n = 1
        while side.exists():
            side = side.with_name(f"{self.path.name}.pending-{stamp}-{os.getpid()}-{n}.jsonl")
            n += 1
        lines = [json.dumps(dict(zip(COLUMNS, v, strict=True))) for v in values]
        write_text_atomic(side, "\n".join(lines) + "\n")
        return side

    def _import_pending(self) -> None:
        for side in self.pending_files():
            try:
                text = side.read_text(encoding="utf-8")
            except FileNotFoundError:  # another writer imported it meanwhile
                continue
            try:
                values = [_pending_values(line) for line in text.splitlines() if line.strip()]
            except (ValueError, TypeError, KeyError) as exc:
                raise StoreError(
                    f"{side} is not a side file of computed rows this fewshot-bench can import "
                    f"({_one_line(exc, 80)}); move it out of {side.parent} and rerun"
                ) from None
            added = self._retry_locked(
                lambda values=values: self._insert(values),
                f"import {len(values)} computed rows from {side.name} into {self.path}",
            )
            side.unlink(missing_ok=True)
            print(
                f"fsbench: note: imported {added} computed rows into {self.path} from {side.name} "
                f"(saved when the store was locked; {len(values) - added} were already stored)",
                file=sys.stderr,
            )

    def stored_accuracies(self, key: dict[str, object]) -> dict[int, float]:
        """``{task_index: accuracy}`` of the stored rows whose every ``KEY`` column but
        ``task_index`` matches ``key``."""
        missing = set(ENTRY_KEY) - set(key)
        if missing:
            raise ValueError(f"a row key needs {sorted(missing)}")
        where = " AND ".join(f"{c}=?" for c in ENTRY_KEY)
        sql = f"SELECT task_index, accuracy FROM results WHERE {where}"
        params = [key[c] for c in ENTRY_KEY]
        return self._retry_locked(
            lambda: dict(self.conn.execute(sql, params).fetchall()), f"read {self.path}"
        )

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
        query += " ORDER BY protocol, method, seed, task_index"
        return self._retry_locked(
            lambda: pd.read_sql_query(query, self.conn, params=params), f"read {self.path}"
        )


def load_results(path: str | Path, protocols: list[str] | None = None) -> pd.DataFrame:
    """Read a results store (never creating one) into a DataFrame; ``protocols`` may name
    protocols or families."""
    with ResultsStore(path, readonly=True) as store:
        return store.dataframe(protocols)


def config_json(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _pending_values(line: str) -> tuple:
    """One side-file line as the row's values in ``COLUMNS`` order."""
    row = json.loads(line)
    if not isinstance(row, dict) or set(row) != set(COLUMNS):
        raise ValueError("a line is not one result row")
    return tuple(row[c] for c in COLUMNS)


def _count_lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except OSError:
        return 0
