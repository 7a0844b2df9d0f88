"""Summary tables, leaderboards and paired-comparison matrices, and their renderers.

Tables are plain DataFrames with numeric columns (accuracy in percent); the renderers
(:func:`to_markdown`, :func:`to_latex`) format known columns as ``"98.12 ± 0.21"``, while
:func:`to_csv` keeps numbers as numbers for further analysis.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from fewshot_bench.atomic import write_text_atomic
from fewshot_bench.report.plots import families
from fewshot_bench.report.stats import (
    ReportError,
    _paired_from_diffs,
    aggregate,
    format_p,
    paired_differences,
    prepare,
)

Reported = Mapping[str, "tuple[float, str] | float"]

#: Columns of :func:`summarise` (accuracy, CI, top-5 and reported values in percent).
SUMMARY_COLUMNS = [
    "protocol",
    "method",
    "config_hash",
    "setting",
    "backbone",
    "params",
    "n_tasks",
    "n_seeds",
    "accuracy",
    "ci95",
    "ci_over",
    "top5",
    "top5_ci95",
    "seconds",
    "device",
]


def changed_params(config: str | None) -> str:
    """The parameters of a stored run ``config`` (JSON) that differ from its method's registered
    defaults, as ``"k=v, k2=v2"`` (file paths shortened to the file name); ``""`` when none
    differ, the config is missing or the method is not registered here."""
    if not isinstance(config, str) or not config:
        return ""
    from fewshot_bench.errors import FsbenchError
    from fewshot_bench.methods import get_method

    try:
        doc = json.loads(config)
        defaults = get_method(doc["method"]).defaults
    except (ValueError, KeyError, TypeError, FsbenchError):
        return ""
    parts = []
    for key, value in sorted(doc.get("params", {}).items()):
        if key in defaults and defaults[key] == value:
            continue
        if isinstance(value, str) and ("/" in value or "\\" in value):
            value = Path(value).name
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def _join_unique(values: pd.Series) -> str:
    return ", ".join(sorted({v for v in values.astype(str) if v}))


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (protocol, method, config_hash): setting, counts, mean accuracy ± 95% CI (%),
    top-5 (%, NaN when never recorded), mean seconds per task and the device(s) used.

    Rows are ordered by protocol family, then ``x_value`` (label count, shots; numerically), then
    protocol, then accuracy (best first), so a sweep reads in budget order.
    """
    df = prepare(df)
    rows = []
    for (protocol, method, config), g in df.groupby(
        ["protocol", "method", "config_hash"], sort=True
    ):
        acc = aggregate(g, "accuracy")
        top5 = aggregate(g, "top5")
        rows.append(
            {
                "protocol": protocol,
                "method": method,
                "config_hash": config,
                "setting": _join_unique(g["setting"]),
                "backbone": _join_unique(g["backbone"]) if "backbone" in g else "",
                "params": changed_params(g["config"].iloc[0]) if "config" in g else "",
                "n_tasks": len(g),
                "n_seeds": int(g["seed"].nunique()),
                "accuracy": acc.ci.mean * 100,
                "ci95": acc.ci.half_width * 100,
                "ci_over": acc.describe(),
                "top5": top5.ci.mean * 100,
                "top5_ci95": top5.ci.half_width * 100,
                "seconds": float(g["seconds"].mean()) if g["seconds"].notna().any() else math.nan,
                "device": _join_unique(g["device"]),
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
        )

    return sorted(range(len(table)), key=key)


_BOARD_ORDER = [
    "rank",
    "entry",
    "method",
    "setting",
    "backbone",
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
    "seconds",
    "device",
    "config_hash",
]


def entry_name(method: str, params: str) -> str:
    """``method`` with its non-default parameters: ``"finetune (init=conv4.pt)"``."""
    return f"{method} ({params})" if params else method


def _entry_labels(table: pd.DataFrame) -> list[str]:
    """Method names with their non-default parameters, plus a short config hash where that
    still leaves one name for several configurations."""
    params = table["params"] if "params" in table else pd.Series("", index=table.index)
    names = [entry_name(m, p) for m, p in zip(table["method"], params, strict=True)]
    counts = (
        pd.DataFrame({"name": names, "c": table["config_hash"].to_numpy()})
        .groupby("name")["c"]
        .transform("nunique")
    )
    return [
        f"{n} [{c[:8]}]" if k > 1 else n
        for n, c, k in zip(names, table["config_hash"], counts, strict=True)
    ]


def leaderboard(df: pd.DataFrame, protocol: str, reported: Reported | None = None) -> pd.DataFrame:
    """The protocol's configurations ranked by mean accuracy, the setting on every row.

    ``reported`` maps a method name to the paper's number in percent, optionally with its source,
    e.g. ``{"mean_teacher": (45.49, "Liu et al. 2018, Table 2")}``; it adds ``reported``,
    ``source`` and ``delta_reported`` (ours − reported, percentage points) columns. Reported
    methods that were not run are not listed.
    """
    table = summarise(df)
    table = table[table["protocol"] == protocol].drop(columns="protocol")
    if table.empty:
        known = sorted(prepare(df)["protocol"].unique())
        raise ReportError(f"no results for protocol {protocol!r}; protocols with results: {known}")
    table = table.sort_values(["accuracy", "method", "config_hash"], ascending=[False, True, True])
    table.insert(0, "rank", table["accuracy"].rank(method="min", ascending=False).astype(int))
    table.insert(1, "entry", _entry_labels(table))
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


def comparison_table(df: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """Every ordered pair of the protocol's configurations on their shared tasks (row − column).

    Columns: ``a``, ``b`` (entry labels as in :func:`leaderboard`), ``n_shared``, ``mean_diff``
    and ``ci95`` (percentage points), ``p_t`` (paired t-test), ``p_wilcoxon``. Pairs without
    shared tasks have ``n_shared = 0`` and NaN statistics.
    """
    df = prepare(df)
    df = df[df["protocol"] == protocol]
    if df.empty:
        raise ReportError(f"no results for protocol {protocol!r}")
    board = leaderboard(df, protocol)
    entries = list(zip(board["entry"], board["method"], board["config_hash"], strict=True))
    frames = {label: df[(df["method"] == m) & (df["config_hash"] == c)] for label, m, c in entries}
    rows = []
    for la, _, _ in entries:
        for lb, _, _ in entries:
            if la == lb:
                continue
            d = paired_differences(frames[la], frames[lb])
            if d.size == 0:
                rows.append((la, lb, 0, math.nan, math.nan, math.nan, math.nan))
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
                )
            )
    return pd.DataFrame(
        rows, columns=["a", "b", "n_shared", "mean_diff", "ci95", "p_t", "p_wilcoxon"]
    )


def comparison_matrix(df: pd.DataFrame, protocol: str, *, test: str = "t") -> pd.DataFrame:
    """Square table (rows and columns in leaderboard order): cell = row − column accuracy in
    percentage points with the paired p-value (``test`` = "t" or "wilcoxon"), e.g.
    ``"+1.23 (p=0.004)"``; "—" on the diagonal, "no shared tasks" where none are shared."""
    if test not in ("t", "wilcoxon"):
        raise ValueError(f"test must be 't' or 'wilcoxon', not {test!r}")
    pairs = comparison_table(df, protocol)
    labels = list(leaderboard(df, protocol)["entry"])
    pcol = "p_t" if test == "t" else "p_wilcoxon"
    cells = {
        (a, b): (n, d, p)
        for a, b, n, d, p in pairs[["a", "b", "n_shared", "mean_diff", pcol]].itertuples(
            index=False
        )
    }
    out = pd.DataFrame("—", index=labels, columns=labels, dtype=object)
    for (a, b), (n, d, p) in cells.items():
        out.loc[a, b] = "no shared tasks" if n == 0 else f"{d:+.2f} ({_p_eq(p)})"
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
        if col == "config_hash":
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
        elif col == "source" and (s.astype(str) == "").all():
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
