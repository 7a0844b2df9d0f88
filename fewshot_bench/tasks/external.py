"""Import externally given episodes (a published fixed benchmark) as a frozen manifest.

Format: JSON Lines, one task per line::

    {"support": [...], "support_labels": [...], "query": [...], "query_labels": [...],
     "unlabeled": [...], "unlabeled_labels": [...]}

Items are integer indices into the protocol's pool (its splits concatenated, in order) or
string item ids (the dataset's relative file paths, e.g.
``images_evaluation/Bengali/character01/0860_01.png``), one kind per list. Labels are episode
labels ``0..n_way-1``; ``unlabeled`` and ``unlabeled_labels`` may be omitted (``-1`` marks a
distractor item). No other keys are accepted (a misspelt key would otherwise drop data).

An episode file is ONE task set, whatever the protocol's seeds: it is stored at
``<workdir>/manifests/<protocol>/imported.npz`` with ``seed = 0`` and
``source = "imported:<file name>:sha256=<16 hex of the file bytes>"``. The file's labels are
checked against the pool and then dropped: like every manifest, the imported one stores support
labels and each task's classes only, and the runner derives query and unlabeled labels from the
pool (``task.task_truth``).

Refused, naming the file and line: a task whose n_way differs from the protocol's ``n_way``
(episodic protocols), a support lacking one of ``0..n_way-1``, labels out of range, an episode
label whose items span several dataset classes, two episode labels on one dataset class, an
unlabeled label that contradicts the pool (``j`` on an item not of class ``classes[j]``, ``-1`` on
an item of an episode class), an item twice in a task (e.g. in support and query), no queries.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from fewshot_bench.atomic import write_text_atomic
from fewshot_bench.errors import ManifestError
from fewshot_bench.tasks.manifest import (
    Manifest,
    build_manifest,
    imported_manifest_path,
    manifest_dir,
    save_manifest,
    task_problem,
)
from fewshot_bench.tasks.protocol import Pool, Protocol
from fewshot_bench.tasks.task import TaskIndices, task_truth

KEYS = ("support", "support_labels", "query", "query_labels", "unlabeled", "unlabeled_labels")
REQUIRED = ("support", "support_labels", "query", "query_labels")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _resolve(items: object, lookup: dict[str, int] | None, size: int, where: str) -> np.ndarray:
    if not isinstance(items, list):
        raise ManifestError(f"{where}: expected a list of items, got {type(items).__name__}")
    if all(_is_int(i) for i in items):
        arr = np.asarray(items, dtype=np.int64)
        if len(arr) and (arr.min() < 0 or arr.max() >= size):
            raise ManifestError(f"{where}: index outside the pool of {size} items")
        return arr
    if not all(isinstance(i, str) for i in items):
        raise ManifestError(f"{where}: items must be all integer indices or all string item ids")
    if lookup is None:
        raise ManifestError(
            f"{where}: string item ids given, but this dataset has no item ids; use indices"
        )
    try:
        return np.asarray([lookup[i] for i in items], dtype=np.int64)
    except KeyError as exc:
        raise ManifestError(f"{where}: unknown item id {exc.args[0]!r}") from None


def _labels(values: object, where: str) -> np.ndarray:
    if not isinstance(values, list) or not all(_is_int(v) for v in values):
        raise ManifestError(f"{where}: labels must be a list of integers")
    return np.asarray(values, dtype=np.int64)


def parse_episode(
    record: object,
    pool: Pool,
    lookup: dict[str, int] | None,
    where: str,
    n_way: int | None = None,
) -> TaskIndices:
    """Validate one JSON task against the pool and turn it into TaskIndices.

    ``n_way``: the protocol's way count (episodic protocols); ``None`` takes it from the support."""
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: a task must be a JSON object")
    unknown = sorted(set(record) - set(KEYS))
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {unknown}; allowed: {list(KEYS)}")
    for key in REQUIRED:
        if key not in record:
            raise ManifestError(f"{where}: missing key {key!r}")
    if ("unlabeled_labels" in record) and ("unlabeled" not in record):
        raise ManifestError(f"{where}: unlabeled_labels given without unlabeled")
    size = len(pool.data)
    sup = _resolve(record["support"], lookup, size, f"{where} support")
    qry = _resolve(record["query"], lookup, size, f"{where} query")
    unl = _resolve(record.get("unlabeled", []), lookup, size, f"{where} unlabeled")
    sup_y = _labels(record["support_labels"], f"{where} support_labels")
    qry_y = _labels(record["query_labels"], f"{where} query_labels")
    unl_y = _labels(record.get("unlabeled_labels", [-1] * len(unl)), f"{where} unlabeled_labels")
    for items, labels, name in (
        (sup, sup_y, "support"),
        (qry, qry_y, "query"),
        (unl, unl_y, "unlabeled"),
    ):
        if len(items) != len(labels):
            raise ManifestError(f"{where}: {len(items)} {name} items but {len(labels)} labels")
    if len(sup_y) == 0 or len(qry_y) == 0:
        raise ManifestError(f"{where}: a task needs support and query items")
    present = np.unique(sup_y)
    apparent = max(int(sup_y.max()), int(qry_y.max()), int(unl_y.max()) if len(unl_y) else -1) + 1
    if n_way is None:
        n_way = max(apparent, 1)
    elif apparent != n_way and present.tolist() == list(range(apparent)):
        raise ManifestError(
            f"{where}: a {apparent}-way task (labels 0..{apparent - 1}) but the protocol is "
            f"{n_way}-way; import it into a protocol with n_way = {apparent}"
        )
    for labels, name, low in ((sup_y, "support", 0), (qry_y, "query", 0), (unl_y, "unlabeled", -1)):
        if len(labels) and (labels.min() < low or labels.max() >= n_way):
            raise ManifestError(
                f"{where}: {name} labels must be in {low}..{n_way - 1} ({n_way}-way), got "
                f"{sorted(set(labels.tolist()) - set(range(low, n_way)))}"
            )
    lacking = sorted(set(range(n_way)) - set(present.tolist()))
    if lacking:
        raise ManifestError(
            f"{where}: support lacks episode label(s) {lacking}: every label 0..{n_way - 1} "
            "needs at least one support item"
        )
    everything = np.concatenate([sup, qry, unl])
    values, counts = np.unique(everything, return_counts=True)
    if (counts > 1).any():
        item = int(values[counts > 1][0])
        roles = [r for r, a in (("support", sup), ("query", qry), ("unlabeled", unl)) if item in a]
        raise ManifestError(
            f"{where}: an item appears twice (in one role or in two roles): item {item} in "
            f"{' and '.join(roles)}"
        )
    pool_labels = pool.data.labels
    names = pool.data.class_names
    classes = np.empty(n_way, dtype=np.int64)
    for j in range(n_way):
        owners = np.unique(pool_labels[np.concatenate([sup[sup_y == j], qry[qry_y == j]])])
        if len(owners) != 1:
            raise ManifestError(
                f"{where}: episode label {j} mixes dataset classes {owners.tolist()}"
            )
        classes[j] = owners[0]
    seen: dict[int, int] = {}
    for j, c in enumerate(classes.tolist()):
        if c in seen:
            raise ManifestError(
                f"{where}: episode labels {seen[c]} and {j} both map to dataset class "
                f"{names[c]!r} (id {c}); each label must be its own class"
            )
        seen[c] = j
    if len(unl):
        unl_cls = pool_labels[unl]
        inside = unl_y >= 0
        wrong = inside & (unl_cls != classes[np.maximum(unl_y, 0)])
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise ManifestError(
                f"{where}: unlabeled item {int(unl[i])} is labeled {int(unl_y[i])} but belongs to "
                f"dataset class {names[unl_cls[i]]!r}, not {names[classes[unl_y[i]]]!r}"
            )
        hidden = ~inside & np.isin(unl_cls, classes)
        if hidden.any():
            i = int(np.flatnonzero(hidden)[0])
            raise ManifestError(
                f"{where}: unlabeled item {int(unl[i])} is marked as a distractor (-1) but belongs "
                f"to episode class {names[unl_cls[i]]!r}; label it with its episode label"
            )
    idx = TaskIndices(support=sup, support_labels=sup_y, unlabeled=unl, query=qry, classes=classes)
    problem = task_problem(idx, pool_labels, n_way)
    if problem:  # pragma: no cover - the checks above cover every case
        raise ManifestError(f"{where}: {problem}")
    return idx


def import_episodes(path: str | Path, protocol: Protocol, pool: Pool) -> Manifest:
    """Read a JSONL episode file and build the protocol's imported task set (``seed = 0``)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"episode file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text (expected JSON Lines)") from None
    lookup = None
    if pool.data.item_ids is not None:
        lookup = {item: i for i, item in enumerate(pool.data.item_ids)}
    n_way = protocol.params["n_way"] if protocol.kind == "episodic" else None
    tasks = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        tasks.append(parse_episode(record, pool, lookup, f"{path}:{lineno}", n_way))
    if not tasks:
        raise ManifestError(f"{path}: no episodes found")
    source = f"imported:{path.name}:sha256={hashlib.sha256(raw).hexdigest()[:16]}"
    return build_manifest(protocol, pool, 0, tasks=tasks, source=source)


def import_task_set(
    path: str | Path, protocol: Protocol, pool: Pool, workdir: str | Path, *, force: bool = False
) -> Path:
    """Import an episode file as the protocol's task set in ``workdir``; returns where it went.

    Refuses to replace an existing imported task set, or to shadow sampled manifests of the
    protocol in the same workdir, unless ``force``."""
    target = imported_manifest_path(workdir, protocol)
    if not force:
        if target.exists():
            raise ManifestError(
                f"{target} exists; pass --force to replace it with imported episodes"
            )
        sampled = sorted(p.name for p in manifest_dir(workdir, protocol).glob("seed-*.npz"))
        if sampled:
            raise ManifestError(
                f"{manifest_dir(workdir, protocol)} holds sampled manifests ({', '.join(sampled)}); "
                f"imported episodes would replace them as {protocol.name}'s task set in this "
                "workdir. Use another --workdir, or pass --force"
            )
    manifest = import_episodes(path, protocol, pool)
    return save_manifest(manifest, target)


def export_episodes(
    manifest: Manifest, path: str | Path, pool: Pool, *, item_ids: bool = False
) -> Path:
    """Write a manifest's tasks in the import format, with labels derived from the pool.

    ``item_ids``: name items by the dataset's item ids instead of pool indices."""
    ids_of = pool.data.item_ids if item_ids else None
    if item_ids and ids_of is None:
        raise ManifestError(f"{pool.data.name} has no item ids; export indices instead")

    def ids(a: np.ndarray) -> list:
        return [ids_of[i] for i in a] if ids_of is not None else a.tolist()

    lines = []
    for t in manifest:
        truth = task_truth(t, pool.data.labels)
        lines.append(
            json.dumps(
                {
                    "support": ids(t.support),
                    "support_labels": t.support_labels.tolist(),
                    "query": ids(t.query),
                    "query_labels": truth.query_labels.tolist(),
                    "unlabeled": ids(t.unlabeled),
                    "unlabeled_labels": truth.unlabeled_labels.tolist(),
                }
            )
        )
    return write_text_atomic(path, "".join(line + "\n" for line in lines))
