"""Benchmark protocols: TOML files in ``episodes/`` that say which tasks to draw from which data."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot_bench.data.base import LabeledData
from fewshot_bench.errors import InputDataError, ProtocolError

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

#: What a protocol name may be: it names the folder ``<workdir>/manifests/<name>/``.
NAME_RULE = (
    "1-128 characters from letters, digits, '-', '_' and '.', not starting with '.' and "
    "without '..' (it names the folder <workdir>/manifests/<name>/)"
)
_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
#: The tables of a protocol file, with an example of each (for errors on a wrongly typed one).
_TABLE_EXAMPLES = {
    "dataset": '[dataset] on its own line, then name = "omniglot" and splits = ["test"] below it',
    "episodes": "[episodes] on its own line, then n_way = 5, k_shot = 1 ... below it",
    "ssl": '[ssl] on its own line, then labeled_split = "train", query_split = "test", '
    "n_labels = [250] below it",
    "run": "[run] on its own line, then seeds = [0, 1, 2] below it",
    "options": 'options = { path = "features.npz" } inside [dataset]',
}


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
    the rest of it unlabeled, ``query_split`` as query. Optional ``[ssl]`` keys: ``fully_labeled``
    (a class group or list of class names whose ``labeled_split`` items are all labeled; the
    balanced labels go to the other classes), ``query_classes`` (only these classes' query items
    are queries, still predicted among all classes) and ``background`` (``{dataset, split,
    options}``: extra items of another source added to the unlabeled set only).
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
            if p.get("unlabeled_pool") == "all":
                frac = 1 - p["labeled_fraction"]
                s += f", unlabeled pool: the {frac:.0%} unlabeled part of every class"
            if p.get("query_imbalance"):
                s += f", queries per class imbalanced (Dirichlet {p['query_imbalance']:g})"
            return f"{ds}: {s}, {p['n_tasks']} tasks/seed"
        amount = (
            f"{p['n_labels']} labels"
            if "n_labels" in p
            else f"{100 * p['label_fraction']:g}% labels"
        )
        s = f"{ds}: {amount} (balanced) from {p['labeled_split']}"
        if "fully_labeled" in p:
            group = _classes_shown(p["fully_labeled"])
            s += f" over the classes outside {group}, every {p['labeled_split']} item of {group} labeled"
        s += f", query {p['query_split']}"
        if "query_classes" in p:
            s += f" of {_classes_shown(p['query_classes'])} (predicted among all classes)"
        if "background" in p:
            bg = p["background"]
            s += f", background: {bg['dataset']}[{bg['split']}] unlabeled"
        return s


def _classes_shown(spec: str | list[str]) -> str:
    if isinstance(spec, str):
        return f"class group {spec!r}"
    return f"{len(spec)} listed classes"


def is_safe_name(name: object) -> bool:
    """Whether ``name`` may name a file or folder: see ``NAME_RULE``."""
    return isinstance(name, str) and bool(_NAME_RE.fullmatch(name)) and ".." not in name


def check_name(name: object, source: str, what: str = "protocol name") -> str:
    """``name`` if it is a safe file/folder name (``NAME_RULE``), else a one-line ProtocolError."""
    if not is_safe_name(name):
        raise ProtocolError(f"{source}: {what} {name!r} is not allowed: use {NAME_RULE}")
    return str(name)


def _table(doc: dict, key: str, source: str, where: str = "") -> dict:
    """``doc[key]`` (``{}`` when absent) if it is a TOML table, else a ProtocolError saying how."""
    value = doc.get(key, {})
    if not isinstance(value, dict):
        example = _TABLE_EXAMPLES.get(key, f"[{key}] with its keys below it")
        if key == "dataset" and isinstance(value, str):
            example = example.replace('"omniglot"', json.dumps(value))
        raise ProtocolError(
            f"{source}: {where}{key} = {_shown(value)} must be a table, not "
            f"{_with_article(_toml_type(value))}: "
            f"write {example}"
        )
    return dict(value)


def _shown(value: object) -> str:
    """A value as TOML would spell it (near enough for an error message)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (str, int, float, list)):
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            pass
    return repr(value)


def _with_article(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    return {str: "string", int: "integer", float: "number", list: "list"}.get(
        type(value), type(value).__name__
    )


def _string(value: object, key: str, source: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(
            f"{source}: {key} must be a string (in quotes), got {_toml_type(value)} {value!r}"
        )
    return value


def _number_list(value: object, key: str, source: str, example: str) -> list:
    """A list of numbers; a single number is taken as a one-element list."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
    ):
        raise ProtocolError(
            f"{source}: [ssl] {key} must be a non-empty list of numbers, e.g. {key} = {example}, "
            f"got {value!r}"
        )
    return value


def _check_keys(table: dict, allowed: set[str], where: str, source: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise ProtocolError(
            f"{source}: unknown key(s) {sorted(unknown)} in [{where}]; allowed: {sorted(allowed)}"
        )


def _positive_int(value: Any, key: str, source: str, *, zero_ok: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
        bound = ">= 0" if zero_ok else ">= 1"
        hint = ""
        if isinstance(value, str):
            hint = " (a string: write the number without quotes)"
        elif isinstance(value, float) and value.is_integer():
            hint = f" (write {int(value)}, without the decimal point)"
        raise ProtocolError(f"{source}: {key} must be an integer {bound}, got {value!r}{hint}")
    return value


def _parse(doc: dict, source: str) -> list[Protocol]:
    _check_keys(
        doc,
        {"name", "description", "reference", "dataset", "episodes", "shapes", "ssl", "run"},
        "top level",
        source,
    )
    if "name" not in doc or "dataset" not in doc:
        raise ProtocolError(f"{source}: a protocol needs `name` and a [dataset] table")
    name = check_name(doc["name"], source)
    dataset = _table(doc, "dataset", source)
    _check_keys(
        dataset, {"name", "splits", "image_size", "fit_split", "options"}, "dataset", source
    )
    if "name" not in dataset or "splits" not in dataset:
        raise ProtocolError(
            f"{source}: [dataset] needs `name` and `splits` (a list of split names)"
        )
    _string(dataset["name"], "[dataset] name", source)
    if "fit_split" in dataset:
        _string(dataset["fit_split"], "[dataset] fit_split", source)
    if "image_size" in dataset:
        _positive_int(dataset["image_size"], "[dataset] image_size", source)
    if "options" in dataset:
        dataset["options"] = _table(dataset, "options", source, "[dataset] ")
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
    run = {**RUN_DEFAULTS, **_table(doc, "run", source)}
    _check_keys(run, set(RUN_DEFAULTS), "run", source)
    seeds = run["seeds"]
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise ProtocolError(
            f"{source}: [run] seeds must be a non-empty list of integers >= 0, e.g. "
            f"seeds = [0, 1, 2], got {seeds!r}"
        )
    _string(run["backbone"], "[run] backbone", source)
    if not isinstance(run["top5"], bool):
        raise ProtocolError(f"{source}: [run] top5 must be true or false, got {run['top5']!r}")
    common = {
        "description": _string(doc.get("description", ""), "description", source),
        "reference": _string(doc.get("reference", ""), "reference", source),
        "dataset": dataset,
        "run": run,
        "family": name,
        "source": source,
    }
    has_ep, has_ssl = "episodes" in doc, "ssl" in doc
    if has_ep == has_ssl:
        raise ProtocolError(f"{source}: give exactly one of [episodes] or [ssl]")
    if "shapes" in doc and not has_ep:
        raise ProtocolError(f"{source}: [shapes] varies an [episodes] table; add one")
    if has_ep and "shapes" in doc:
        return _shape_family(doc, source, name, common)
    if has_ep:
        params = {**EPISODE_DEFAULTS, **_table(doc, "episodes", source)}
        _check_keys(
            params, {*EPISODE_DEFAULTS, "query_imbalance", "unlabeled_pool"}, "episodes", source
        )
        _check_unlabeled_pool(params, source)
        imbalance = params.pop("query_imbalance", 0)
        if isinstance(imbalance, bool) or not isinstance(imbalance, (int, float)) or imbalance < 0:
            raise ProtocolError(
                f"{source}: query_imbalance must be a number >= 0 (the Dirichlet concentration of "
                f"the query classes; 0: balanced), got {imbalance!r}"
            )
        if imbalance:  # only then, so balanced protocols keep their hash
            params["query_imbalance"] = float(imbalance)
        for key in ("n_way", "k_shot", "n_tasks"):
            _positive_int(params[key], key, source)
        for key in ("n_query", "n_unlabeled", "n_distractor", "split_seed"):
            _positive_int(params[key], key, source, zero_ok=True)
        frac = params["labeled_fraction"]
        if (
            isinstance(frac, bool)
            or not isinstance(frac, (int, float))
            or not 0.0 < float(frac) <= 1.0
        ):
            raise ProtocolError(f"{source}: labeled_fraction must be in (0, 1], got {frac!r}")
        params["labeled_fraction"] = float(frac)
        if params["n_query"] == 0:
            raise ProtocolError(f"{source}: n_query must be >= 1 (queries are what gets scored)")
        return [
            Protocol(
                name=check_name(name, source),
                kind="episodic",
                params=params,
                x_value=float(params["k_shot"]),
                x_label="shots per class",
                **common,
            )
        ]
    ssl = _table(doc, "ssl", source)
    _check_keys(
        ssl,
        {"labeled_split", "query_split", "n_labels", "label_fraction", *SSL_EXTRAS},
        "ssl",
        source,
    )
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
    extras = _ssl_extras(ssl, source)
    out = []
    if "n_labels" in ssl:
        for n in _number_list(ssl["n_labels"], "n_labels", source, "[250, 4000]"):
            _positive_int(n, "[ssl] n_labels entries", source)
            params = {
                "labeled_split": ssl["labeled_split"],
                "query_split": ssl["query_split"],
                "n_labels": n,
                **copy.deepcopy(extras),
            }
            out.append(
                Protocol(
                    name=check_name(f"{name}-{n}", source, "protocol name (with its n_labels)"),
                    kind="ssl",
                    params=params,
                    x_value=float(n),
                    x_label="labels",
                    **copy.deepcopy(common),
                )
            )
    else:
        for frac in _number_list(ssl["label_fraction"], "label_fraction", source, "[0.01, 0.1]"):
            if not 0.0 < frac < 1.0:
                raise ProtocolError(
                    f"{source}: label_fraction entries must be in (0, 1), got {frac!r}"
                )
            params = {
                "labeled_split": ssl["labeled_split"],
                "query_split": ssl["query_split"],
                "label_fraction": float(frac),
                **copy.deepcopy(extras),
            }
            pct = f"{100 * frac:g}pct"
            out.append(
                Protocol(
                    name=check_name(f"{name}-{pct}", source, "protocol name (with its fraction)"),
                    kind="ssl",
                    params=params,
                    x_value=100 * float(frac),
                    x_label="% labeled",
                    **copy.deepcopy(common),
                )
            )
    return out


#: Optional ``[ssl]`` keys; each is kept in the parameters only when given, so protocols
#: without them keep their hash.
SSL_EXTRAS = ("fully_labeled", "query_classes", "background")
BACKGROUND_KEYS = ("dataset", "split", "options")
_CLASSES_HINT = (
    'a class group the dataset exposes (e.g. "base" or "novel" with imagenet-features option '
    'subset = "lowshot-test") or a list of class names'
)


def _class_spec(value: object, key: str, source: str) -> str | list[str]:
    """A class-group name or a non-empty list of distinct class names."""
    if isinstance(value, str) and value:
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(x, str) and x for x in value)
        and len(set(value)) == len(value)
    ):
        return list(value)
    raise ProtocolError(
        f"{source}: [ssl] {key} must be {_CLASSES_HINT} (distinct, non-empty strings), "
        f"got {_shown(value)}"
    )


def _ssl_extras(ssl: dict, source: str) -> dict[str, Any]:
    """The optional ``[ssl]`` keys, validated: ``fully_labeled`` (classes whose labeled-split
    items are all labeled), ``query_classes`` (classes whose query-split items are the queries)
    and ``background`` (a table ``{dataset, split, options}`` naming extra unlabeled items)."""
    out: dict[str, Any] = {}
    for key in ("fully_labeled", "query_classes"):
        if key in ssl:
            out[key] = _class_spec(ssl[key], key, source)
    if "background" in ssl:
        bg = _table(ssl, "background", source, "[ssl] ")
        example = (
            'background = { dataset = "features", split = "all", options = { path = "extra.npy" } }'
        )
        _check_keys(bg, set(BACKGROUND_KEYS), "ssl.background", source)
        for key in ("dataset", "split"):
            if not isinstance(bg.get(key), str) or not bg[key]:
                raise ProtocolError(
                    f"{source}: [ssl] background needs {key} (a string), e.g. {example}"
                )
        if "options" in bg:
            bg["options"] = _table(bg, "options", source, "[ssl] background ")
        out["background"] = bg
    return out


#: What ``[shapes]`` may vary, and how a variant's name shows it.
def _check_unlabeled_pool(params: dict, source: str) -> None:
    """``unlabeled_pool``: ``"episode"`` (default: ``n_unlabeled`` items per episode class plus
    ``n_distractor`` distractor classes) or ``"all"`` (every task's pool is the unlabeled part of
    every class of the split, as in the metric-transfer few-shot protocol). Only ``"all"`` is
    kept in the parameters, so protocols without the key keep their hash."""
    pool = params.pop("unlabeled_pool", "episode")
    if pool == "episode":
        return
    if pool != "all":
        raise ProtocolError(f"{source}: unlabeled_pool must be 'episode' or 'all', got {pool!r}")
    if not params.get("labeled_fraction", 1.0) < 1.0:
        raise ProtocolError(
            f"{source}: unlabeled_pool = 'all' takes the unlabeled part of every class, so it "
            "needs labeled_fraction < 1 (e.g. 0.4)"
        )
    if params.get("n_unlabeled") or params.get("n_distractor"):
        raise ProtocolError(
            f"{source}: unlabeled_pool = 'all' gives every task the whole unlabeled part; "
            "drop n_unlabeled and n_distractor"
        )
    params["unlabeled_pool"] = "all"


SHAPE_KEYS = ("n_way", "k_shot", "n_query", "pool", "query_imbalance", "max_per_class")


def _shape_family(doc: dict, source: str, name: str, common: dict) -> list[Protocol]:
    """One protocol per combination of the ``[shapes]`` lists (a shape-robustness family):
    ``n_way``, ``k_shot``, ``n_query`` lists of integers, ``pool`` a list of ``[n_unlabeled,
    n_distractor]`` pairs, ``query_imbalance`` a list of Dirichlet concentrations (0: balanced)."""
    shapes = _table(doc, "shapes", source)
    _check_keys(shapes, set(SHAPE_KEYS), "shapes", source)
    base = _table(doc, "episodes", source)
    limit = shapes.get("max_per_class")
    if limit is not None:
        _positive_int(limit, "[shapes] max_per_class", source)
    lists = {}
    for key in SHAPE_KEYS[:-1]:
        value = shapes.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not value:
            raise ProtocolError(f"{source}: [shapes] {key} must be a non-empty list, got {value!r}")
        lists[key] = value
    out = []
    for combo in itertools.product(*lists.values()):
        shape = dict(zip(lists, combo, strict=True))
        episodes = dict(base)
        tag = []
        for key in ("n_way", "k_shot", "n_query", "query_imbalance"):
            if key in shape:
                episodes[key] = shape[key]
        if "pool" in shape:
            pair = shape["pool"]
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ProtocolError(
                    f"{source}: [shapes] pool entries are [n_unlabeled, n_distractor] pairs, "
                    f"got {pair!r}"
                )
            episodes["n_unlabeled"], episodes["n_distractor"] = pair
        e = {**EPISODE_DEFAULTS, **episodes}
        if limit is not None and e["k_shot"] + e["n_query"] + e["n_unlabeled"] > limit:
            continue  # a shape the dataset's classes cannot hold (e.g. 5 + 15 + 5 > 20 images)
        tag.append(f"{e['n_way']}w{e['k_shot']}s-q{e['n_query']}")
        if e["n_unlabeled"]:
            tag.append(f"u{e['n_unlabeled']}d{e['n_distractor']}")
        if episodes.get("query_imbalance"):
            tag.append(f"dir{float(episodes['query_imbalance']):g}")
        variant = {k: v for k, v in doc.items() if k != "shapes"}
        variant["name"] = f"{name}-{'-'.join(tag)}"
        variant["episodes"] = episodes
        (protocol,) = _parse(copy.deepcopy(variant), source)
        out.append(dataclasses.replace(protocol, family=name))
    return out


def load_protocol_file(path: str | Path) -> list[Protocol]:
    """Parse one TOML protocol file into its concrete protocols (an SSL sweep gives several)."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProtocolError(f"protocol file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProtocolError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ProtocolError(f"{path}: not UTF-8 text (a protocol is a TOML file)") from None
    except OSError as exc:
        raise ProtocolError(f"protocol file {path} cannot be read ({exc.strerror})") from None
    return _parse(doc, str(path))


def protocol_dirs() -> list[Path]:
    """``$FSBENCH_PROTOCOLS`` folders, then the built-in ``episodes/``."""
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


#: The split name and class name of an ``[ssl] background`` pool's items inside a Pool.
BACKGROUND = "<background>"


@dataclass
class Pool:
    """The items a protocol draws from: its splits concatenated, with a shared class index.

    With an ``[ssl] background`` the background items come last, as split ``BACKGROUND`` with
    the extra class ``background_class`` (the last class), which no task ever lists."""

    data: LabeledData
    split_of: np.ndarray
    split_names: list[str]
    background_class: int | None = None

    def indices_of_split(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split_of == self.split_names.index(split))

    @property
    def n_task_classes(self) -> int:
        """The dataset's classes (the background's class, if any, not counted)."""
        return self.data.n_classes - (self.background_class is not None)

    @property
    def class_groups(self) -> dict[str, list[str]]:
        """Named groups of class names the dataset exposes (e.g. ``base``, ``novel``)."""
        return dict(self.data.meta.get("class_groups", {}))

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
    meta: dict[str, Any] = {"notes": sorted({p.meta["note"] for p in parts if "note" in p.meta})}
    groups = first.meta.get("class_groups")
    if same_classes and groups and all(p.meta.get("class_groups") == groups for p in parts):
        meta["class_groups"] = groups
    data = LabeledData(
        name=first.name,
        split="+".join(p.split for p in parts),
        labels=np.concatenate(labels),
        class_names=class_names,
        item_ids=item_ids,
        meta=meta,
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
    pool = concat_splits(parts)
    if protocol.kind == "ssl" and "background" in protocol.params:
        bg = protocol.params["background"]
        bg_kwargs = dict(bg.get("options", {}))
        if "image_size" in ds and pool.data.kind == "images":
            bg_kwargs.setdefault("image_size", ds["image_size"])
        extra = load_dataset(bg["dataset"], bg["split"], root, download=download, **bg_kwargs)
        pool = add_background(pool, extra, protocol.name)
    return pool


def add_background(pool: Pool, extra: LabeledData, name: str = "protocol") -> Pool:
    """``pool`` with ``extra``'s items appended as unlabeled background (``Pool.background_class``).

    ``extra``'s labels and class names are dropped. Its items must be of the pool's kind and
    shape (e.g. the same feature dimension); float features take the pool's dtype. Items of the
    pool's own dataset (same item ids) are refused, so no item is in the pool twice."""
    from fewshot_bench.data.registry import get_info

    data, where = pool.data, f"{extra.name}[{extra.split}]"
    if extra.kind != data.kind:
        raise InputDataError(
            f"{name}: the [ssl] background {where} holds {extra.kind} but the pool ({data.name}) "
            f"holds {data.kind}; use a background of {data.kind}"
        )
    if tuple(extra.data.shape[1:]) != tuple(data.data.shape[1:]):
        what = "feature dimension" if data.kind == "features" else "image shape"
        raise InputDataError(
            f"{name}: the [ssl] background {where} has {what} {tuple(extra.data.shape[1:])} but "
            f"the pool ({data.name}) has {tuple(data.data.shape[1:])}; compute the background "
            "with the same backbone (or image size) as the pool"
        )
    if len(extra) == 0:
        raise InputDataError(f"{name}: the [ssl] background {where} holds no items")
    try:
        same = get_info(extra.name).name == get_info(data.name).name
    except ProtocolError:  # a loader that names its data otherwise than the registry
        same = extra.name == data.name
    if same and data.item_ids and extra.item_ids:
        shared = set(data.item_ids).intersection(extra.item_ids)
        if shared:
            raise ProtocolError(
                f"{name}: the [ssl] background {where} shares {len(shared)} items with the pool "
                f"(e.g. {sorted(shared)[0]}), which would then be in two roles; use a background "
                "split that holds other items"
            )
    tensor = extra.data.to(data.data.dtype) if data.kind == "features" else extra.data
    item_ids = None
    if data.item_ids is not None:
        ids = extra.item_ids or [str(i) for i in range(len(extra))]
        item_ids = [*data.item_ids, *(f"{BACKGROUND}/{where}/{i}" for i in ids)]
    background_class = data.n_classes
    kw = {data.kind: torch.cat([data.data, tensor])}
    merged = LabeledData(
        name=data.name,
        split=f"{data.split}+{BACKGROUND}",
        labels=np.concatenate([data.labels, np.full(len(extra), background_class)]),
        class_names=[*data.class_names, BACKGROUND],
        item_ids=item_ids,
        meta={**{k: v for k, v in data.meta.items() if k != "fingerprint"}, "background": where},
        **kw,
    )
    split_of = np.concatenate([pool.split_of, np.full(len(extra), len(pool.split_names))])
    return Pool(
        data=merged,
        split_of=split_of,
        split_names=[*pool.split_names, BACKGROUND],
        background_class=background_class,
    )
