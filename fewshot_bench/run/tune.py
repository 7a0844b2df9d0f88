"""``fsbench tune``: choose a method's hyper-parameters on episodes of validation classes.

The grid is run on episodes of the protocol's shape drawn from a validation split (never the
protocol's own splits), into a store of its own (``<workdir>/tune/``) so that tuning rows never
reach a leaderboard. The best point is written as a ``--method-config`` file whose ``tuning``
table says how it was chosen; ``fsbench run --method-config FILE`` then binds that record into
every row's configuration (and so into its config hash).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fewshot_bench.atomic import write_text_atomic
from fewshot_bench.errors import ProtocolError
from fewshot_bench.methods.params import parse_value, split_top_level
from fewshot_bench.run.executor import MethodSpec
from fewshot_bench.run.runner import method_config, run_protocol
from fewshot_bench.run.store import ResultsStore
from fewshot_bench.tasks.protocol import Protocol, load_pool


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["k=5,10,20", "norm=col,row"]`` -> ``{"k": [5, 10, 20], "norm": ["col", "row"]}``."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, eq, values = item.partition("=")
        if not eq or not key.strip() or not values.strip():
            raise ProtocolError(f"--grid {item!r}: write NAME=V1,V2,... (e.g. --grid k=5,10,20)")
        if key.strip() in grid:
            raise ProtocolError(f"--grid names {key.strip()!r} twice; give all its values at once")
        grid[key.strip()] = [parse_value(v) for v in split_top_level(values)]
    if not grid:
        raise ProtocolError("fsbench tune needs at least one --grid NAME=V1,V2,...")
    return grid


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the order given."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def validation_protocol(protocol: Protocol, split: str | None, n_tasks: int) -> Protocol:
    """``protocol``'s episode shape on ``split`` (default ``val``), ``n_tasks`` episodes, seed 0."""
    if protocol.kind != "episodic":
        raise ProtocolError(
            f"fsbench tune runs episodes of a validation split; {protocol.name} is a "
            f"{protocol.kind} protocol: tune on an episodic protocol of the same dataset"
        )
    split = split or "val"
    if split in protocol.splits:
        raise ProtocolError(
            f"--split {split} is one of {protocol.name}'s evaluation splits {protocol.splits}; "
            "tune on classes the protocol never evaluates on (e.g. --split val)"
        )
    if n_tasks < 1:
        raise ProtocolError(f"--tasks must be an integer >= 1, got {n_tasks}")
    return dataclasses.replace(
        protocol,
        name=f"{protocol.name}.tune-{split}",
        dataset={**protocol.dataset, "splits": [split]},
        params={**protocol.params, "n_tasks": n_tasks},
        run={**protocol.run, "seeds": [0]},
        family=f"{protocol.family}.tune",
    )


@dataclass(frozen=True)
class TuneResult:
    """Validation accuracy (mean and 95% half-width over episodes) of every grid point."""

    method: str
    points: list[dict[str, Any]]
    means: list[float]
    half_widths: list[float]
    best: int
    record: dict[str, Any]


def tune(
    protocol: Protocol,
    spec: MethodSpec,
    grid: dict[str, list[Any]],
    *,
    executor: Any,
    workdir: Path,
    split: str | None = None,
    n_tasks: int = 200,
    root: str | Path | None = None,
    backbone: str | None = None,
    device: Any = "auto",
    budget: int | None = None,
    progress: bool = True,
) -> TuneResult:
    """Run every grid point (over ``spec``'s fixed parameters) on validation episodes and pick
    the best mean accuracy (ties: the earlier point)."""
    val = validation_protocol(protocol, split, n_tasks)
    clash = sorted(set(grid) & set(spec.params))
    if clash:
        raise ProtocolError(f"--grid and -m both set {', '.join(clash)}; give each once")
    points = grid_points(grid)
    specs = [MethodSpec(spec.name, {**spec.params, **p}, spec.origin) for p in points]
    backbone = backbone or protocol.run["backbone"]
    pool = load_pool(val, root)
    store_path = Path(workdir) / "tune" / f"{val.name}.sqlite"
    with ResultsStore(store_path) as store:
        run_protocol(
            val,
            specs,
            store,
            workdir=Path(workdir) / "tune",
            root=root,
            device=device,
            backbone=backbone,
            budget=budget,
            pool=pool,
            progress=progress,
            executor=executor,
        )
        rows = store.dataframe([val.name])
    means, halves = [], []
    for s in specs:
        info = executor.describe(s)
        _, run_hash = method_config(info, backbone, budget)
        acc = rows.loc[
            (rows.config_hash == run_hash) & (rows.code_fingerprint == info["code_fingerprint"]),
            "accuracy",
        ].to_numpy()
        means.append(float(acc.mean()))
        halves.append(float(1.96 * acc.std(ddof=1) / math.sqrt(len(acc))) if len(acc) > 1 else 0.0)
    best = int(np.argmax(means))
    record = {
        "protocol": protocol.name,
        "validation": val.name,
        "split": val.splits[0],
        "episodes": n_tasks,
        "backbone": backbone,
        "grid": {k: [str(v) for v in vs] for k, vs in grid.items()},
        "chosen": {k: points[best][k] for k in grid},
        "validation_accuracy": round(means[best], 6),
    }
    return TuneResult(spec.name, points, means, halves, best, record)


def toml_value(value: Any) -> str:
    """A TOML literal for a parameter value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_tuned(path: Path, spec: MethodSpec, result: TuneResult) -> Path:
    """The chosen parameters as a ``--method-config`` file with its ``tuning`` record."""
    params = {**spec.params, **result.points[result.best]}
    lines = [
        "# written by `fsbench tune`; run with: fsbench run PROTOCOL --method-config THIS_FILE"
    ]
    lines += ["[[method]]", f"name = {toml_value(spec.name)}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in params.items()]
    lines += ["[method.tuning]"]
    for k, v in result.record.items():
        if isinstance(v, dict):
            inner = ", ".join(f"{toml_value(a)} = {toml_value(b)}" for a, b in v.items())
            lines.append(f"{k} = {{ {inner} }}")
        else:
            lines.append(f"{k} = {toml_value(v)}")
    return write_text_atomic(path, "\n".join(lines) + "\n")
