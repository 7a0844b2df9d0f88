"""Full schema-2 result rows (every column of ``fewshot_bench.run.store.ResultRow``) for the
report tests: ``v2_row(...)`` for one row, ``v2_frame(rows)`` for a frame of them."""

from __future__ import annotations

import hashlib
import json

import pandas as pd

from fewshot_bench.report import protocol_family
from fewshot_bench.run.store import COLUMNS

SHA = "ab12cd34ef56" + "0" * 52


def digest(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def manifest_hash(protocol: str, seed: int, tasks: str = "") -> str:
    """A manifest hash per (protocol, seed); ``tasks`` names another task set of them."""
    return digest("manifest", protocol, seed, tasks)


def imported(file: str = "episodes.jsonl", sha: str = SHA) -> str:
    """A ``task_source`` of imported episodes."""
    return f"imported:{file}:sha256={sha}"


def v2_row(
    protocol: str,
    method: str,
    seed: int,
    task_index: int,
    accuracy: float,
    *,
    tasks: str = "",
    **kw: object,
) -> dict:
    """One store row; keyword arguments override columns. ``tasks`` changes the manifest hash
    (and only it) to that of another task set of the same (protocol, seed)."""
    row = {
        "protocol": protocol,
        "family": protocol_family(protocol),
        "protocol_hash": digest("protocol", protocol)[:16],
        "manifest_hash": manifest_hash(protocol, seed, tasks),
        "task_source": "sampled",
        "data_fingerprint": digest("data", protocol_family(protocol)),
        "data_note": "",
        "method": method,
        "config_hash": f"cfg_{method}_0123456789",
        "code_fingerprint": digest("code", "v1"),
        "params": "{}",
        "config": json.dumps({"method": method, "params": {}}),
        "setting": "transductive",
        "backbone": "pixels",
        "backbone_hash": "",
        "budget": None,
        "seed": seed,
        "task_index": task_index,
        "accuracy": accuracy,
        "top5": None,
        "n_query": 75,
        "seconds": 0.5,
        "device": "cpu",
        "hardware": "test cpu",
        "x_value": 1.0,
        "x_label": "shots per class",
        "package_version": "0.1.0",
        "git_commit": "",
        "timestamp": "2024-05-01T00:00:00",
    }
    unknown = set(kw) - set(row)
    assert not unknown, f"not store columns: {sorted(unknown)}"
    row.update(kw)
    assert sorted(row) == sorted(COLUMNS), "report_rows is out of date with the store schema"
    return row


def v2_frame(rows: list[dict]) -> pd.DataFrame:
    """A frame with the store's columns in the store's order."""
    return pd.DataFrame(rows, columns=COLUMNS)
