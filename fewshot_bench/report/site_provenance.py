"""The provenance panel of a leaderboard-site entry: the ``fsbench run`` line that reproduces it,
and the parameters, hashes, seeds, hardware and wall time its store rows record. All text from
the store is HTML-escaped (plugin authors choose method names and parameters)."""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Sequence
from html import escape

import pandas as pd

from fewshot_bench.report.entries import format_params, is_imported, source_text
from fewshot_bench.report.tables import Reported, _fmt_mean_ci

__all__ = ["panel", "reproduce_command"]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _e(value: object) -> str:
    """Text for HTML (element content or a quoted attribute)."""
    return escape("" if value is None else str(value), quote=True)


def _is_nan(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _join(values: pd.Series) -> str:
    return ", ".join(sorted({str(v) for v in values if not _is_nan(v) and str(v)}))


def _wall(rows: pd.DataFrame) -> float:
    """The summed ``seconds`` of ``rows`` (NaN when none was recorded)."""
    return float(rows["seconds"].sum()) if rows["seconds"].notna().any() else math.nan


def _duration(seconds: float, *, short: bool = False) -> str:
    """``"82.0 s (1 min 22 s)"``; ``short``: ``"1 min 22 s"``."""
    if _is_nan(seconds):
        return "not recorded"
    if seconds < 60:
        return f"{seconds:.1f} s"
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    clock = f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"
    return clock if short else f"{seconds:,.1f} s ({clock})"


# --------------------------------------------------------------------------- the command


def _toml(value: object) -> str:
    """A value as ``fsbench run -m name:key=value`` reads it (TOML; ``None`` as ``None``)."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if not math.isinf(value) and not math.isnan(value) else str(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (
            f"{k if _BARE_KEY.match(str(k)) else json.dumps(str(k))} = {_toml(v)}"
            for k, v in value.items()
        )
        return "{" + ", ".join(items) + "}"
    return json.dumps(str(value))  # a TOML basic string


def reproduce_command(rows: pd.DataFrame) -> tuple[str, list[str]]:
    """The ``fsbench run`` line that reruns one entry's tasks (its rows of the store), and
    notes on what it cannot say (imported episodes, plugins, gaps in the task indices)."""
    first = rows.iloc[0]
    notes: list[str] = []
    spec = str(first["method"])
    try:
        params = json.loads(str(first["params"] or "{}"))
    except ValueError:
        params = None
    if isinstance(params, dict) and params:
        spec += ":" + ",".join(f"{k}={_toml(v)}" for k, v in sorted(params.items()))
    elif params is None:
        notes.append("the stored parameters are not JSON; see Parameters")
    args = ["fsbench", "run", str(first["protocol"]), "-m", spec]
    backbone = str(first["backbone"])
    if backbone:
        args += ["--backbone", backbone]
    budget = rows["budget"].dropna()
    if len(budget):
        args += ["--budget", str(int(budget.iloc[0]))]
    seeds = sorted({int(s) for s in rows["seed"]})
    args += ["--seeds", *map(str, seeds)]
    per_seed = rows.groupby("seed")["task_index"].agg(["max", "count"])
    if (per_seed["max"] + 1 == per_seed["count"]).all():
        args += ["--max-tasks", str(int(per_seed["count"].max()))]
        if per_seed["count"].nunique() > 1:
            notes.append("seeds ran different numbers of tasks; the command runs the most")
    else:
        notes.append("the stored tasks are not the first N of each seed")
    if rows["task_source"].map(is_imported).any():
        src = source_text(str(first["task_source"]))
        notes.append(
            f"tasks were imported ({src}): run `fsbench episodes PROTOCOL --import FILE` first"
        )
    return " ".join(shlex.quote(a) for a in args), notes


def _dl(items: Sequence[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def _code(text: str) -> str:
    return f'<span class="hash">{_e(text)}</span>' if text else '<span class="empty">none</span>'


def _paper(item: object) -> tuple[float, str, float]:
    """(value, source, ± or NaN) of a reported number ``value | (value, source[, ci])``."""
    if isinstance(item, tuple | list):
        source = str(item[1]) if len(item) > 1 and item[1] is not None else ""
        ci = float(item[2]) if len(item) > 2 and item[2] is not None else math.nan
        return float(item[0]), source, ci
    return float(item), "", math.nan


def panel(row: pd.Series, rows: pd.DataFrame, anchor: str, reported: Reported) -> str:
    """The provenance panel of one entry (``row``: its leaderboard row, ``rows``: its store rows)."""
    command, notes = reproduce_command(rows)
    params = format_params(row["params"])
    try:
        config = json.dumps(json.loads(str(rows["config"].iloc[0])), indent=2, sort_keys=True)
    except ValueError:
        config = str(rows["config"].iloc[0])
    seeds = sorted({int(s) for s in rows["seed"]})
    per_seed = rows.groupby("seed").size()
    wall = _wall(rows)
    per_task = row["seconds"]
    stamps = sorted(t for t in rows["timestamp"] if t)
    paper = reported.get(str(row["method"]))
    items = [
        ("Protocol", _e(row["protocol"])),
        ("Method", _e(row["method"])),
        ("Setting", _e(row["setting"])),
        ("Parameters (non-default, as run)", _code(params) if params else "defaults"),
        ("Backbone", _code(str(row["backbone"]))),
        ("Backbone hash", _code(_join(rows["backbone_hash"]))),
        ("Config hash", _code(str(row["config_hash"]))),
        ("Code fingerprint", _code(str(row["code_fingerprint"]))),
        ("Manifests (seed:hash)", _code(str(row["manifests"]))),
        ("Protocol hash", _code(_join(rows["protocol_hash"]))),
        ("Data fingerprint", _code(_join(rows["data_fingerprint"]))),
        ("Data note", _e(_join(rows["data_note"])) or '<span class="empty">none</span>'),
        ("Tasks", _e(f"{len(rows)} ({source_text(_join(rows['task_source'])) or 'unknown'})")),
        (
            "Seeds",
            _e(", ".join(f"{s} ({int(per_seed[s])} tasks)" for s in seeds)),
        ),
        ("95% CI over", _e(row["ci_over"])),
        ("Accuracy (%)", _e(_fmt_mean_ci(row["accuracy"], row["ci95"], 2))),
        ("Wall time (sum over tasks)", _e(_duration(wall))),
        ("Seconds per task", _e("" if _is_nan(per_task) else f"{per_task:.3f}")),
        ("Budget", _e("" if _is_nan(row["budget"]) else f"{row['budget']:.0f}") or "none"),
        ("Device", _e(_join(rows["device"]))),
        ("Hardware", _e(_join(rows["hardware"]))),
        ("Git commit", _code(_join(rows["git_commit"]))),
        ("Package version", _e(_join(rows["package_version"]))),
        ("Recorded", _e(f"{stamps[0]} – {stamps[-1]}" if stamps else "")),
    ]
    if paper is not None:
        value, source, ci = _paper(paper)
        text = f"{value:.2f}" if _is_nan(ci) else f"{value:.2f} ± {ci:.2f}"
        if source:
            text += f" — {source}"
        text += f"; measured − paper {row['accuracy'] - value:+.2f} pp"
        items.append(("Paper (run card)", _e(text)))
    note_html = "".join(f'<p class="note">Note: {_e(n)}.</p>' for n in notes)
    return (
        f'<section class="prov" id="{anchor}"><h3>Provenance: {_e(row["entry"])} on '
        f"{_e(row['protocol'])}</h3>"
        f"<p>Reproduce (from the repository root; add <code>--workdir</code>, "
        f"<code>--data-root</code> as needed):</p><pre><code>{_e(command)}</code></pre>{note_html}"
        f"{_dl(items)}<details><summary>Full configuration (what the config hash covers)"
        f"</summary><pre><code>{_e(config)}</code></pre></details>"
        f'<p><a href="#row-{anchor}">back to the table</a></p></section>'
    )
