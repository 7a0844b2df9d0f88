"""What a leaderboard entry is and what it is called, from the results store's columns alone.

The leaf of :mod:`fewshot_bench.report`: it imports no other report module (and nothing of
``methods``, ``data`` or ``tasks``), so every report module can import it at the top.

* An **entry** is one (protocol, method, config_hash, code_fingerprint, backbone) on one **task
  set**. Rows of different task sets or of different code are never pooled into one entry.
* A **task set** of a protocol is a set of frozen manifests, at most one per seed. Rows of one
  protocol fall into task sets by what made their tasks — (protocol_hash, task_source,
  data_fingerprint) — and, should one of those still hold two manifests for a seed (a sampler
  change), by the order the manifests were first used. A protocol on one task set (the usual
  case) gets the label ``""``; otherwise each task set is labelled by the short manifest hash
  of its lowest seed (``task_set`` column, see :func:`assign_task_sets`).
* **Entry labels** are the method name with its non-default parameters as run (the store's
  ``params`` column, never today's defaults), qualified by backbone, config hash, task set
  or code fingerprint only where that is needed to tell entries apart
  (:func:`entry_labels`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import PurePosixPath, PureWindowsPath

import pandas as pd

#: One entry of a protocol's leaderboard.
ENTRY_KEY = ["protocol", "method", "config_hash", "code_fingerprint", "backbone", "task_set"]
#: One entry across the protocols of a page (a row of a family or group page, a plot series);
#: ``page_set`` is added by :func:`with_page_sets`.
PAGE_KEY = ["method", "config_hash", "code_fingerprint", "backbone", "page_set"]
#: What made a task set's tasks: rows differing in any of these ran on different tasks.
TASK_ORIGIN = ["protocol_hash", "task_source", "data_fingerprint"]
#: Columns that qualify an entry label, in the order they are tried.
LABEL_DIMS = ("backbone", "config_hash", "task_set", "code_fingerprint")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SEP = re.compile(r"[-_.]")
# Trailing name parts that only say how many labels / shots / ways: "250", "5way", "1shot",
# "5w1s", "n10", "40labels", "4000l", "10lpc".
_COUNT_PART = re.compile(
    r"^(?:[nk]?\d+(?:way|ways|shot|shots|w|s|l|lpc|label|labels|x|pc)?|\d+w\d+s)$", re.IGNORECASE
)
IMPORTED = "imported:"


def safe_name(protocol: str) -> str:
    """A file-name stem for a protocol (characters outside ``[A-Za-z0-9._-]`` become ``_``)."""
    return _UNSAFE.sub("_", protocol).strip("._") or "protocol"


def short_hash(value: str, n: int = 8) -> str:
    """The first ``n`` characters of a hash (after an ``algorithm:`` prefix, if any)."""
    return str(value).rsplit(":", 1)[-1][:n]


# --------------------------------------------------------------------------- families


def protocol_family(protocol: str) -> str:
    """The protocol name without trailing count parts: ``"cifar10-250"`` → ``"cifar10"``,
    ``"miniimagenet-5way-1shot"`` → ``"miniimagenet"``, ``"imagenet-lowshot-n5"`` →
    ``"imagenet-lowshot"``. Only a fallback: the store's ``family`` column takes precedence."""
    parts = _SEP.split(protocol)
    seps = _SEP.findall(protocol)
    keep = len(parts)
    while keep > 1 and _COUNT_PART.match(parts[keep - 1]):
        keep -= 1
    out = parts[0]
    for sep, part in zip(seps[: keep - 1], parts[1:keep], strict=True):
        out += sep + part
    return out


def families(df: pd.DataFrame) -> pd.Series:
    """Family of every row: the store's ``family`` column where non-empty, else
    :func:`protocol_family` of the protocol name."""
    guessed = df["protocol"].astype(str).map(protocol_family)
    if "family" in df.columns:
        given = df["family"].fillna("").astype(str)
        return given.where(given != "", guessed)
    return guessed


# --------------------------------------------------------------------------- task sources


def parse_task_source(source: str) -> tuple[str, str, str]:
    """``(kind, file, sha256)`` of a ``task_source``: ``("sampled", "", "")``,
    ``("imported", "eps.jsonl", "ab12…")``; ``("", "", "")`` when empty; other text is
    returned as the kind."""
    source = str(source or "")
    if not source.startswith(IMPORTED):
        return source, "", ""
    rest = source[len(IMPORTED) :]
    file, sep, sha = rest.rpartition(":sha256=")
    return ("imported", file, sha) if sep else ("imported", rest, "")


def is_imported(source: str) -> bool:
    """Whether a ``task_source`` names imported episodes."""
    return str(source or "").startswith(IMPORTED)


def source_text(source: str, *, sha: bool = False) -> str:
    """``"sampled"``, ``"imported: eps.jsonl"`` (``sha``: ``"… (sha256 ab12cd34ef56…)"``)."""
    kind, file, digest = parse_task_source(source)
    if kind != "imported":
        return kind
    text = f"imported: {file}"
    return f"{text} (sha256 {digest[:12]}…)" if sha and digest else text


def tasks_text(source: str, task_set: str = "") -> str:
    """What an entry ran on, for a table cell: ``"sampled"``, ``"imported: eps.jsonl"``, with
    ``" (tasks 1a2b3c4d)"`` where its protocol has several task sets."""
    text = source_text(source)
    if not task_set:
        return text
    return f"{text} (tasks {task_set})" if text else f"tasks {task_set}"


# --------------------------------------------------------------------------- task sets


def assign_task_sets(df: pd.DataFrame) -> pd.Series:
    """Per row: ``""`` where the row's protocol ran on a single task set, else the label of the
    row's task set (see the module docstring). Needs ``protocol``, ``manifest_hash``, ``seed``,
    :data:`TASK_ORIGIN` and ``timestamp`` columns."""
    out = pd.Series("", index=df.index, dtype=object)
    for _, rows in df.groupby("protocol", sort=False):
        origin = rows[TASK_ORIGIN[0]].astype(str)
        for col in TASK_ORIGIN[1:]:
            origin = origin + "\x1f" + rows[col].astype(str)
        if origin.nunique() == 1 and rows.groupby("seed")["manifest_hash"].nunique().max() <= 1:
            continue
        first_use = (
            rows.assign(_origin=origin)
            .groupby(["_origin", "seed", "manifest_hash"])["timestamp"]
            .min()
            .reset_index()
            .sort_values(["_origin", "seed", "timestamp", "manifest_hash"])
        )
        first_use["_gen"] = first_use.groupby(["_origin", "seed"]).cumcount()
        set_of = {
            (o, s, m): (o, g)
            for o, s, m, g in first_use[["_origin", "seed", "manifest_hash", "_gen"]].itertuples(
                index=False
            )
        }
        members: dict[tuple, list[tuple[int, str]]] = {}
        for (_, s, m), key in set_of.items():
            members.setdefault(key, []).append((int(s), str(m)))
        labels = {key: short_hash(min(ms)[1]) for key, ms in members.items()}
        if len(set(labels.values())) < len(labels):  # two sets share a manifest: hash them all
            labels = {
                key: hashlib.sha256("|".join(sorted(m for _, m in ms)).encode()).hexdigest()[:8]
                for key, ms in members.items()
            }
        keys = zip(origin, rows["seed"], rows["manifest_hash"], strict=True)
        out.loc[rows.index] = [labels[set_of[(o, s, m)]] for o, s, m in keys]
    return out


def task_sets(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (protocol, task_set, seed) of a prepared frame: its manifest hash, what made
    it (:data:`TASK_ORIGIN`, ``data_note``) and when the set was first used (``first_used``, the
    earliest timestamp of its rows); only protocols with several task sets."""
    cols = ["protocol", "task_set", "seed", "manifest_hash", *TASK_ORIGIN, "data_note"]
    sub = df[df["task_set"] != ""]
    if sub.empty:
        return pd.DataFrame(columns=[*cols, "first_used"])
    first = sub.groupby(["protocol", "task_set"])["timestamp"].min().rename("first_used")
    return (
        sub[cols]
        .drop_duplicates(["protocol", "task_set", "seed"])
        .merge(first.reset_index(), on=["protocol", "task_set"])
        .sort_values(["protocol", "task_set", "seed"])
        .reset_index(drop=True)
    )


def with_page_sets(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (rows or :func:`~fewshot_bench.report.tables.summarise` rows, with ``protocol``
    and ``task_set``) with a ``page_set`` column: the task set that tells an entry's rows apart
    on a page spanning protocols. ``""`` for an entry (method, config, code, backbone) that ran
    on at most one task set of every protocol — one row across the page; else its task set, so
    each task set of it is a row of its own (never one row mixing two task sets of a
    protocol)."""
    base = ["method", "config_hash", "code_fingerprint", "backbone"]
    if frame.empty:
        return frame.assign(page_set=pd.Series(dtype=object))
    per_protocol = frame.groupby([*base, "protocol"])["task_set"].transform("nunique")
    split = per_protocol.groupby([frame[c] for c in base]).transform("max") > 1
    return frame.assign(page_set=frame["task_set"].where(split, ""))


# --------------------------------------------------------------------------- entry labels


def format_params(params: object) -> str:
    """The store's ``params`` (JSON of the parameters that differ from the method's defaults,
    as run) as ``"k=v, k2=v2"``, keys sorted, file paths shortened to the file name; ``""``
    for none. Text that is not a JSON object is returned as it is (already formatted)."""
    if params is None or (isinstance(params, float) and params != params):
        return ""
    text = str(params).strip()
    if not text:
        return ""
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    if not isinstance(doc, dict):
        return text
    parts = []
    for key, value in sorted(doc.items()):
        if isinstance(value, str) and ("/" in value or "\\" in value):
            value = (PureWindowsPath(value) if "\\" in value else PurePosixPath(value)).name
        elif isinstance(value, dict | list):
            value = json.dumps(value, sort_keys=True, separators=(",", ":"))
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def entry_name(method: str, params: str) -> str:
    """``method`` with its non-default parameters: ``"finetune (init=conv4.pt)"``."""
    return f"{method} ({params})" if params else method


def short_backbone(spec: str) -> str:
    """A readable backbone name: ``"checkpoint:/x/conv4-ce.pt"`` → ``"conv4-ce.pt"``; other
    ``prefix:path`` specs keep their prefix (``"prefix:file"``); ``"pixels"`` stays as it is.
    Several backbones joined by ``", "`` are shortened one by one."""
    if ", " in spec:
        return ", ".join(short_backbone(s) for s in spec.split(", "))
    prefix, sep, arg = spec.partition(":")
    if not sep or not re.search(r"[/\\]", arg):
        return spec
    name = PureWindowsPath(arg).name if "\\" in arg else PurePosixPath(arg).name
    name = name or arg
    return name if prefix == "checkpoint" else f"{prefix}:{name}"


def _dim_text(dim: str, value: str) -> str:
    if not value:
        return ""
    if dim == "backbone":
        return short_backbone(value)
    if dim == "config_hash":
        return value[:8]
    if dim == "code_fingerprint":
        return f"code {short_hash(value)}"
    return f"tasks {value}"


def _column(table: pd.DataFrame, name: str) -> list[str]:
    if name not in table.columns:
        return [""] * len(table)
    return ["" if v is None or v != v else str(v) for v in table[name]]


def entry_labels(table: pd.DataFrame) -> list[str]:
    """A label per row of ``table`` (one row per entry, or several rows per entry, e.g. one per
    protocol): ``entry_name(method, params)``, and where several entries share that name, the
    fewest of backbone (short), config hash, task set (``"tasks 5e6f7a8b"``) and code
    fingerprint (``"code 1a2b3c4d"``), tried in that order, that tell this entry from the others: ``"lp [conv4.pt]"``,
    ``"lp [pixels, 1a2b3c4d]"``. Missing columns count as empty."""
    methods = _column(table, "method")
    params = [format_params(p) for p in _column(table, "params")]
    dims = {d: _column(table, d) for d in LABEL_DIMS}
    names = [entry_name(m, p) for m, p in zip(methods, params, strict=True)]
    keys = [
        (n, m, *(dims[d][i] for d in LABEL_DIMS))
        for i, (n, m) in enumerate(zip(names, methods, strict=True))
    ]
    entries = list(dict.fromkeys(keys))
    by_name: dict[str, list[tuple]] = {}
    for key in entries:
        by_name.setdefault(key[0], []).append(key)
    label: dict[tuple, str] = {}
    for name, group in by_name.items():
        if len(group) == 1:
            label[group[0]] = name
            continue
        values = {d: [k[2 + j] for k in group] for j, d in enumerate(LABEL_DIMS)}
        varying = [j for j, d in enumerate(LABEL_DIMS) if len(set(values[d])) > 1]
        for key in group:
            chosen = varying
            for n in range(1, len(varying) + 1):
                prefix = [key[2 + j] for j in varying[:n]]
                if sum([k[2 + j] for j in varying[:n]] == prefix for k in group) == 1:
                    chosen = varying[:n]
                    break
            parts = [t for j in chosen if (t := _dim_text(LABEL_DIMS[j], key[2 + j]))]
            label[key] = f"{name} [{', '.join(parts)}]" if parts else name
    seen: dict[str, int] = {}
    for key in entries:  # last resort (e.g. two methods formatting to one name): number them
        text = label[key]
        seen[text] = seen.get(text, 0) + 1
        if seen[text] > 1:
            label[key] = f"{text} #{seen[text]}"
    return [label[k] for k in keys]
