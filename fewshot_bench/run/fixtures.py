"""Small fixtures shared by ``fsbench perf executors`` and the tests: an episodic protocol file
written on the fly, and the result columns that must agree between two runs of the same tasks
(serial vs worker processes vs Ray)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: What must be identical, row by row, between two executors that ran the same tasks.
SAME_COLUMNS = [
    "protocol",
    "method",
    "seed",
    "task_index",
    "accuracy",
    "config_hash",
    "code_fingerprint",
    "manifest_hash",
    "setting",
    "n_query",
]


def write_episodic_protocol(
    folder: str | Path,
    name: str,
    *,
    n_tasks: int,
    n_way: int = 5,
    k_shot: int = 1,
    n_query: int = 5,
    n_unlabeled: int = 0,
    n_distractor: int = 0,
    seeds: Sequence[int] = (0,),
    labeled_fraction: float | None = None,
    fit_split: str | None = None,
    description: str = "",
    dataset: str = "omniglot",
    splits: Sequence[str] = ("test",),
    image_size: int | None = 28,
) -> Path:
    """Write ``FOLDER/NAME.toml``: N-way K-shot episodes of ``dataset`` (Omniglot's evaluation
    alphabets at 28 px by default), returning its path. Keys left at their defaults mean what
    the protocol loader's defaults mean (``n_unlabeled = 0`` is no unlabeled items)."""

    def q(text: str) -> str:  # a TOML basic string (JSON's escapes are TOML's)
        return json.dumps(str(text))

    lines = [f"name = {q(name)}"]
    if description:
        lines.append(f"description = {q(description)}")
    dataset_lines = [f"name = {q(dataset)}", f"splits = [{', '.join(map(q, splits))}]"]
    if image_size is not None:
        dataset_lines.append(f"image_size = {int(image_size)}")
    if fit_split is not None:
        dataset_lines.append(f"fit_split = {q(fit_split)}")
    episodes: dict[str, Any] = {
        "n_way": n_way,
        "k_shot": k_shot,
        "n_query": n_query,
        "n_unlabeled": n_unlabeled,
        "n_distractor": n_distractor,
    }
    if labeled_fraction is not None:
        episodes["labeled_fraction"] = float(labeled_fraction)
    episodes["n_tasks"] = n_tasks
    lines += ["[dataset]", *dataset_lines, "[episodes]"]
    lines += [f"{key} = {value}" for key, value in episodes.items()]
    lines += ["[run]", f"seeds = [{', '.join(str(int(s)) for s in seeds)}]"]
    path = Path(folder) / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def comparable_rows(df: Any) -> Any:
    """The :data:`SAME_COLUMNS` of a results frame, in (method, seed, task) order, indexed from
    0: two runs of the same tasks stored the same results when these frames are ``equals``."""
    ordered = df.sort_values(["method", "seed", "task_index"])
    return ordered[SAME_COLUMNS].reset_index(drop=True)
