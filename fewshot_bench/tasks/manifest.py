"""Frozen manifests: a protocol's tasks as indices, tied to the protocol hash and dataset fingerprint.

File format (``.npz``, written atomically): for each field of ``TaskIndices`` a concatenated
int64 array ``<field>`` plus ``<field>_offsets`` (``n_tasks + 1`` entries), and ``header``, a JSON
string with ``format``, ``protocol``, ``protocol_hash``, ``dataset_fingerprint``, ``pool_size``,
``seed``, ``n_tasks``, ``content_sha256`` (over all arrays) and ``source``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fewshot_bench.atomic import atomic_path
from fewshot_bench.errors import ManifestError
from fewshot_bench.tasks.protocol import Pool, Protocol
from fewshot_bench.tasks.sampler import iter_tasks
from fewshot_bench.tasks.task import TaskIndices

FORMAT = "fewshot-bench-manifest/1"
FIELDS = [f.name for f in fields(TaskIndices)]


@dataclass
class Manifest:
    """A protocol's materialised tasks for one seed."""

    header: dict
    arrays: dict[str, np.ndarray]

    @property
    def n_tasks(self) -> int:
        return int(self.header["n_tasks"])

    def task(self, i: int) -> TaskIndices:
        if not 0 <= i < self.n_tasks:
            raise IndexError(f"task {i} out of range 0..{self.n_tasks - 1}")
        parts = {}
        for name in FIELDS:
            off = self.arrays[f"{name}_offsets"]
            parts[name] = self.arrays[name][off[i] : off[i + 1]]
        return TaskIndices(**parts)

    def __iter__(self):
        return (self.task(i) for i in range(self.n_tasks))


def _content_hash(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key], dtype=np.int64)
        h.update(key.encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def pack_tasks(tasks: list[TaskIndices]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for name in FIELDS:
        chunks = [np.asarray(getattr(t, name), dtype=np.int64) for t in tasks]
        arrays[name] = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64)
        arrays[f"{name}_offsets"] = np.concatenate(
            [[0], np.cumsum([len(c) for c in chunks])]
        ).astype(np.int64)
    return arrays


def build_manifest(
    protocol: Protocol,
    pool: Pool,
    seed: int,
    tasks: list[TaskIndices] | None = None,
    source: str = "sampled",
) -> Manifest:
    """Materialise the protocol's tasks for ``seed`` (or wrap given ``tasks``) into a Manifest."""
    if tasks is None:
        total = protocol.params.get("n_tasks", 1) if protocol.kind == "episodic" else 1
        it = iter_tasks(protocol, pool, seed)
        tasks = list(
            tqdm(
                it,
                total=total,
                desc=f"sampling {protocol.name} seed {seed}",
                leave=False,
                disable=total < 200,
            )
        )
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
        "content_sha256": _content_hash(arrays),
        "source": source,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return Manifest(header=header, arrays=arrays)


def save_manifest(manifest: Manifest, path: Path) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves a half-written manifest."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(
            tmp, header=np.array(json.dumps(manifest.header, sort_keys=True)), **manifest.arrays
        )
    return path


def read_manifest(path: Path) -> Manifest:
    """Read a manifest and check its internal integrity (not yet its protocol or dataset)."""
    fix = f"delete {path} and run `fsbench episodes` again to re-materialise it"
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
    if header.get("format") != FORMAT:
        raise ManifestError(
            f"manifest {path} has format {header.get('format')!r}, expected {FORMAT!r}; {fix}"
        )
    missing = [n for n in FIELDS for k in (n, f"{n}_offsets") if k not in arrays]
    if missing:
        raise ManifestError(f"manifest {path} lacks arrays {missing}; {fix}")
    if _content_hash(arrays) != header.get("content_sha256"):
        raise ManifestError(
            f"manifest {path} was modified after it was written (content hash mismatch); "
            f"results against it would not be comparable. {fix}"
        )
    return Manifest(header=header, arrays=arrays)


def check_manifest(
    manifest: Manifest, protocol: Protocol, pool: Pool, path: Path | str = "manifest"
) -> None:
    """Refuse a manifest made for another protocol definition or another copy of the data."""
    h = manifest.header
    if h["protocol_hash"] != protocol.hash():
        raise ManifestError(
            f"{path} was made for a different definition of protocol {h['protocol']!r} "
            f"(hash {h['protocol_hash']}, now {protocol.hash()}): the protocol file changed. "
            "Give the changed protocol a new name, or delete the manifest to re-materialise it "
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
    for name in FIELDS:
        if name in ("support", "unlabeled", "query") and len(manifest.arrays[name]):
            if manifest.arrays[name].max() >= size or manifest.arrays[name].min() < 0:
                raise ManifestError(f"{path}: {name} indices outside the pool of {size} items")


def manifest_path(workdir: Path, protocol: Protocol, seed: int) -> Path:
    return Path(workdir) / "manifests" / protocol.name / f"seed-{seed}.npz"


def get_manifest(protocol: Protocol, pool: Pool, seed: int, workdir: Path) -> Manifest:
    """Load the frozen manifest for (protocol, seed), materialising it on first use."""
    path = manifest_path(workdir, protocol, seed)
    if path.exists():
        manifest = read_manifest(path)
        check_manifest(manifest, protocol, pool, path)
        return manifest
    manifest = build_manifest(protocol, pool, seed)
    save_manifest(manifest, path)
    return manifest
