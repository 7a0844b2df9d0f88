"""Benchmark protocols: TOML files in ``episodes/`` that say which tasks to draw from which data."""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot_bench.data.base import LabeledData
from fewshot_bench.errors import ProtocolError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROTOCOL_DIR_ENV = "FSBENCH_PROTOCOLS"
KINDS = ("episodic", "ssl")

EPISODE_DEFAULTS: dict[str, Any] = {
    "n_way": 5,
    "k_shot": 1,
    "n_query": 15,
    "n_unlabeled": 0,
    "n_distractor": 0,
    "labeled_fraction": 1.0,
    "n_tasks": 600,
    "split_seed": 0,
}
RUN_DEFAULTS: dict[str, Any] = {"seeds": [0], "backbone": "pixels", "top5": False}


def builtin_protocol_dir() -> Path:
    """The ``episodes/`` folder shipped beside the package (source checkout or installed data)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "episodes", here.parents[1] / "episodes"):
        if candidate.is_dir():
            return candidate
    return here.parents[2] / "episodes"


@dataclass(frozen=True)
class Protocol:
    """One concrete protocol: a dataset pool plus the rule that draws its tasks.

    ``kind == "episodic"``: ``n_tasks`` N-way K-shot episodes per seed (``episodes`` table).
    ``kind == "ssl"``: one task per seed: ``n_labels`` balanced labels from ``labeled_split``,
    the rest of it unlabeled, ``query_split`` as query.
    """

    name: str
    kind: str
    description: str
    dataset: dict[str, Any]
    params: dict[str, Any]
    run: dict[str, Any]
    family: str
    source: str = ""
    reference: str = ""
    x_value: float | None = None
    x_label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def splits(self) -> list[str]:
        return list(self.dataset["splits"])

    def canonical(self) -> dict[str, Any]:
        """What determines the tasks: dataset choice and sampler parameters (not run options)."""
        ds = {k: v for k, v in self.dataset.items() if k not in ("fit_split",)}
        return {"name": self.name, "kind": self.kind, "dataset": ds, "params": self.params}

    def hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def summary(self) -> str:
        p = self.params
        ds = f"{self.dataset['name']}[{'+'.join(self.splits)}]"
        if self.kind == "episodic":
            s = f"{p['n_way']}-way {p['k_shot']}-shot, {p['n_query']} query/class"
            if p["n_unlabeled"]:
                s += f", {p['n_unlabeled']} unlabeled/class"
            if p["n_distractor"]:
                s += f", {p['n_distractor']} distractor classes"
            return f"{ds}: {s}, {p['n_tasks']} tasks/seed"
        amount = (
            f"{p['n_labels']} labels"
            if "n_labels" in p
            else f"{100 * p['label_fraction']:g}% labels"
        )
        return f"{ds}: {amount} (balanced) from {p['labeled_split']}, query {p['query_split']}"


def _check_keys(table: dict, allowed: set[str], where: str, source: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise ProtocolError(
            f"{source}: unknown key(s) {sorted(unknown)} in [{where}]; allowed: {sorted(allowed)}"
        )


def _positive_int(value: Any, key: str, source: str, *, zero_ok: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
        bound = ">= 0" if zero_ok else ">= 1"
        raise ProtocolError(f"{source}: {key} must be an integer {bound}, got {value!r}")
    return value


def _parse(doc: dict, source: str) -> list[Protocol]:
    _check_keys(
        doc,
        {"name", "description", "reference", "dataset", "episodes", "ssl", "run"},
        "top level",
        source,
    )
    if "name" not in doc or "dataset" not in doc:
        raise ProtocolError(f"{source}: a protocol needs `name` and a [dataset] table")
    name = str(doc["name"])
    dataset = dict(doc["dataset"])
    _check_keys(
        dataset, {"name", "splits", "image_size", "fit_split", "options"}, "dataset", source
    )
    if "name" not in dataset or "splits" not in dataset:
        raise ProtocolError(
            f"{source}: [dataset] needs `name` and `splits` (a list of split names)"
        )
    if isinstance(dataset["splits"], str):
        dataset["splits"] = [dataset["splits"]]
    splits = dataset["splits"]
    if not isinstance(splits, list) or not splits or not all(isinstance(x, str) for x in splits):
        raise ProtocolError(
            f"{source}: [dataset] splits must be a non-empty list of split names, got {splits!r}"
        )
    repeated = sorted({x for x in splits if splits.count(x) > 1})
    if repeated:
        raise ProtocolError(
            f"{source}: [dataset] splits {splits} lists {', '.join(map(repr, repeated))} more than "
            "once (the pool would hold those items twice, so one image could be support and query); "
            "list each split once"
        )
    run = {**RUN_DEFAULTS, **doc.get("run", {})}
    _check_keys(run, set(RUN_DEFAULTS), "run", source)
    if not run["seeds"] or not all(isinstance(s, int) and s >= 0 for s in run["seeds"]):
        raise ProtocolError(f"{source}: [run] seeds must be a non-empty list of integers >= 0")
    common = {
        "description": str(doc.get("description", "")),
        "reference": str(doc.get("reference", "")),
        "dataset": dataset,
        "run": run,
        "family": name,
        "source": source,
    }
    has_ep, has_ssl = "episodes" in doc, "ssl" in doc
    if has_ep == has_ssl:
        raise ProtocolError(f"{source}: give exactly one of [episodes] or [ssl]")
    if has_ep:
        params = {**EPISODE_DEFAULTS, **doc["episodes"]}
        _check_keys(params, set(EPISODE_DEFAULTS), "episodes", source)
        for key in ("n_way", "k_shot", "n_tasks"):
            _positive_int(params[key], key, source)
        for key in ("n_query", "n_unlabeled", "n_distractor", "split_seed"):
            _positive_int(params[key], key, source, zero_ok=True)
        frac = params["labeled_fraction"]
        if not isinstance(frac, (int, float)) or not 0.0 < float(frac) <= 1.0:
            raise ProtocolError(f"{source}: labeled_fraction must be in (0, 1], got {frac!r}")
        params["labeled_fraction"] = float(frac)
        if params["n_query"] == 0:
            raise ProtocolError(f"{source}: n_query must be >= 1 (queries are what gets scored)")
        return [
            Protocol(
                name=name,
                kind="episodic",
                params=params,
                x_value=float(params["k_shot"]),
                x_label="shots per class",
                **common,
            )
        ]
    ssl = dict(doc["ssl"])
    _check_keys(ssl, {"labeled_split", "query_split", "n_labels", "label_fraction"}, "ssl", source)
    for key in ("labeled_split", "query_split"):
        if ssl.get(key) not in dataset["splits"]:
            raise ProtocolError(
                f"{source}: [ssl] {key} must be one of dataset.splits {dataset['splits']}"
            )
    if ssl["labeled_split"] == ssl["query_split"]:
        raise ProtocolError(
            f"{source}: [ssl] labeled_split and query_split are both {ssl['query_split']!r}, so the "
            "queries would be the labeled and unlabeled items themselves; set query_split to a "
            "held-out split (e.g. 'test')"
        )
    if ("n_labels" in ssl) == ("label_fraction" in ssl):
        raise ProtocolError(
            f"{source}: [ssl] needs exactly one of n_labels (list) or label_fraction (list)"
        )
    out = []
    if "n_labels" in ssl:
        for n in ssl["n_labels"]:
            _positive_int(n, "n_labels entries", source)
            params = {
                "labeled_split": ssl["labeled_split"],
                "query_split": ssl["query_split"],
                "n_labels": n,
            }
            out.append(
                Protocol(
                    name=f"{name}-{n}",
                    kind="ssl",
                    params=params,
                    x_value=float(n),
                    x_label="labels",
                    **copy.deepcopy(common),
                )
            )
    else:
        for frac in ssl["label_fraction"]:
            if not isinstance(frac, (int, float)) or not 0.0 < frac < 1.0:
                raise ProtocolError(
                    f"{source}: label_fraction entries must be in (0, 1), got {frac!r}"
                )
            params = {
                "labeled_split": ssl["labeled_split"],
                "query_split": ssl["query_split"],
                "label_fraction": float(frac),
            }
            pct = f"{100 * frac:g}pct"
            out.append(
                Protocol(
                    name=f"{name}-{pct}",
                    kind="ssl",
                    params=params,
                    x_value=100 * float(frac),
                    x_label="% labeled",
                    **copy.deepcopy(common),
                )
            )
    return out


def load_protocol_file(path: str | Path) -> list[Protocol]:
    """Parse one TOML protocol file into its concrete protocols (an SSL sweep gives several)."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ProtocolError(f"protocol file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProtocolError(f"{path}: invalid TOML: {exc}") from None
    return _parse(doc, str(path))


def protocol_dirs() -> list[Path]:
    import os

    dirs = [Path(p) for p in os.environ.get(PROTOCOL_DIR_ENV, "").split(os.pathsep) if p]
    return [*dirs, builtin_protocol_dir()]


def all_protocols() -> dict[str, Protocol]:
    """Every concrete protocol from ``$FSBENCH_PROTOCOLS`` folders and the built-in ``episodes/``."""
    found: dict[str, Protocol] = {}
    for folder in reversed(protocol_dirs()):
        for path in sorted(folder.glob("*.toml")):
            for proto in load_protocol_file(path):
                found[proto.name] = proto
    ordered = sorted(found.values(), key=lambda p: (p.family, p.x_value or 0.0, p.name))
    return {p.name: p for p in ordered}


def resolve_protocols(spec: str) -> list[Protocol]:
    """A protocol name, a family name (all its variants) or a path to a TOML file."""
    if spec.endswith(".toml") or Path(spec).is_file():
        return load_protocol_file(spec)
    protos = all_protocols()
    if spec in protos:
        return [protos[spec]]
    family = [p for p in protos.values() if p.family == spec]
    if family:
        return family
    raise ProtocolError(
        f"unknown protocol {spec!r}. Known: {', '.join(protos) or '(none)'}. "
        "Run `fsbench protocols` to list them, or pass a path to a .toml file."
    )


@dataclass
class Pool:
    """The items a protocol draws from: its splits concatenated, with a shared class index."""

    data: LabeledData
    split_of: np.ndarray
    split_names: list[str]

    def indices_of_split(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split_of == self.split_names.index(split))

    def fingerprint(self) -> str:
        return self.data.fingerprint()


def concat_splits(parts: list[LabeledData]) -> Pool:
    """Concatenate splits; splits with identical class lists share labels, others are offset."""
    first = parts[0]
    same_classes = all(p.class_names == first.class_names for p in parts)
    labels, class_names, offset = [], [], 0
    for p in parts:
        if same_classes:
            labels.append(p.labels)
        else:
            labels.append(p.labels + offset)
            class_names.extend(f"{p.split}:{c}" if len(parts) > 1 else c for c in p.class_names)
            offset += p.n_classes
    if same_classes:
        class_names = list(first.class_names)
    shapes = {tuple(p.data.shape[1:]) for p in parts}
    if len(shapes) > 1:
        raise ProtocolError(
            f"splits of {first.name} have different item shapes {shapes}; set image_size"
        )
    tensor = torch.cat([p.data for p in parts]) if len(parts) > 1 else first.data
    item_ids = None
    if all(p.item_ids is not None for p in parts):
        item_ids = [i for p in parts for i in p.item_ids]
    kw = {"images": tensor} if first.kind == "images" else {"features": tensor}
    data = LabeledData(
        name=first.name,
        split="+".join(p.split for p in parts),
        labels=np.concatenate(labels),
        class_names=class_names,
        item_ids=item_ids,
        meta={"notes": sorted({p.meta["note"] for p in parts if "note" in p.meta})},
        **kw,
    )
    split_of = np.concatenate([np.full(len(p), i, dtype=np.int64) for i, p in enumerate(parts)])
    return Pool(data=data, split_of=split_of, split_names=[p.split for p in parts])


def load_pool(protocol: Protocol, root: str | Path | None = None, download: bool = False) -> Pool:
    """Load and concatenate the protocol's dataset splits."""
    from fewshot_bench.data import load_dataset

    ds = protocol.dataset
    kwargs = dict(ds.get("options", {}))
    if "image_size" in ds:
        kwargs["image_size"] = ds["image_size"]
    parts = [
        load_dataset(ds["name"], split, root, download=download, **kwargs) for split in ds["splits"]
    ]
    return concat_splits(parts)
