"""Frozen manifests: a protocol's tasks as indices, tied to the protocol hash and dataset fingerprint.

A manifest is one *task set*: the tasks of a sampled protocol for one seed
(``<workdir>/manifests/<protocol>/seed-<seed>.npz``), or the tasks of an imported episode file
(``<workdir>/manifests/<protocol>/imported.npz``, one task set whatever the protocol's seeds).
``load_task_sets`` is the one entry point for the runner.

File format ``fewshot-bench-manifest/2`` (``.npz``, written atomically): for each field of
``TaskIndices`` (``support``, ``support_labels``, ``unlabeled``, ``query``, ``classes``) a
concatenated int64 array ``<field>`` plus ``<field>_offsets`` (``n_tasks + 1`` entries), and
``header``, a JSON object with ``format``, ``protocol``, ``protocol_hash``, ``dataset``,
``dataset_fingerprint``, ``pool_size``, ``seed``, ``n_tasks``, ``n_way`` and ``n_query`` (items
per task: an int, or ``{"min": a, "max": b}`` when tasks differ), ``source`` (``"sampled"`` or
``"imported:<file name>:sha256=<16 hex>"``), ``content_sha256`` and ``created``.

What it does not hold: query and unlabeled labels. The runner derives them from the pool's
labels (``task.task_truth``: episode label ``j`` is pool class ``classes[j]``), so a method
process that opens a manifest learns nothing it could not learn from the public dataset.

Integrity, checked on every load:
- ``content_sha256`` covers the canonical header (every field but ``created`` and the hash) and
  every array, so an edited ``n_tasks`` or index is refused; ``n_tasks`` must match the offsets;
- a sampled manifest is re-derived: the protocol is sampled again for its seed and the result
  must equal the stored header and arrays (an edit with a recomputed hash is still refused);
- an imported manifest cannot be re-derived; its content hash and the structure of each task
  (distinct classes, support labels covering ``0..n_way-1`` and matching the pool, queries of
  the task's classes, no item twice) are checked against the pool.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fewshot_bench.atomic import atomic_path, remove_stale_temps
from fewshot_bench.errors import ManifestError, ProtocolError
from fewshot_bench.tasks.protocol import NAME_RULE, Pool, Protocol, is_safe_name
from fewshot_bench.tasks.sampler import iter_tasks
from fewshot_bench.tasks.task import TaskIndices

FORMAT = "fewshot-bench-manifest/2"
OLD_FORMATS = ("fewshot-bench-manifest/1",)
FIELDS = [f.name for f in fields(TaskIndices)]
ARRAY_KEYS = [k for name in FIELDS for k in (name, f"{name}_offsets")]
HEADER_KEYS = (
    "format",
    "protocol",
    "protocol_hash",
    "dataset",
    "dataset_fingerprint",
    "pool_size",
    "seed",
    "n_tasks",
    "n_way",
    "n_query",
    "source",
    "content_sha256",
    "created",
)
UNHASHED_KEYS = ("created", "content_sha256")
SAMPLED = "sampled"
IMPORTED_PREFIX = "imported:"
IMPORTED_NAME = "imported.npz"


@dataclass
class Manifest:
    """One task set: a protocol's materialised tasks for one seed, or an imported episode file."""

    header: dict
    arrays: dict[str, np.ndarray]

    @property
    def n_tasks(self) -> int:
        return int(self.header["n_tasks"])

    @property
    def content_hash(self) -> str:
        """SHA-256 over the canonical header and all arrays (what result rows are bound to)."""
        return str(self.header["content_sha256"])

    @property
    def source(self) -> str:
        return str(self.header["source"])

    @property
    def imported(self) -> bool:
        return self.source.startswith(IMPORTED_PREFIX)

    def task(self, i: int) -> TaskIndices:
        if not 0 <= i < self.n_tasks:
            raise IndexError(f"task {i} out of range 0..{self.n_tasks - 1}")
        parts = {}
        for name in FIELDS:
            off = self.arrays[f"{name}_offsets"]
            parts[name] = self.arrays[name][off[i] : off[i + 1]]
        return TaskIndices(**parts)

    def __iter__(self) -> Iterator[TaskIndices]:
        return (self.task(i) for i in range(self.n_tasks))


def _content_hash(header: dict, arrays: dict[str, np.ndarray]) -> str:
    canonical = {k: v for k, v in header.items() if k not in UNHASHED_KEYS}
    h = hashlib.sha256()
    h.update(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode())
    h.update(b"\0")
    for key in ARRAY_KEYS:
        a = np.ascontiguousarray(arrays[key], dtype="<i8")
        h.update(key.encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _size_summary(sizes: np.ndarray) -> int | dict[str, int]:
    if len(sizes) == 0:
        return 0
    lo, hi = int(sizes.min()), int(sizes.max())
    return lo if lo == hi else {"min": lo, "max": hi}


def pack_tasks(tasks: list[TaskIndices]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for name in FIELDS:
        chunks = [np.asarray(getattr(t, name), dtype=np.int64) for t in tasks]
        arrays[name] = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64)
        arrays[f"{name}_offsets"] = np.concatenate(
            [[0], np.cumsum([len(c) for c in chunks], dtype=np.int64)]
        ).astype(np.int64)
    return arrays


def sample_tasks(
    protocol: Protocol, pool: Pool, seed: int, *, progress: bool = False
) -> list[TaskIndices]:
    """All tasks of a sampled protocol for ``seed``, in task-index order."""
    total = protocol.params.get("n_tasks", 1) if protocol.kind == "episodic" else 1
    return list(
        tqdm(
            iter_tasks(protocol, pool, seed),
            total=total,
            desc=f"sampling {protocol.name} seed {seed}",
            leave=False,
            disable=not progress or total < 200,
        )
    )


def build_manifest(
    protocol: Protocol,
    pool: Pool,
    seed: int,
    tasks: list[TaskIndices] | None = None,
    source: str = SAMPLED,
    *,
    progress: bool = True,
) -> Manifest:
    """Materialise the protocol's tasks for ``seed`` (or wrap given ``tasks``) into a Manifest."""
    if tasks is None:
        tasks = sample_tasks(protocol, pool, seed, progress=progress)
    if not tasks:
        raise ManifestError(f"{protocol.name}: a manifest needs at least one task")
    arrays = pack_tasks(tasks)
    header = {
        "format": FORMAT,
        "protocol": protocol.name,
        "protocol_hash": protocol.hash(),
        "dataset": protocol.dataset["name"],
        "dataset_fingerprint": pool.fingerprint(),
        "pool_size": len(pool.data),
        "seed": int(seed),
        "n_tasks": len(tasks),
        "n_way": _size_summary(np.diff(arrays["classes_offsets"])),
        "n_query": _size_summary(np.diff(arrays["query_offsets"])),
        "source": source,
    }
    header["content_sha256"] = _content_hash(header, arrays)
    header["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return Manifest(header=header, arrays=arrays)


def save_manifest(manifest: Manifest, path: Path) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves a half-written manifest;
    temporary files that killed writers left in the folder are removed first."""
    if _content_hash(manifest.header, manifest.arrays) != manifest.content_hash:
        raise ManifestError(
            f"refusing to write {path}: its content hash does not match its header and arrays"
        )
    arrays = {k: np.ascontiguousarray(manifest.arrays[k], dtype=np.int64) for k in ARRAY_KEYS}
    remove_stale_temps(Path(path).parent)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, header=np.array(json.dumps(manifest.header, sort_keys=True)), **arrays)
    return Path(path)


def _fix(path: Path | str) -> str:
    return f"delete {path} and run `fsbench episodes` again to re-materialise it"


def _check_layout(header: dict, arrays: dict[str, np.ndarray], path: Path | str) -> None:
    """``n_tasks`` agrees with every offsets array, and the offsets cut their arrays exactly."""
    n = header["n_tasks"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ManifestError(
            f"manifest {path}: n_tasks must be an integer >= 1, got {n!r}; {_fix(path)}"
        )
    for name in FIELDS:
        off = arrays[f"{name}_offsets"]
        if len(off) != n + 1:
            raise ManifestError(
                f"manifest {path}: header n_tasks = {n} but the {name} offsets describe "
                f"{len(off) - 1} tasks; {_fix(path)}"
            )
        if off[0] != 0 or off[-1] != len(arrays[name]) or (np.diff(off) < 0).any():
            raise ManifestError(
                f"manifest {path}: {name}_offsets do not cut the {name} array into tasks; {_fix(path)}"
            )
    if not np.array_equal(arrays["support_offsets"], arrays["support_labels_offsets"]):
        raise ManifestError(
            f"manifest {path}: support and support_labels differ in length for some task; {_fix(path)}"
        )


def read_manifest(path: Path) -> Manifest:
    """Read a manifest and check its internal integrity (not yet its protocol or dataset)."""
    path = Path(path)
    fix = _fix(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            arrays = {k: z[k] for k in z.files if k != "header"}
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} does not exist") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise ManifestError(
            f"manifest {path} is corrupt or not a manifest ({exc}); {fix}"
        ) from None
    if not isinstance(header, dict):
        raise ManifestError(f"manifest {path} has no header object; {fix}")
    fmt = header.get("format")
    if fmt in OLD_FORMATS:
        raise ManifestError(
            f"manifest {path} has the old format {fmt!r} (it stores query labels and its header is "
            f"not hashed); this version reads {FORMAT!r}. Delete it: a sampled protocol's manifest "
            "is re-materialised (the same tasks) from protocol + seed on next use; imported episodes "
            "are imported again with `fsbench episodes PROTOCOL --import FILE`"
        )
    if fmt != FORMAT:
        raise ManifestError(f"manifest {path} has format {fmt!r}, expected {FORMAT!r}; {fix}")
    missing_h = [k for k in HEADER_KEYS if k not in header]
    if missing_h:
        raise ManifestError(f"manifest {path}: header lacks {missing_h}; {fix}")
    missing = [k for k in ARRAY_KEYS if k not in arrays]
    if missing:
        raise ManifestError(f"manifest {path} lacks arrays {missing}; {fix}")
    extra = sorted(set(arrays) - set(ARRAY_KEYS))
    if extra:
        raise ManifestError(
            f"manifest {path} holds arrays this format does not have {extra} (a manifest stores "
            f"no query or unlabeled labels); {fix}"
        )
    for key in ARRAY_KEYS:
        if arrays[key].dtype != np.int64 or arrays[key].ndim != 1:
            raise ManifestError(
                f"manifest {path}: array {key} is {arrays[key].dtype} with shape "
                f"{arrays[key].shape}, expected 1-d int64; {fix}"
            )
    if _content_hash(header, arrays) != header["content_sha256"]:
        raise ManifestError(
            f"manifest {path} was modified after it was written (content hash mismatch over its "
            f"header and arrays); results against it would not be comparable. {fix}"
        )
    _check_layout(header, arrays, path)
    return Manifest(header=header, arrays=arrays)


def task_problem(idx: TaskIndices, pool_labels: np.ndarray, n_way: int | None = None) -> str | None:
    """What is wrong with one task against the pool's labels (``None``: nothing).

    Checks: ``n_way`` ways when given; distinct classes; support labels covering ``0..n_way-1``
    and naming each support item's class; every query item of one of the task's classes; no item
    twice (within a role or across roles, e.g. support and query).
    """
    classes, y = idx.classes, idx.support_labels
    if n_way is not None and len(classes) != n_way:
        return f"a {len(classes)}-way task in a {n_way}-way protocol"
    if len(np.unique(classes)) != len(classes):
        return f"classes {classes.tolist()} repeat a dataset class"
    if len(y) and (y.min() < 0 or y.max() >= len(classes)):
        return f"support labels outside 0..{len(classes) - 1}"
    lacking = sorted(set(range(len(classes))) - set(np.unique(y).tolist()))
    if lacking:
        return f"support lacks episode label(s) {lacking}"
    if not (pool_labels[idx.support] == classes[y]).all():
        return "a support label does not name its item's dataset class"
    if len(idx.query) == 0:
        return "no query items"
    if not np.isin(pool_labels[idx.query], classes).all():
        return "a query item belongs to none of the task's classes"
    everything = idx.all_items()
    if len(np.unique(everything)) != len(everything):
        return "an item appears twice (in one role or in two roles)"
    return None


def _differences(stored: Manifest, fresh: Manifest, limit: int = 3) -> list[str]:
    """Human-readable differences between a stored manifest and a fresh sampling."""
    out = []
    for key in ("protocol", "protocol_hash", "dataset", "dataset_fingerprint", "pool_size"):
        if stored.header.get(key) != fresh.header[key]:
            out.append(f"{key} {stored.header.get(key)} vs {fresh.header[key]}")
    for key in ("seed", "n_tasks", "n_way", "n_query"):
        if stored.header.get(key) != fresh.header[key]:
            out.append(
                f"{key} {json.dumps(stored.header.get(key))} vs {json.dumps(fresh.header[key])}"
            )
    if all(np.array_equal(stored.arrays[k], fresh.arrays[k]) for k in ARRAY_KEYS):
        return out
    n_differ, shown = 0, []
    for i in range(min(stored.n_tasks, fresh.n_tasks)):
        a, b = stored.task(i), fresh.task(i)
        bad = [f for f in FIELDS if not np.array_equal(getattr(a, f), getattr(b, f))]
        if bad:
            n_differ += 1
            if len(shown) < limit:
                shown.append(f"task {i} {'/'.join(bad)} differs")
    out.extend(shown)
    if n_differ > len(shown):
        out.append(f"{n_differ} tasks differ in all")
    return out


def rederive(
    manifest: Manifest, protocol: Protocol, pool: Pool, path: Path | str = "manifest"
) -> None:
    """Sample the protocol again for the manifest's seed and refuse any difference."""
    fresh = build_manifest(protocol, pool, int(manifest.header["seed"]), progress=False)
    diffs = _differences(manifest, fresh)
    if diffs:
        raise ManifestError(
            f"{path} is not what protocol {protocol.name} seed {manifest.header['seed']} samples "
            f"(stored vs re-sampled: {'; '.join(diffs)}): the file was edited or made by other "
            f"code, and results against it would not be comparable. Delete it to re-materialise it"
        )


def check_manifest(
    manifest: Manifest,
    protocol: Protocol,
    pool: Pool,
    path: Path | str = "manifest",
    seed: int | None = None,
) -> None:
    """Refuse a manifest that is not exactly what it claims for this protocol and data.

    Protocol definition and data first (clear messages for the usual causes), then: a sampled
    manifest must equal a fresh sampling of its seed (``seed``, when given, must be that seed);
    an imported one must pass ``task_problem`` for every task."""
    h = manifest.header
    redo = (
        "delete it and import the episode file again"
        if manifest.imported
        else "delete it to re-materialise it"
    )
    if h["protocol"] != protocol.name:
        raise ManifestError(
            f"{path} holds tasks of protocol {h['protocol']!r}, not {protocol.name!r}; "
            f"it was copied or renamed: {redo}"
        )
    if h["protocol_hash"] != protocol.hash():
        raise ManifestError(
            f"{path} was made for a different definition of protocol {h['protocol']!r} "
            f"(hash {h['protocol_hash']}, now {protocol.hash()}): the protocol file changed. "
            f"Give the changed protocol a new name, or {redo} "
            "(results stored against the old tasks stay, under the old hash)."
        )
    fp = pool.fingerprint()
    if h["dataset_fingerprint"] != fp:
        raise ManifestError(
            f"{path} was made from different {h['dataset']} data (fingerprint {h['dataset_fingerprint'][:12]}, "
            f"this copy {fp[:12]}): the files under the data root differ (another version, resize, or "
            "a corrupt copy). Use the data the manifest was made with, or delete the manifest."
        )
    size = len(pool.data)
    if h["pool_size"] != size:
        raise ManifestError(
            f"{path} was made for a pool of {h['pool_size']} items, this one has {size}; {redo}"
        )
    for name in ("support", "unlabeled", "query"):
        arr = manifest.arrays[name]
        if len(arr) and (arr.max() >= size or arr.min() < 0):
            raise ManifestError(f"{path}: {name} indices outside the pool of {size} items; {redo}")
    if seed is not None and h["seed"] != seed:
        raise ManifestError(
            f"{path} holds seed {h['seed']}, not seed {seed}: it was copied or renamed; {redo}"
        )
    if manifest.source == SAMPLED:
        rederive(manifest, protocol, pool, path)
    elif manifest.imported:
        n_way = protocol.params["n_way"] if protocol.kind == "episodic" else None
        labels = pool.data.labels
        for i, task in enumerate(manifest):
            problem = task_problem(task, labels, n_way)
            if problem:
                raise ManifestError(
                    f"{path}: imported task {i}: {problem}; delete it and import the episode "
                    "file again"
                )
    else:
        raise ManifestError(
            f"{path} has source {manifest.source!r}, neither {SAMPLED!r} nor "
            f"'{IMPORTED_PREFIX}...'; delete it to re-materialise it"
        )


def inside(root: Path | str, *parts: str) -> Path:
    """``root/parts...``, refused (ProtocolError) unless it resolves inside ``root``.

    ``root`` itself is resolved first, so a ``root`` that is a symlink is followed; a part or a
    symlink below ``root`` that leads out of it is not."""
    base = Path(root).resolve()
    path = Path(root).joinpath(*parts)
    resolved = base.joinpath(*parts).resolve()
    if not resolved.is_relative_to(base):
        raise ProtocolError(
            f"refusing path {path}: it resolves to {resolved}, outside {base}; every file "
            "fewshot-bench writes for a protocol stays under its workdir"
        )
    return path


def manifest_dir(workdir: Path | str, protocol: Protocol) -> Path:
    """``<workdir>/manifests/<protocol name>``; the name must be safe and the folder inside."""
    if not is_safe_name(protocol.name):
        raise ProtocolError(
            f"{protocol.source or 'protocol'}: protocol name {protocol.name!r} is not allowed as "
            f"a folder name: use {NAME_RULE}"
        )
    return inside(Path(workdir) / "manifests", protocol.name)


def _seed_name(seed: object) -> str:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ProtocolError(f"a seed must be an integer >= 0, got {seed!r}")
    return f"seed-{int(seed)}.npz"


def manifest_path(workdir: Path | str, protocol: Protocol, seed: int) -> Path:
    """Where the sampled task set of (protocol, seed) lives."""
    return inside(manifest_dir(workdir, protocol), _seed_name(seed))


def imported_manifest_path(workdir: Path | str, protocol: Protocol) -> Path:
    """Where the protocol's imported task set lives (one per protocol and workdir)."""
    return inside(manifest_dir(workdir, protocol), IMPORTED_NAME)


def get_manifest(
    protocol: Protocol, pool: Pool, seed: int, workdir: Path | str, *, progress: bool = True
) -> Manifest:
    """Load the sampled manifest for (protocol, seed), materialising it on first use (with a
    progress bar for long samplings unless ``progress`` is false).

    A stored one is read (content hash, layout), checked against protocol and data and
    re-derived (``check_manifest``). Ignores an imported task set: see ``load_task_sets``."""
    path = manifest_path(workdir, protocol, seed)
    remove_stale_temps(path.parent)
    if path.exists():
        manifest = read_manifest(path)
        if manifest.source != SAMPLED:
            raise ManifestError(
                f"{path} has source {manifest.source!r}, but seed-*.npz files hold sampled tasks "
                f"(imported episodes live in {IMPORTED_NAME}); delete it to re-materialise it"
            )
        check_manifest(manifest, protocol, pool, path, seed=seed)
        return manifest
    manifest = build_manifest(protocol, pool, seed, progress=progress)
    save_manifest(manifest, path)
    return manifest


def load_imported(protocol: Protocol, pool: Pool, workdir: Path | str) -> Manifest:
    """Read and check the protocol's imported task set."""
    path = imported_manifest_path(workdir, protocol)
    remove_stale_temps(path.parent)
    manifest = read_manifest(path)
    if not manifest.imported:
        raise ManifestError(
            f"{path} has source {manifest.source!r}, not imported episodes; delete it and import "
            "the episode file again"
        )
    check_manifest(manifest, protocol, pool, path)
    return manifest


def load_task_sets(
    protocol: Protocol,
    pool: Pool,
    workdir: Path | str,
    seeds: list[int] | None,
    *,
    progress: bool = True,
) -> dict[int, Manifest]:
    """The protocol's task sets in ``workdir``, keyed by seed: the one entry point for the runner.

    If ``<workdir>/manifests/<protocol>/imported.npz`` exists, that file is the protocol's only
    task set: ``{0: manifest}``; explicit ``seeds`` other than ``None``, ``[]`` or ``[0]`` are
    refused. Otherwise each seed (default: the protocol's ``[run] seeds``) gets its sampled
    manifest, materialised on first use and re-derived on every later load (``get_manifest``).
    """
    imported = imported_manifest_path(workdir, protocol)
    if imported.exists():
        if seeds and list(seeds) != [0]:
            raise ManifestError(
                f"protocol {protocol.name} uses imported episodes (file {imported}), one task set; "
                "--seeds does not apply; use another --workdir to run sampled episodes"
            )
        return {0: load_imported(protocol, pool, workdir)}
    chosen = list(dict.fromkeys(protocol.run["seeds"] if not seeds else seeds))
    return {
        int(s): get_manifest(protocol, pool, int(s), workdir, progress=progress) for s in chosen
    }
