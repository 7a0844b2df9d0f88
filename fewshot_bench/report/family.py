"""Family pages: one wide table for a protocol sweep (e.g. every label budget of CIFAR-10 SSL),
one row per entry and one column per x value, with the papers' reported numbers beside it."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from fewshot_bench.report.plots import axis_label, families, protocol_family
from fewshot_bench.report.stats import ReportError, prepare
from fewshot_bench.report.tables import (
    Reported,
    _fmt_mean_ci,
    _join_unique,
    latex_table,
    markdown_table,
    summarise,
)

#: Columns of :func:`family_summary` (accuracy, CI and reported values in percent).
FAMILY_COLUMNS = [
    "family",
    "protocol",
    "x_value",
    "x_label",
    "kind",
    "entry",
    "method",
    "config_hash",
    "setting",
    "backbone",
    "n_seeds",
    "n_tasks",
    "accuracy",
    "ci95",
    "ci_over",
    "seconds",
    "device",
    "source",
]


def family_protocols(df: pd.DataFrame, family: str) -> list[str]:
    """The family's protocols with results, by numeric ``x_value`` (missing last), then name."""
    data = prepare(df)
    sub = data[families(data) == family]
    xs = sub.groupby("protocol")["x_value"].min()
    return sorted(
        xs.index, key=lambda p: (math.isnan(xs[p]), 0.0 if math.isnan(xs[p]) else xs[p], p)
    )


def _reported_x(protocol: str, family: str, data: pd.DataFrame) -> float | None:
    """The x value of a reported protocol of ``family``; ``None`` when it is another family's."""
    from fewshot_bench.report.notes import find_protocol

    rows = data[data["protocol"] == protocol]
    if not rows.empty:
        return float(rows["x_value"].min()) if families(rows).iloc[0] == family else None
    proto = find_protocol(protocol)
    if proto is None:
        return math.nan if protocol_family(protocol) == family else None
    if proto.family != family:
        return None
    return math.nan if proto.x_value is None else float(proto.x_value)


def _reported_items(reported: Reported) -> list[tuple[str, float, str]]:
    out = []
    for method, r in reported.items():
        if isinstance(r, tuple | list):
            out.append((method, float(r[0]), str(r[1]) if len(r) > 1 else ""))
        else:
            out.append((method, float(r), ""))
    return out


def family_summary(
    df: pd.DataFrame, family: str, reported: Mapping[str, Reported] | None = None
) -> pd.DataFrame:
    """Long table of a family: one ``kind="measured"`` row per (protocol, method, config_hash)
    with :func:`summarise`'s numbers, then one ``kind="reported"`` row per number the papers
    report for a protocol of the family (``reported`` maps protocol → method → number)."""
    data = prepare(df)
    sub = data[families(data) == family]
    if sub.empty:
        known = sorted(set(families(data)))
        raise ReportError(f"no results for family {family!r}; families with results: {known}")
    order = family_protocols(sub, family)
    xs = sub.groupby("protocol")["x_value"].min().to_dict()
    label = axis_label(sub)
    table = summarise(sub)
    counts = table.groupby("method")["config_hash"].transform("nunique")
    table["entry"] = [
        f"{m} [{c[:8]}]" if n > 1 else m
        for m, c, n in zip(table["method"], table["config_hash"], counts, strict=True)
    ]
    table["family"] = family
    table["x_value"] = table["protocol"].map(xs)
    table["x_label"] = label
    table["kind"] = "measured"
    table["source"] = ""
    table["_p"] = table["protocol"].map({p: i for i, p in enumerate(order)})
    table = table.sort_values(["_p", "accuracy"], ascending=[True, False], kind="stable")
    rows = []
    for protocol, numbers in sorted((reported or {}).items()):
        x = _reported_x(protocol, family, data)
        if x is None:
            continue  # another family's protocol
        for method, value, source in _reported_items(numbers):
            rows.append(
                {
                    "family": family,
                    "protocol": protocol,
                    "x_value": x,
                    "x_label": label,
                    "kind": "reported",
                    "entry": method,
                    "method": method,
                    "config_hash": "",
                    "setting": "",
                    "backbone": "",
                    "n_seeds": 0,
                    "n_tasks": 0,
                    "accuracy": value,
                    "ci95": math.nan,
                    "ci_over": "",
                    "seconds": math.nan,
                    "device": "",
                    "source": source,
                }
            )
    rep = pd.DataFrame(rows, columns=FAMILY_COLUMNS)
    if not rep.empty:
        rep = rep.sort_values(["x_value", "protocol", "method"], na_position="last")
    parts = [table[FAMILY_COLUMNS]] + ([rep] if not rep.empty else [])
    out = pd.concat(parts, ignore_index=True)
    return out.astype({"n_seeds": int, "n_tasks": int})


def x_header(x: float, label: str) -> str:
    """A column header for one x value: ``"250 labels"``, ``"1% labeled"``, ``"5 shots per class"``."""
    if math.isnan(x):
        return label
    return f"{x:g}{label}" if label.startswith("%") else f"{x:g} {label}"


def _columns(long: pd.DataFrame, order: Sequence[str]) -> dict[str, str]:
    """Protocol → column header (the x value, or the protocol name where x values repeat)."""
    measured = long[long["kind"] == "measured"]
    xs = measured.groupby("protocol")["x_value"].min()
    label = str(measured["x_label"].iloc[0])
    vals = [xs[p] for p in order]
    unique = not any(math.isnan(v) for v in vals) and len(set(vals)) == len(vals)
    return {p: x_header(xs[p], label) if unique else p for p in order}


def _entry_order(measured: pd.DataFrame, order: Sequence[str]) -> list[tuple[str, str]]:
    """(method, config_hash) keys, best at the largest x first; entries lacking it after."""
    pos = {p: i for i, p in enumerate(order)}
    keys = []
    for (m, c), g in measured.groupby(["method", "config_hash"], sort=True):
        last = g.loc[g["protocol"].map(pos).idxmax()]
        keys.append((-pos[last["protocol"]], -last["accuracy"], m, c))
    return [(m, c) for _, _, m, c in sorted(keys)]


def _seeds_text(values: pd.Series) -> str:
    lo, hi = int(values.min()), int(values.max())
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _wide(
    long: pd.DataFrame, data: pd.DataFrame, order: Sequence[str], *, seconds: bool = False
) -> tuple[pd.DataFrame, list[bool]]:
    """Display strings: one row per entry, one column per protocol (accuracy or seconds)."""
    measured = long[long["kind"] == "measured"]
    headers = _columns(long, order)
    rows = []
    for m, c in _entry_order(measured, order):
        g = measured[(measured["method"] == m) & (measured["config_hash"] == c)]
        raw = data[(data["method"] == m) & (data["config_hash"] == c)]
        by_p = {r["protocol"]: r for _, r in g.iterrows()}
        row = {
            "Method": g["entry"].iloc[0],
            "Setting": _join_unique(g["setting"]),
            "Backbone": _join_unique(g["backbone"]),
            "Seeds": _seeds_text(g["n_seeds"]),
        }
        for p in order:
            r = by_p.get(p)
            if r is None:
                row[headers[p]] = "—"
            elif seconds:
                row[headers[p]] = "" if math.isnan(r["seconds"]) else f"{r['seconds']:.3f}"
            else:
                row[headers[p]] = _fmt_mean_ci(r["accuracy"], r["ci95"], 2)
        if not seconds:
            s = raw["seconds"].mean() if raw["seconds"].notna().any() else math.nan
            row["s / task (all)"] = "" if math.isnan(s) else f"{s:.3f}"
        rows.append(row)
    shown = pd.DataFrame(rows)
    right = [c not in ("Method", "Setting", "Backbone") for c in shown.columns]
    return shown, right


def _short_source(source: str) -> str:
    """``"Snell et al. 2017, Table 1 (...)"`` → ``"Snell et al. 2017"``."""
    m = re.match(r"^(.*?\b(?:19|20)\d\d)\b", source)
    head = m.group(1) if m and len(m.group(1)) <= 40 else source.split(",")[0]
    return head.strip() or "paper"


def _reported_display(long: pd.DataFrame) -> pd.DataFrame:
    """Markdown table of the reported numbers with the best measured entry of the same method."""
    rep = long[long["kind"] == "reported"]
    measured = long[long["kind"] == "measured"]
    label = str(long["x_label"].iloc[0]) or "x"
    rows = []
    for _, r in rep.iterrows():
        mine = measured[
            (measured["protocol"] == r["protocol"]) & (measured["method"] == r["method"])
        ]
        if mine.empty:
            ours = "not run"
        else:
            best = mine.loc[mine["accuracy"].idxmax()]
            ours = _fmt_mean_ci(best["accuracy"], best["ci95"], 2)
            if best["entry"] != best["method"]:
                ours += f" ({best['entry']})"
        x = r["x_value"]
        rows.append(
            {
                "Method": r["method"],
                label: r["protocol"] if math.isnan(x) else f"{x:g}",
                "Reported (%)": f"{r['accuracy']:.2f}",
                "Measured here (%)": ours,
                "Source": r["source"],
            }
        )
    return pd.DataFrame(rows)


def write_family_page(
    df: pd.DataFrame,
    family: str,
    out_dir: str | Path,
    reported: Mapping[str, Reported] | None = None,
    *,
    note: str = "",
    stem: str | None = None,
    links: Sequence[str] = (),
    ci_note: str = "",
) -> list[Path]:
    """Write ``<family>.md``, ``.csv`` (long format, numbers as numbers), ``.tex`` (wide) and
    ``.png`` (accuracy vs x) into ``out_dir``; return the paths. ``links``: per-protocol page
    file names to list; ``note``: the dataset line."""
    from fewshot_bench.atomic import write_text_atomic
    from fewshot_bench.report import safe_name
    from fewshot_bench.report.plots import plot_accuracy_curve
    from fewshot_bench.report.tables import to_csv

    data = prepare(df)
    data = data[families(data) == family]
    long = family_summary(data, family, reported)
    order = family_protocols(data, family)
    label = axis_label(data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or safe_name(family)
    settings = ", ".join(sorted({s for s in data["setting"] if s})) or "unknown setting"
    x_of = data.groupby("protocol")["x_value"].min()
    xs = [float(x_of[p]) for p in order if not math.isnan(x_of[p])]
    span = f" ({xs[0]:g}–{xs[-1]:g} {label})" if len(xs) > 1 else ""

    png: Path | None = None
    if data["x_value"].dropna().nunique() > 1:
        png = plot_accuracy_curve(data, out / f"{stem}.png", title=f"{family}: accuracy vs {label}")

    shown, right = _wide(long, data, order)
    md = [f"# {family}", ""]
    if note:
        md += [note, ""]
    md += [
        f"Setting: {settings}. {len(order)} protocols{span}, {len(shown)} entries, "
        f"{len(data)} task results.",
        "",
        f"## Accuracy (%) by {label}",
        "",
        "Rows are ordered by accuracy at the largest budget; — = not run.",
        "",
        markdown_table(shown, right).rstrip("\n"),
        "",
    ]
    if ci_note:
        md += [ci_note, ""]
    rep = _reported_display(long)
    if not rep.empty:
        md += [
            "## Reported in papers (not measured here)",
            "",
            "Numbers copied from the run cards (`baselines/*.toml`), beside the best measured "
            "configuration of the same method; the papers' protocols may differ from ours "
            "(see the cards' `differences`).",
            "",
            markdown_table(rep, [False, True, True, True, False]).rstrip("\n"),
            "",
        ]
    secs, sright = _wide(long, data, order, seconds=True)
    md += [f"## Seconds per task by {label}", "", markdown_table(secs, sright).rstrip("\n"), ""]
    if png is not None:
        md += [f"![accuracy vs {label}]({png.name})", ""]
    if links:
        md += ["## Per-protocol pages (with paired comparisons)", ""]
        md += [f"- [{Path(name).stem}]({name})" for name in links] + [""]

    paths = []
    md_path = out / f"{stem}.md"
    write_text_atomic(md_path, "\n".join(md).rstrip("\n") + "\n")
    paths.append(md_path)

    csv_path = out / f"{stem}.csv"
    to_csv(long, csv_path)
    paths.append(csv_path)

    tex_rows = [shown]
    rep_long = long[long["kind"] == "reported"]
    headers = _columns(long, order)
    if not rep_long.empty:
        extra = []
        for (method, source), g in rep_long.groupby(["method", "source"], sort=False):
            row = dict.fromkeys(shown.columns, "")
            row["Method"] = f"{method} (reported: {_short_source(source)})"
            hit = False
            for _, r in g.iterrows():
                if r["protocol"] in headers:
                    row[headers[r["protocol"]]] = f"{r['accuracy']:.2f}"
                    hit = True
            if hit:
                extra.append(row)
        if extra:
            tex_rows.append(pd.DataFrame(extra, columns=shown.columns))
    tex_table = pd.concat(tex_rows, ignore_index=True)
    caption = f"{family} ({settings}): mean accuracy (%) ± 95% CI by {label}"
    if len(tex_rows) > 1:
        caption += "; rows below the rule are reported in papers, not measured here"
    tex = latex_table(
        tex_table,
        right,
        caption=caption,
        label=f"tab:{stem}",
        rule_before=len(shown) if len(tex_rows) > 1 else None,
    )
    tex_path = out / f"{stem}.tex"
    write_text_atomic(tex_path, tex)
    paths.append(tex_path)
    if png is not None:
        paths.append(png)
    return paths


def best_at_largest(df: pd.DataFrame, family: str) -> tuple[str, str, float, float]:
    """(entry, x header, accuracy %, ci95) of the best entry at the family's largest x value."""
    long = family_summary(df, family)
    order = family_protocols(df, family)
    headers = _columns(long, order)
    measured = long[(long["kind"] == "measured") & (long["protocol"] == order[-1])]
    best = measured.loc[measured["accuracy"].idxmax()]
    return str(best["entry"]), headers[order[-1]], float(best["accuracy"]), float(best["ci95"])
