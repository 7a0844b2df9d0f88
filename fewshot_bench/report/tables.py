"""Summary tables, leaderboards and paired-comparison matrices, and their renderers.

Tables are plain DataFrames with numeric columns (accuracy in percent); the renderers
(:func:`to_markdown`, :func:`to_latex`) format known columns as ``"98.12 ± 0.21"``, while
:func:`to_csv` keeps numbers as numbers for further analysis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from fewshot_bench.atomic import write_text_atomic
from fewshot_bench.report.entries import (
    ENTRY_KEY,
    entry_labels,
    families,
    format_params,
    short_hash,
    tasks_text,
)
from fewshot_bench.report.stats import (
    ReportError,
    _paired_from_diffs,
    aggregate,
    format_p,
    paired_differences,
    prepare,
    shares_positions_only,
)

Reported = Mapping[str, "tuple[float, str] | float"]

#: Columns of :func:`summarise` (accuracy, CI, top-5 and reported values in percent). One row
#: per entry: (protocol, method, config_hash, code_fingerprint, backbone, task_set).
SUMMARY_COLUMNS = [
    "protocol",
    "method",
    "config_hash",
    "code_fingerprint",
    "setting",
    "backbone",
    "params",
    "tasks",
    "n_tasks",
    "n_seeds",
    "accuracy",
    "ci95",
    "ci_over",
    "top5",
    "top5_ci95",
    "budget",
    "seconds",
    "device",
    "task_set",
    "task_source",
    "manifests",
    "data_fingerprint",
]
#: Provenance columns kept in CSV but not shown in Markdown / LaTeX tables.
HIDDEN_COLUMNS = {"task_set", "task_source", "manifests", "data_fingerprint"}


def _join_unique(values: pd.Series) -> str:
    return ", ".join(sorted({v for v in values.astype(str) if v}))


def _manifests(g: pd.DataFrame) -> str:
    """``"seed:manifest_hash"`` per seed of one entry's rows; refuses two manifests for a seed."""
    per_seed = g.groupby("seed")["manifest_hash"].unique()
    bad = {int(s): sorted(m) for s, m in per_seed.items() if len(m) > 1}
    if bad:  # cannot happen with task sets assigned by prepare(); never pool if it does
        raise ReportError(
            f"entry {g['method'].iloc[0]!r} on {g['protocol'].iloc[0]!r} holds two manifests for "
            f"one seed ({bad}); rows of different task sets are never pooled"
        )
    return " ".join(f"{int(s)}:{m[0]}" for s, m in per_seed.items())


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """One row per entry — (protocol, method, config_hash, code_fingerprint, backbone, task set),
    see :mod:`fewshot_bench.report.entries` — with its setting, non-default parameters as run
    (``params``), what it ran on (``tasks``: sampled or imported, and the task set where the
    protocol has several), counts, mean accuracy ± 95% CI (%), top-5 (%, NaN when never
    recorded), training budget, mean seconds per task and the device(s) used; provenance for
    CSV: ``task_set``, ``task_source``, ``manifests`` (``seed:hash`` per seed) and
    ``data_fingerprint``.

    Rows are ordered by protocol family, then ``x_value`` (label count, shots; numerically), then
    protocol, then accuracy (best first), so a sweep reads in budget order.
    """
    df = prepare(df)
    rows = []
    for key, g in df.groupby(ENTRY_KEY, sort=True):
        protocol, method, config, code, backbone, task_set = key
        acc = aggregate(g, "accuracy")
        top5 = aggregate(g, "top5")
        source = _join_unique(g["task_source"])
        budget = g["budget"].dropna()
        rows.append(
            {
                "protocol": protocol,
                "method": method,
                "config_hash": config,
                "code_fingerprint": code,
                "setting": _join_unique(g["setting"]),
                "backbone": backbone,
                "params": format_params(g["params"].iloc[0]),
                "tasks": tasks_text(source, task_set),
                "n_tasks": len(g),
                "n_seeds": int(g["seed"].nunique()),
                "accuracy": acc.ci.mean * 100,
                "ci95": acc.ci.half_width * 100,
                "ci_over": acc.describe(),
                "top5": top5.ci.mean * 100,
                "top5_ci95": top5.ci.half_width * 100,
                "budget": float(budget.iloc[0]) if len(budget) else math.nan,
                "seconds": float(g["seconds"].mean()) if g["seconds"].notna().any() else math.nan,
                "device": _join_unique(g["device"]),
                "task_set": task_set,
                "task_source": source,
                "manifests": _manifests(g),
                "data_fingerprint": _join_unique(g["data_fingerprint"]),
            }
        )
    out = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    out = out.astype({"n_tasks": int, "n_seeds": int})
    return out.iloc[_report_order(out, df)].reset_index(drop=True)


def _report_order(table: pd.DataFrame, data: pd.DataFrame) -> list[int]:
    """Positions of ``table`` rows sorted by family, numeric x value, protocol, accuracy desc."""
    fam = dict(zip(data["protocol"], families(data), strict=True))
    xs = data.dropna(subset=["x_value"]).groupby("protocol")["x_value"].min()

    def key(i: int) -> tuple:
        row = table.iloc[i]
        x = xs.get(row["protocol"], math.nan)
        acc = row["accuracy"]
        return (
            fam.get(row["protocol"], row["protocol"]),
            math.isnan(x),
            0.0 if math.isnan(x) else x,
            row["protocol"],
            math.isnan(acc),
            0.0 if math.isnan(acc) else -acc,
            row["method"],
            row["config_hash"],
            row["code_fingerprint"],
            row["backbone"],
            row["task_set"],
        )

    return sorted(range(len(table)), key=key)


_BOARD_ORDER = [
    "rank",
    "entry",
    "method",
    "setting",
    "backbone",
    "tasks",
    "accuracy",
    "ci95",
    "reported",
    "delta_reported",
    "source",
    "top5",
    "top5_ci95",
    "ci_over",
    "n_tasks",
    "n_seeds",
    "budget",
    "seconds",
    "device",
    "config_hash",
    "code_fingerprint",
    "task_set",
    "task_source",
    "manifests",
    "data_fingerprint",
]


def leaderboard(df: pd.DataFrame, protocol: str, reported: Reported | None = None) -> pd.DataFrame:
    """The protocol's entries ranked by mean accuracy, the setting on every row.

    ``entry`` labels come from :func:`~fewshot_bench.report.entries.entry_labels`; ``tasks`` says
    whether an entry's tasks were sampled or imported (and which task set, where the protocol
    ran on several: those entries are never pooled). ``reported`` maps a method name to the
    paper's number in percent, optionally with its source, e.g.
    ``{"mean_teacher": (45.49, "Liu et al. 2018, Table 2")}``; it adds ``reported``, ``source``
    and ``delta_reported`` (ours − reported, percentage points) columns. Reported methods that
    were not run are not listed.
    """
    table = summarise(df)
    table = table[table["protocol"] == protocol].drop(columns="protocol")
    if table.empty:
        known = sorted(prepare(df)["protocol"].unique())
        raise ReportError(f"no results for protocol {protocol!r}; protocols with results: {known}")
    ties = ["method", "config_hash", "code_fingerprint", "backbone", "task_set"]
    table = table.sort_values(["accuracy", *ties], ascending=[False] + [True] * len(ties))
    table.insert(0, "rank", table["accuracy"].rank(method="min", ascending=False).astype(int))
    table.insert(1, "entry", entry_labels(table))
    if reported is not None:
        values, sources = [], []
        for m in table["method"]:
            r = reported.get(m)
            if r is None:
                values.append(math.nan)
                sources.append("")
            elif isinstance(r, tuple | list):
                values.append(float(r[0]))
                sources.append(str(r[1]) if len(r) > 1 else "")
            else:
                values.append(float(r))
                sources.append("")
        table["reported"] = values
        table["source"] = sources
        table["delta_reported"] = table["accuracy"] - table["reported"]
    order = [c for c in _BOARD_ORDER if c in table.columns]
    return table[order].reset_index(drop=True)


#: ``note`` of :func:`comparison_table` for two entries that ran different task sets.
DIFFERENT_TASK_SETS = "different task sets"
NO_SHARED_TASKS = "no shared tasks"


def comparison_table(df: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """Every ordered pair of the protocol's entries on their shared tasks (row − column).

    Tasks are paired only when they are the very same task: same manifest hash, seed and task
    index (task *i* of one task set is never paired with task *i* of another). Columns: ``a``,
    ``b`` (entry labels as in :func:`leaderboard`), ``n_shared``, ``mean_diff`` and ``ci95``
    (percentage points), ``p_t`` (paired t-test), ``p_wilcoxon``, ``note``. Pairs without
    shared tasks have ``n_shared = 0``, NaN statistics and ``note`` = ``"different task sets"``
    (they ran different manifests of the protocol) or ``"no shared tasks"``.
    """
    df = prepare(df)
    df = df[df["protocol"] == protocol]
    if df.empty:
        raise ReportError(f"no results for protocol {protocol!r}")
    board = leaderboard(df, protocol)
    keys = ["method", "config_hash", "code_fingerprint", "backbone", "task_set"]
    labels = list(board["entry"])
    groups = dict(iter(df.groupby(keys, sort=False)))
    frames = {
        label: groups[tuple(key)]
        for label, key in zip(labels, board[keys].itertuples(index=False), strict=True)
    }
    rows = []
    for la in labels:
        for lb in labels:
            if la == lb:
                continue
            d = paired_differences(frames[la], frames[lb])
            if d.size == 0:
                note = (
                    DIFFERENT_TASK_SETS
                    if shares_positions_only(frames[la], frames[lb])
                    else NO_SHARED_TASKS
                )
                rows.append((la, lb, 0, math.nan, math.nan, math.nan, math.nan, note))
                continue
            r = _paired_from_diffs(la, lb, d)
            rows.append(
                (
                    la,
                    lb,
                    r.n,
                    r.mean_diff * 100,
                    r.ci.half_width * 100,
                    r.t_pvalue,
                    r.wilcoxon_pvalue,
                    "",
                )
            )
    return pd.DataFrame(
        rows, columns=["a", "b", "n_shared", "mean_diff", "ci95", "p_t", "p_wilcoxon", "note"]
    )


def comparison_matrix(df: pd.DataFrame, protocol: str, *, test: str = "t") -> pd.DataFrame:
    """Square table (rows and columns in leaderboard order): cell = row − column accuracy in
    percentage points with the paired p-value (``test`` = "t" or "wilcoxon"), e.g.
    ``"+1.23 (p=0.004)"``; "—" on the diagonal, "different task sets" where the two ran
    different manifests (never paired), "no shared tasks" where they share none otherwise."""
    if test not in ("t", "wilcoxon"):
        raise ValueError(f"test must be 't' or 'wilcoxon', not {test!r}")
    pairs = comparison_table(df, protocol)
    labels = list(leaderboard(df, protocol)["entry"])
    pcol = "p_t" if test == "t" else "p_wilcoxon"
    out = pd.DataFrame("—", index=labels, columns=labels, dtype=object)
    for a, b, n, d, p, note in pairs[["a", "b", "n_shared", "mean_diff", pcol, "note"]].itertuples(
        index=False
    ):
        out.loc[a, b] = note if n == 0 else f"{d:+.2f} ({_p_eq(p)})"
    out.index.name = "row − column"
    return out


def _p_eq(p: float) -> str:
    text = format_p(p)
    return f"p{text}" if text.startswith("<") else f"p={text}"


# --------------------------------------------------------------------------- rendering

_HEADERS = {
    "rank": "Rank",
    "entry": "Method",
    "protocol": "Protocol",
    "method": "Method",
    "config_hash": "Config",
    "setting": "Setting",
    "backbone": "Backbone",
    "accuracy": "Accuracy (%)",
    "top5": "Top-5 (%)",
    "reported": "Reported (%)",
    "source": "Source",
    "delta_reported": "Δ vs reported (pp)",
    "n_tasks": "Tasks",
    "n_seeds": "Seeds",
    "ci_over": "95% CI over",
    "seconds": "s / task",
    "device": "Device",
    "code_fingerprint": "Code",
    "tasks": "Task set",
    "budget": "Budget",
    "params": "Parameters",
    "note": "Note",
    "a": "A",
    "b": "B",
    "n_shared": "Shared tasks",
    "mean_diff": "A − B (pp)",
    "p_t": "p (paired t)",
    "p_wilcoxon": "p (Wilcoxon)",
}
_NUMERIC_RIGHT = {
    "rank",
    "accuracy",
    "top5",
    "reported",
    "delta_reported",
    "n_tasks",
    "n_seeds",
    "budget",
    "seconds",
    "n_shared",
    "mean_diff",
    "p_t",
    "p_wilcoxon",
}


def _fmt_num(x: float, digits: int, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _fmt_mean_ci(mean: float, hw: float, digits: int, sign: bool = False) -> str:
    if mean is None or math.isnan(mean):
        return ""
    m = _fmt_num(mean, digits, sign)
    if hw is None or math.isnan(hw):
        return f"{m} (no CI)"
    return f"{m} ± {hw:.{digits}f}"


def format_table(table: pd.DataFrame, digits: int = 2) -> tuple[pd.DataFrame, list[bool]]:
    """Strings for display: mean ± CI pairs merged, config hashes shortened, empty columns dropped.

    Returns the formatted frame (display headers) and, per column, whether to right-align it.
    Tables other than those built here are shown with their values as ``str``.
    """
    t = table.copy()
    cols: dict[str, pd.Series] = {}
    right: list[bool] = []
    has_entry = "entry" in t.columns
    for col in t.columns:
        s = t[col]
        if col in ("ci95", "top5_ci95") and ("accuracy" in t.columns or "mean_diff" in t.columns):
            continue  # merged into its mean
        if has_entry and col == "method":
            continue
        if col in HIDDEN_COLUMNS:
            continue
        if col == "code_fingerprint":
            if s.nunique() < 2:
                continue  # shown only where entries of one config ran different code
            shown = s.astype(str).map(short_hash)
        elif col == "tasks":
            if s.isin(["", "sampled"]).all():
                continue  # shown where some entry ran imported episodes or another task set
            shown = s.astype(str)
        elif col == "budget":
            if s.isna().all():
                continue
            shown = s.map(lambda v: "" if v is None or math.isnan(v) else f"{v:.0f}")
        elif col == "config_hash":
            shown = s.astype(str).str.slice(0, 8)
        elif col == "accuracy" and "ci95" in t.columns:
            shown = pd.Series(
                [_fmt_mean_ci(m, h, digits) for m, h in zip(s, t["ci95"], strict=True)],
                index=t.index,
            )
        elif col == "top5":
            if s.isna().all():
                continue
            hw = t["top5_ci95"] if "top5_ci95" in t.columns else pd.Series(math.nan, index=t.index)
            shown = pd.Series(
                [_fmt_mean_ci(m, h, digits) for m, h in zip(s, hw, strict=True)], index=t.index
            )
        elif col == "mean_diff" and "ci95" in t.columns:
            shown = pd.Series(
                [_fmt_mean_ci(m, h, digits, sign=True) for m, h in zip(s, t["ci95"], strict=True)],
                index=t.index,
            )
        elif col in ("reported", "delta_reported", "seconds"):
            if s.isna().all():
                continue
            d = 3 if col == "seconds" else digits
            shown = s.map(lambda v, d=d, c=col: _fmt_num(v, d, sign=c == "delta_reported"))
        elif col in ("p_t", "p_wilcoxon"):
            shown = s.map(lambda v: "" if v is None or math.isnan(v) else format_p(v))
        elif col in ("source", "note") and (s.astype(str) == "").all():
            continue
        elif pd.api.types.is_float_dtype(s):
            shown = s.map(lambda v: _fmt_num(v, digits))
        else:
            shown = s.map(
                lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
            )
        header = _HEADERS.get(str(col), str(col))
        cols[header] = shown.astype(str)
        right.append(col in _NUMERIC_RIGHT or pd.api.types.is_numeric_dtype(s))
    out = pd.DataFrame(cols, index=t.index)
    if t.index.name is not None:
        out.insert(0, str(t.index.name), [str(i) for i in t.index])
        right.insert(0, False)
    return out.reset_index(drop=True), right


def _write(text: str, path: str | Path | None) -> None:
    if path is not None:
        write_text_atomic(path, text)


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown_table(shown: pd.DataFrame, right: list[bool]) -> str:
    """Markdown for a table of display strings; ``right[i]`` right-aligns column ``i``."""
    headers = [_md_cell(str(c)) for c in shown.columns]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if r else ":---" for r in right) + "|",
    ]
    for row in shown.itertuples(index=False):
        lines.append("| " + " | ".join(_md_cell(str(v)) for v in row) + " |")
    return "\n".join(lines) + "\n"


def to_markdown(table: pd.DataFrame, path: str | Path | None = None, *, digits: int = 2) -> str:
    """GitHub-flavoured Markdown table (numbers as ``"98.12 ± 0.21"``); written to ``path`` if given."""
    shown, right = format_table(table, digits)
    text = markdown_table(shown, right)
    _write(text, path)
    return text


def to_csv(table: pd.DataFrame, path: str | Path | None = None, *, digits: int = 4) -> str:
    """CSV with numeric columns kept numeric (rounded to ``digits``); written to ``path`` if given."""
    t = table.copy()
    for col in t.columns:
        if pd.api.types.is_float_dtype(t[col]):
            t[col] = t[col].round(digits)
    text = t.to_csv(index=t.index.name is not None, lineterminator="\n")
    _write(text, path)
    return text


def write_md_and_csv(out: Path, stem: str, md: list[str], table: pd.DataFrame) -> list[Path]:
    """A page's two plain files: ``OUT/STEM.md`` (its Markdown lines, ending in one newline)
    and ``OUT/STEM.csv`` (``table``, see :func:`to_csv`); their paths."""
    md_path = out / f"{stem}.md"
    write_text_atomic(md_path, "\n".join(md).rstrip("\n") + "\n")
    csv_path = out / f"{stem}.csv"
    to_csv(table, csv_path)
    return [md_path, csv_path]


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_LATEX_SYMBOLS = {
    "±": r"$\pm$",
    "−": r"$-$",
    "—": "---",
    "Δ": r"$\Delta$",
    "<": r"$<$",
    ">": r"$>$",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters (and typeset ±, −, Δ) in plain text."""
    out = []
    for ch in str(text):
        if ch in _LATEX_SPECIAL:
            out.append(_LATEX_SPECIAL[ch])
        elif ch in _LATEX_SYMBOLS:
            out.append(_LATEX_SYMBOLS[ch])
        else:
            out.append(ch)
    return "".join(out)


def to_latex(
    table: pd.DataFrame,
    path: str | Path | None = None,
    *,
    caption: str | None = None,
    label: str | None = None,
    digits: int = 2,
) -> str:
    """A ``table`` with a booktabs ``tabular`` (needs ``\\usepackage{booktabs}``); text escaped."""
    shown, right = format_table(table, digits)
    text = latex_table(shown, right, caption=caption, label=label)
    _write(text, path)
    return text


def latex_table(
    shown: pd.DataFrame,
    right: list[bool],
    *,
    caption: str | None = None,
    label: str | None = None,
    rule_before: int | None = None,
) -> str:
    """LaTeX (booktabs) for a table of display strings; ``rule_before``: a ``\\midrule`` above
    that row position."""
    spec = "".join("r" if r else "l" for r in right)
    lines = [
        "% generated by fewshot-bench; needs \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
    ]
    if caption:
        lines.append(f"\\caption{{{latex_escape(caption)}}}")
    if label:
        lines.append(f"\\label{{{label}}}")
    lines += [
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(latex_escape(str(c)) for c in shown.columns) + " \\\\",
        "\\midrule",
    ]
    for i, row in enumerate(shown.itertuples(index=False)):
        if rule_before is not None and i == rule_before:
            lines.append("\\midrule")
        lines.append(" & ".join(latex_escape(str(v)) for v in row) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"
