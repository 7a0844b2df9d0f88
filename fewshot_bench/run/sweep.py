"""Sweeps: a grid of protocols × methods × seeds × backbones, run through one executor.

A sweep file (TOML)::

    name = "omniglot-features"            # optional; default: the file name without .toml
    protocols = ["omniglot-5w1s", "omniglot-semi-5w1s"]   # names, families or .toml paths
    methods = [
        "nearest-prototype",
        "logistic-regression:l2=0.01",
        { spec = "diffusion:k=20", num_cpus = 1 },
        { spec = "protonet", num_gpus = 1, memory = "8GB" },
    ]
    seeds = [0, 1]                        # optional; default: each protocol's [run] seeds
    backbones = ["pixels"]                # optional; default: each protocol's backbone

    [run]                                 # all optional, as the `fsbench run` flags
    workdir = "runs"
    data_root = "/data"
    download = false
    device = "auto"
    max_tasks = 100
    batch_size = 64
    budget = 1000
    plugins = ["my_methods.py"]

    [executor]                            # optional; default: serial
    kind = "ray"                          # serial | processes | ray
    address = "auto"                      # ray: auto, HOST:PORT; absent = a local Ray instance
    jobs = 4                              # processes: worker processes; ray: actors per method

Paths are relative to the folder ``fsbench`` runs in, as on the command line. ``num_cpus``,
``num_gpus`` and ``memory`` are what one Ray worker of that method reserves (ignored by the
serial and processes executors, which run on this machine with ``[run] device``).

One cell is (protocol, method, backbone, seed). When a sweep starts, the driver resolves every
cell (it materialises the manifests and asks a worker for each method's configuration) and
writes them to ``<workdir>/sweeps/<name>.json``; ``fsbench sweep --status`` reads that file and
the results store, read-only, so it can run in another shell while the sweep runs.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fewshot_bench.atomic import write_text_atomic
from fewshot_bench.choices import EXECUTORS
from fewshot_bench.errors import FsbenchError
from fewshot_bench.run.executor import MethodSpec
from fewshot_bench.run.ray_executor import Resources, parse_memory
from fewshot_bench.run.store import ENTRY_KEY

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Cell", "Sweep", "SweepMethod", "load_sweep", "run_sweep", "sweep_status"]

TOP_KEYS = {"name", "protocols", "methods", "seeds", "backbones", "run", "executor"}
RUN_KEYS = {
    "workdir",
    "data_root",
    "download",
    "device",
    "max_tasks",
    "batch_size",
    "budget",
    "plugins",
}
EXECUTOR_KEYS = {"kind", "address", "jobs"}
METHOD_KEYS = {"spec", "num_cpus", "num_gpus", "memory"}


@dataclass(frozen=True)
class SweepMethod:
    text: str  # as written in the sweep file: the cell's label
    spec: MethodSpec
    resources: Resources


@dataclass
class Sweep:
    path: Path
    name: str
    protocols: list[str]
    methods: list[SweepMethod]
    seeds: list[int] | None = None
    backbones: list[str | None] = field(default_factory=lambda: [None])
    workdir: Path = Path("runs")
    data_root: str | None = None
    download: bool = False
    device: str = "auto"
    max_tasks: int | None = None
    batch_size: int = 64
    budget: int | None = None
    plugins: tuple[str, ...] = ()
    executor: str = "serial"
    address: str | None = None
    jobs: int | None = None
    content_hash: str = ""

    @property
    def plan_path(self) -> Path:
        """Where the driver writes the resolved cells (read by ``--status``)."""
        return self.workdir / "sweeps" / f"{self.name}.json"

    @property
    def store_path(self) -> Path:
        return self.workdir / "results.sqlite"

    def resources_of(self, spec: MethodSpec) -> Resources:
        for m in self.methods:
            if m.spec == spec:
                return m.resources
        return Resources()


def _err(path: Path, key: str, problem: str, fix: str) -> FsbenchError:
    return FsbenchError(f"{path}: {key}: {problem}; {fix}")


def _int(path: Path, key: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _err(path, key, f"{value!r} is not an integer >= {minimum}", f"write e.g. {key} = 1")
    return value


def _str_list(path: Path, key: str, value: Any, example: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise _err(path, key, f"{value!r} is not a non-empty list of strings", f"write {example}")
    return list(dict.fromkeys(value))


def _method(path: Path, i: int, entry: Any) -> SweepMethod:
    from fewshot_bench.methods.params import parse_method_spec

    where = f"methods[{i}]"
    if isinstance(entry, str):
        table: dict[str, Any] = {"spec": entry}
    elif isinstance(entry, dict):
        table = dict(entry)
    else:
        raise _err(
            path,
            where,
            f"{entry!r} is neither a method string nor a table",
            'write "name:key=value" or { spec = "name:key=value", num_cpus = 1, num_gpus = 0 }',
        )
    unknown = sorted(set(table) - METHOD_KEYS)
    if unknown:
        raise _err(path, where, f"unknown key(s) {unknown}", f"allowed: {sorted(METHOD_KEYS)}")
    text = table.get("spec")
    if not isinstance(text, str) or not text.strip() or text.startswith(":"):
        raise _err(path, f"{where}.spec", f"{text!r} is not a method", 'write spec = "diffusion"')
    name, params = parse_method_spec(text)
    try:
        memory = parse_memory(table["memory"], f"{where}.memory") if "memory" in table else None
        resources = Resources(
            num_cpus=table.get("num_cpus", 1.0),
            num_gpus=table.get("num_gpus", 0.0),
            memory=memory,
        )
    except FsbenchError as exc:
        raise FsbenchError(f"{path}: {where}: {exc}") from None
    return SweepMethod(text.strip(), MethodSpec(name, params), resources)


def load_sweep(path: str | Path, **overrides: Any) -> Sweep:
    """Parse and validate a sweep file; ``overrides`` (executor, jobs, address, workdir,
    data_root) are command-line flags that replace the file's values when not None."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FsbenchError(f"sweep file {path} does not exist") from None
    except OSError as exc:
        raise FsbenchError(f"cannot read sweep file {path}: {exc}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FsbenchError(f"{path}: invalid TOML: {exc}") from None
    unknown = sorted(set(doc) - TOP_KEYS)
    if unknown:
        raise _err(path, "top level", f"unknown key(s) {unknown}", f"allowed: {sorted(TOP_KEYS)}")
    for key in ("protocols", "methods"):
        if key not in doc:
            raise _err(
                path,
                key,
                "missing",
                'a sweep needs protocols = ["omniglot-5w1s", ...] and methods = ["nearest-prototype", ...]',
            )
    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not name or any(c in name for c in "/\\") or name[0] == ".":
        raise _err(path, "name", f"{name!r} is not a usable name", 'write name = "my-sweep"')
    protocols = _str_list(path, "protocols", doc["protocols"], 'protocols = ["omniglot-5w1s"]')
    if not isinstance(doc["methods"], list) or not doc["methods"]:
        raise _err(path, "methods", "must be a non-empty list", 'write methods = ["diffusion"]')
    methods = [_method(path, i, m) for i, m in enumerate(doc["methods"])]
    labels = [m.text for m in methods]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise _err(path, "methods", f"{dup} listed twice", "list each method once")
    seeds = None
    if "seeds" in doc:
        s = doc["seeds"]
        if not isinstance(s, list) or not s:
            raise _err(path, "seeds", f"{s!r} is not a list of seeds", "write seeds = [0, 1]")
        seeds = list(dict.fromkeys(_int(path, "seeds", v, minimum=0) for v in s))
    backbones: list[str | None] = [None]
    if "backbones" in doc:
        backbones = list(_str_list(path, "backbones", doc["backbones"], 'backbones = ["pixels"]'))
    run = doc.get("run", {})
    ex = doc.get("executor", {})
    for key, table, allowed in (("run", run, RUN_KEYS), ("executor", ex, EXECUTOR_KEYS)):
        if not isinstance(table, dict):
            raise _err(path, key, "is not a table", f"write [{key}] on its own line")
        bad = sorted(set(table) - allowed)
        if bad:
            raise _err(path, f"[{key}]", f"unknown key(s) {bad}", f"allowed: {sorted(allowed)}")
    sweep = Sweep(path=path, name=name, protocols=protocols, methods=methods)
    sweep.seeds, sweep.backbones = seeds, backbones
    for key in ("workdir", "data_root", "device"):
        if key in run and (not isinstance(run[key], str) or not run[key]):
            raise _err(path, f"[run] {key}", f"{run[key]!r} is not a string", f'{key} = "..."')
    sweep.workdir = Path(run.get("workdir", "runs"))
    sweep.data_root = run.get("data_root")
    sweep.device = run.get("device", "auto")
    if not isinstance(run.get("download", False), bool):
        raise _err(path, "[run] download", "must be true or false", "write download = true")
    sweep.download = run.get("download", False)
    if "max_tasks" in run:
        sweep.max_tasks = _int(path, "[run] max_tasks", run["max_tasks"])
    if "batch_size" in run:
        sweep.batch_size = _int(path, "[run] batch_size", run["batch_size"])
    if "budget" in run:
        sweep.budget = _int(path, "[run] budget", run["budget"])
    if "plugins" in run:
        sweep.plugins = tuple(
            _str_list(path, "[run] plugins", run["plugins"], 'plugins = ["my_methods.py"]')
        )
    kind = ex.get("kind", "serial")
    if kind not in EXECUTORS:
        raise _err(path, "[executor] kind", f"{kind!r} is not known", f"use one of {EXECUTORS}")
    sweep.executor = kind
    if "jobs" in ex:
        sweep.jobs = _int(path, "[executor] jobs", ex["jobs"])
    if "address" in ex:
        if not isinstance(ex["address"], str) or not ex["address"]:
            raise _err(
                path, "[executor] address", f"{ex['address']!r}", 'write "auto" or "HOST:PORT"'
            )
        sweep.address = ex["address"]
    if overrides.get("executor") not in (None, sweep.executor):
        sweep.jobs = sweep.address = None  # the file's settings were for its own executor
    for key, value in overrides.items():
        if value is not None:
            setattr(sweep, key, value)
    if sweep.address is not None and sweep.executor != "ray":
        raise _err(
            path, "[executor] address", f"given for kind {sweep.executor!r}", 'use kind = "ray"'
        )
    if sweep.jobs is not None and sweep.executor == "serial":
        raise _err(path, "[executor] jobs", "given for kind 'serial'", 'use kind = "processes"')
    sweep.content_hash = hashlib.sha256(text.encode()).hexdigest()[:16]
    return sweep


# ---------------------------------------------------------------------------------- cells
@dataclass
class Cell:
    """One point of the grid and the store key its rows carry."""

    protocol: str
    method: str  # as written in the sweep
    backbone: str
    seed: int
    total: int
    key: dict[str, Any]
    done: int = 0

    @property
    def label(self) -> str:
        return f"{self.protocol} {self.method} {self.backbone} s{self.seed}"

    def row_key(self) -> tuple:
        return tuple(self.key[c] for c in ENTRY_KEY)


def _row_key(row: Any) -> tuple:
    return tuple(getattr(row, c) for c in ENTRY_KEY)


class _CountingStore:
    """The results store, telling the sweep's progress bar about every chunk appended."""

    def __init__(self, store: Any, on_rows: Callable[[list], None]) -> None:
        self._store = store
        self._on_rows = on_rows

    def append(self, rows: Any) -> int:
        rows = list(rows)
        n = self._store.append(rows)
        self._on_rows(rows)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _done(store: Any, cell: Cell) -> int:
    return sum(1 for i in store.done_tasks(cell.key) if i < cell.total)


@dataclass
class _Group:
    protocol: Any
    pool: Any
    backbone: str | None
    method: SweepMethod
    cells: list[Cell]


def plan_sweep(sweep: Sweep, executor: Any, store: Any) -> list[_Group]:
    """Resolve every cell: protocols (families expand), manifests (materialised), each method's
    configuration hash and code fingerprint (from a worker), and what the store holds."""
    from fewshot_bench.run.runner import method_config, row_key
    from fewshot_bench.tasks.manifest import load_task_sets
    from fewshot_bench.tasks.protocol import load_pool, resolve_protocols

    protos: dict[str, Any] = {}
    for spec in sweep.protocols:
        for p in resolve_protocols(spec):
            protos.setdefault(p.name, p)
    infos = {m.text: executor.describe(m.spec) for m in sweep.methods}
    pools: dict[tuple, Any] = {}
    groups: list[_Group] = []
    seen: set[tuple] = set()
    for proto in protos.values():
        key = (proto.dataset["name"], tuple(proto.splits), proto.dataset.get("image_size"))
        if key not in pools:
            pools[key] = load_pool(proto, sweep.data_root, download=sweep.download)
        pool = pools[key]
        task_sets = load_task_sets(proto, pool, sweep.workdir, sweep.seeds)
        for backbone in sweep.backbones:
            bb = backbone or proto.run["backbone"]
            for m in sweep.methods:
                info = infos[m.text]
                config, run_hash = method_config(info, bb, sweep.budget)
                cells = []
                for seed, manifest in task_sets.items():
                    n = manifest.n_tasks
                    if sweep.max_tasks is not None:
                        n = min(n, sweep.max_tasks)
                    cell_key = row_key(proto, manifest, info, config, run_hash, seed)
                    cell = Cell(proto.name, m.text, config["backbone"], seed, n, cell_key)
                    if cell.row_key() in seen:  # e.g. an image method under two backbones
                        continue
                    seen.add(cell.row_key())
                    cell.done = _done(store, cell)
                    cells.append(cell)
                if cells:
                    groups.append(_Group(proto, pool, backbone, m, cells))
    return groups


def _write_plan(sweep: Sweep, groups: list[_Group]) -> None:
    plan = {
        "sweep": str(sweep.path),
        "sweep_hash": sweep.content_hash,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "executor": sweep.executor,
        "cells": [
            {
                "protocol": c.protocol,
                "method": c.method,
                "backbone": c.backbone,
                "seed": c.seed,
                "total": c.total,
                "key": c.key,
            }
            for g in groups
            for c in g.cells
        ],
    }
    write_text_atomic(sweep.plan_path, json.dumps(plan, indent=1) + "\n")


def format_cells(cells: list[Cell]) -> str:
    """A table of cells with done/total, and a total line."""
    if not cells:
        return "(no cells)"
    cols = [
        ("protocol", [c.protocol for c in cells]),
        ("method", [c.method for c in cells]),
        ("backbone", [c.backbone for c in cells]),
        ("seed", [str(c.seed) for c in cells]),
        ("done/total", [f"{c.done}/{c.total}" for c in cells]),
        ("", ["done" if c.done >= c.total else "" for c in cells]),
    ]
    widths = [max(len(h), *(len(v) for v in vals)) for h, vals in cols]
    lines = ["  ".join(h.ljust(w) for (h, _), w in zip(cols, widths, strict=True)).rstrip()]
    for i in range(len(cells)):
        lines.append(
            "  ".join(vals[i].ljust(w) for (_, vals), w in zip(cols, widths, strict=True)).rstrip()
        )
    done = sum(min(c.done, c.total) for c in cells)
    total = sum(c.total for c in cells)
    finished = sum(c.done >= c.total for c in cells)
    pct = 100 * done / total if total else 100.0
    lines.append(f"{finished}/{len(cells)} cells done, {done}/{total} tasks ({pct:.1f}%)")
    return "\n".join(lines)


def run_sweep(sweep: Sweep, *, progress: bool = True, out: TextIO | None = None) -> list[Cell]:
    """Run every cell not yet stored; returns the cells with their final counts."""
    from tqdm import tqdm

    from fewshot_bench.run.executor import make_executor
    from fewshot_bench.run.runner import resolve_device, run_protocol
    from fewshot_bench.run.store import ResultsStore

    out = out or sys.stdout
    device = resolve_device(sweep.device)
    executor = make_executor(
        sweep.executor,
        sweep.plugins,
        jobs=sweep.jobs,
        address=sweep.address,
        device=device,
        resources=sweep.resources_of,
    )
    try:
        with ResultsStore(sweep.store_path) as store:
            groups = plan_sweep(sweep, executor, store)
            _write_plan(sweep, groups)
            cells = [c for g in groups for c in g.cells]
            by_key = {c.row_key(): c for c in cells}
            bar = tqdm(
                total=sum(c.total for c in cells),
                initial=sum(c.done for c in cells),
                desc=f"sweep {sweep.name}",
                unit="task",
                disable=not progress,
                dynamic_ncols=True,
            )

            def postfix(current: Cell | None) -> None:
                finished = sum(c.done >= c.total for c in cells)
                text = f"cells {finished}/{len(cells)}"
                if current is not None:
                    text += f" | {current.label} {current.done}/{current.total}"
                bar.set_postfix_str(text)

            def on_rows(rows: list) -> None:
                current = None
                for row in rows:
                    cell = by_key.get(_row_key(row))
                    if cell is not None:
                        cell.done += 1
                        current = cell
                bar.update(len(rows))
                postfix(current)
                if progress and current is not None and current.done == current.total:
                    bar.write(f"done: {current.label} {current.total}/{current.total}")

            counting = _CountingStore(store, on_rows)
            postfix(None)
            for g in groups:
                if all(c.done >= c.total for c in g.cells):
                    continue
                run_protocol(
                    g.protocol,
                    [g.method.spec],
                    counting,
                    seeds=sorted({c.seed for c in g.cells}) if sweep.seeds else None,
                    workdir=sweep.workdir,
                    root=sweep.data_root,
                    device=device,
                    backbone=g.backbone,
                    max_tasks=sweep.max_tasks,
                    batch_size=sweep.batch_size,
                    budget=sweep.budget,
                    pool=g.pool,
                    progress=False,
                    executor=executor,
                    plugins=sweep.plugins,
                )
            bar.close()
            for c in cells:  # recount from the store: what a later --status will show
                c.done = _done(store, c)
    finally:
        if sweep.executor != "serial":
            executor.close()
    print(format_cells(cells), file=out)
    return cells


def sweep_status(sweep: Sweep, out: TextIO | None = None) -> list[Cell]:
    """Per-cell done/total of the sweep's latest start, from its plan file and the results
    store, both read-only (safe while the sweep runs)."""
    from fewshot_bench.run.store import ResultsStore, StoreError

    out = out or sys.stdout
    if not sweep.plan_path.is_file():
        raise FsbenchError(
            f"sweep {sweep.name!r} has not started in {sweep.workdir} (no {sweep.plan_path}); "
            f"start it with `fsbench sweep {sweep.path}`"
        )
    try:
        plan = json.loads(sweep.plan_path.read_text(encoding="utf-8"))
        cells = [
            Cell(
                c["protocol"], c["method"], c["backbone"], int(c["seed"]), int(c["total"]), c["key"]
            )
            for c in plan["cells"]
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise FsbenchError(
            f"{sweep.plan_path} is unreadable ({exc}); rerun `fsbench sweep {sweep.path}` to rewrite it"
        ) from None
    try:
        with ResultsStore(sweep.store_path, readonly=True) as store:
            for c in cells:
                c.done = _done(store, c)
    except StoreError:
        if sweep.store_path.exists():
            raise
    print(
        f"sweep {sweep.name} ({sweep.path}), started {plan.get('started', '?')} with the "
        f"{plan.get('executor', '?')} executor; store {sweep.store_path}",
        file=out,
    )
    if plan.get("sweep_hash") != sweep.content_hash:
        print(
            "note: the sweep file changed since that start; these are the cells it started with",
            file=out,
        )
    print(format_cells(cells), file=out)
    return cells
