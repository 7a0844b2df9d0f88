"""Import externally given episodes (a published fixed benchmark) as a frozen manifest.

Format: JSON Lines, one task per line::

    {"support": [...], "support_labels": [...], "query": [...], "query_labels": [...],
     "unlabeled": [...], "unlabeled_labels": [...]}

Items are integer indices into the protocol's pool (its splits concatenated, in order) or
string item ids (the dataset's relative file paths, e.g.
``images_evaluation/Bengali/character01/0860_01.png``). Labels are episode labels 0..n_way-1;
``unlabeled`` and ``unlabeled_labels`` may be omitted (``-1`` marks a distractor item).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from fewshot_bench.errors import ManifestError
from fewshot_bench.tasks.manifest import Manifest, build_manifest
from fewshot_bench.tasks.protocol import Pool, Protocol
from fewshot_bench.tasks.task import TaskIndices


def _resolve(items: list, lookup: dict[str, int] | None, size: int, where: str) -> np.ndarray:
    if all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        arr = np.asarray(items, dtype=np.int64)
        if len(arr) and (arr.min() < 0 or arr.max() >= size):
            raise ManifestError(f"{where}: index outside the pool of {size} items")
        return arr
    if lookup is None:
        raise ManifestError(
            f"{where}: string item ids given, but this dataset has no item ids; use indices"
        )
    try:
        return np.asarray([lookup[i] for i in items], dtype=np.int64)
    except KeyError as exc:
        raise ManifestError(f"{where}: unknown item id {exc.args[0]!r}") from None


def parse_episode(
    record: dict, pool: Pool, lookup: dict[str, int] | None, where: str
) -> TaskIndices:
    """Validate one JSON task against the pool and turn it into TaskIndices."""
    for key in ("support", "support_labels", "query", "query_labels"):
        if key not in record:
            raise ManifestError(f"{where}: missing key {key!r}")
    size = len(pool.data)
    sup = _resolve(record["support"], lookup, size, f"{where} support")
    qry = _resolve(record["query"], lookup, size, f"{where} query")
    unl = _resolve(record.get("unlabeled", []), lookup, size, f"{where} unlabeled")
    sup_y = np.asarray(record["support_labels"], dtype=np.int64)
    qry_y = np.asarray(record["query_labels"], dtype=np.int64)
    unl_y = np.asarray(record.get("unlabeled_labels", [-1] * len(unl)), dtype=np.int64)
    for items, labels, name in (
        (sup, sup_y, "support"),
        (qry, qry_y, "query"),
        (unl, unl_y, "unlabeled"),
    ):
        if len(items) != len(labels):
            raise ManifestError(f"{where}: {len(items)} {name} items but {len(labels)} labels")
    n_way = int(sup_y.max()) + 1 if len(sup_y) else 0
    if n_way == 0 or set(np.unique(sup_y)) != set(range(n_way)):
        raise ManifestError(f"{where}: support labels must cover 0..n_way-1 with no gaps")
    if len(qry_y) == 0 or qry_y.min() < 0 or qry_y.max() >= n_way:
        raise ManifestError(f"{where}: query labels must be in 0..{n_way - 1}")
    if len(unl_y) and (unl_y.min() < -1 or unl_y.max() >= n_way):
        raise ManifestError(f"{where}: unlabeled labels must be in -1..{n_way - 1}")
    everything = np.concatenate([sup, qry, unl])
    if len(np.unique(everything)) != len(everything):
        raise ManifestError(f"{where}: an item appears twice (in one role or in two roles)")
    pool_labels = pool.data.labels
    classes = np.empty(n_way, dtype=np.int64)
    for j in range(n_way):
        owners = np.unique(pool_labels[np.concatenate([sup[sup_y == j], qry[qry_y == j]])])
        if len(owners) != 1:
            raise ManifestError(
                f"{where}: episode label {j} mixes dataset classes {owners.tolist()}"
            )
        classes[j] = owners[0]
    return TaskIndices(sup, sup_y, unl, unl_y, qry, qry_y, classes)


def import_episodes(path: str | Path, protocol: Protocol, pool: Pool, seed: int) -> Manifest:
    """Read a JSONL episode file and build a manifest for (protocol, seed) from it."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"episode file {path} does not exist")
    raw = path.read_bytes()
    lookup = None
    if pool.data.item_ids is not None:
        lookup = {item: i for i, item in enumerate(pool.data.item_ids)}
    tasks = []
    for lineno, line in enumerate(raw.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        tasks.append(parse_episode(record, pool, lookup, f"{path}:{lineno}"))
    if not tasks:
        raise ManifestError(f"{path}: no episodes found")
    source = f"imported:{path.name}:sha256={hashlib.sha256(raw).hexdigest()[:16]}"
    return build_manifest(protocol, pool, seed, tasks=tasks, source=source)


def export_episodes(
    manifest: Manifest, path: str | Path, item_ids: list[str] | None = None
) -> Path:
    """Write a manifest's tasks in the import format (indices, or item ids when given)."""
    path = Path(path)
    with path.open("w") as fh:
        for t in manifest:

            def ids(a: np.ndarray) -> list:
                return [item_ids[i] for i in a] if item_ids is not None else a.tolist()

            fh.write(
                json.dumps(
                    {
                        "support": ids(t.support),
                        "support_labels": t.support_labels.tolist(),
                        "query": ids(t.query),
                        "query_labels": t.query_labels.tolist(),
                        "unlabeled": ids(t.unlabeled),
                        "unlabeled_labels": t.unlabeled_labels.tolist(),
                    }
                )
                + "\n"
            )
    return path
