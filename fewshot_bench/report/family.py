"""Wide pages over several protocols, one row per entry and one column per protocol, with the
papers' reported numbers beside them.

A *family page* covers a protocol sweep (e.g. every label budget of CIFAR-10 SSL): its columns
are the x values. A *group page* covers protocols that are not one sweep, in the order given
(e.g. Omniglot 5-way 1-shot, 5-way 5-shot, 20-way 1-shot, 20-way 5-shot). Both are written by
one page writer; they differ in column headers, row order and entry labels.

A row of a page is one entry across the page's protocols: (method, config_hash,
code_fingerprint, backbone), and its task set where it ran on several task sets of one protocol
(:data:`~fewshot_bench.report.entries.PAGE_KEY`). A cell says "(tasks …)" when its protocol ran on
several task sets and the row's label does not name it, and "(imported)" when its tasks were
imported."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fewshot_bench.atomic import write_text_atomic
from fewshot_bench.report.entries import (
    PAGE_KEY,
    entry_labels,
    families,
    is_imported,
    protocol_family,
    safe_name,
    short_backbone,
    with_page_sets,
)
from fewshot_bench.report.plots import axis_label, plot_accuracy_curve
from fewshot_bench.report.stats import ReportError, prepare
from fewshot_bench.report.tables import (
    Reported,
    _fmt_mean_ci,
    _join_unique,
    latex_table,
    markdown_table,
    summarise,
    write_md_and_csv,
)

__all__ = [
    "FAMILY_COLUMNS",
    "GROUP_COLUMNS",
    "best_at_largest",
    "family_protocols",
    "family_summary",
    "group_headers",
    "group_summary",
    "short_backbone",
    "write_family_page",
    "write_group_page",
    "x_header",
]

_ENTRY_COLUMNS = [
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
    "code_fingerprint",
    "task_set",
    "task_source",
]
#: Columns of :func:`family_summary` (accuracy, CI and reported values in percent).
FAMILY_COLUMNS = ["family", "protocol", "x_value", "x_label", *_ENTRY_COLUMNS]
#: Columns of :func:`group_summary`; on ``kind="reported"`` rows ``ci95`` is the paper's ±
#: (the card's ``reported_ci``, NaN when it gives none).
GROUP_COLUMNS = ["group", "protocol", "column", *_ENTRY_COLUMNS]


# --------------------------------------------------------------------------- shared pieces


def _reported_items(reported: Reported) -> list[tuple[str, float, str, float]]:
    """(method, value, source, ± or NaN) from ``{method: value | (value, source[, ci])}``."""
    out = []
    for method, r in reported.items():
        if isinstance(r, tuple | list):
            source = str(r[1]) if len(r) > 1 and r[1] is not None else ""
            ci = float(r[2]) if len(r) > 2 and r[2] is not None else math.nan
            out.append((method, float(r[0]), source, ci))
        else:
            out.append((method, float(r), "", math.nan))
    return out


def _fmt_reported(value: float, ci: float) -> str:
    return f"{value:.2f}" if math.isnan(ci) else f"{value:.2f} ± {ci:.2f}"


def _reported_row(method: str, value: float, source: str, ci: float, **fields) -> dict:
    """A ``kind="reported"`` row of a long table (``fields``: protocol and page columns)."""
    return {
        **fields,
        "kind": "reported",
        "entry": method,
        "method": method,
        "config_hash": "",
        "setting": "",
        "backbone": "",
        "n_seeds": 0,
        "n_tasks": 0,
        "accuracy": value,
        "ci95": ci,
        "ci_over": "",
        "seconds": math.nan,
        "device": "",
        "source": source,
        "code_fingerprint": "",
        "task_set": "",
        "task_source": "",
    }


def _measured(sub: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """:func:`summarise` rows (one per protocol and entry) of the protocols in ``order``, with
    an ``entry`` label (:func:`~fewshot_bench.report.entries.entry_labels` over all the page's
    rows: :func:`~fewshot_bench.report.entries.with_page_sets`), by column position then
    accuracy (best first)."""
    table = with_page_sets(summarise(sub))
    table = table[table["protocol"].isin(order)].copy()
    table["entry"] = entry_labels(table.assign(task_set=table["page_set"]))
    table["_p"] = table["protocol"].map({p: i for i, p in enumerate(order)})
    table = table.sort_values(["_p", "accuracy"], ascending=[True, False], kind="stable")
    return table.drop(columns="_p")


def _key_of(frame: pd.DataFrame) -> pd.Series:
    """The :data:`~fewshot_bench.report.entries.PAGE_KEY` tuple of every row."""
    return pd.Series(list(frame[PAGE_KEY].itertuples(index=False, name=None)), index=frame.index)


def _seeds_text(values: pd.Series) -> str:
    lo, hi = int(values.min()), int(values.max())
    return str(lo) if lo == hi else f"{lo}–{hi}"


@dataclass(frozen=True)
class _Layout:
    """What a family page and a group page do differently."""

    title: str
    stem: str
    order: list[str]  # protocols, one column each, in this order
    headers: dict[str, str]  # protocol → column header
    keys: list[tuple[str, ...]]  # PAGE_KEY of each row, top first
    intro: list[str]  # Markdown after the dataset note; "{n_entries}" is filled in
    axis: str  # "Accuracy (%) by <axis>", "Seconds per task by <axis>"
    order_note: str  # how rows are ordered
    where_header: str  # the protocol column of the reported table
    where: dict[str, str]  # protocol → what that column shows
    where_right: bool  # right-align that column (numbers)
    caption: str  # LaTeX caption (the note about reported rows is added)
    tasks: bool = False  # a "Tasks" column (episodes per cell)
    backbone: Callable[[str], str] = str  # how the backbone column shows a backbone
    figures: list[str] = field(default_factory=list)  # Markdown before the links


def _wide(
    long: pd.DataFrame, data: pd.DataFrame, lay: _Layout, *, seconds: bool = False
) -> tuple[pd.DataFrame, list[bool]]:
    """Display strings: one row per entry, one column per protocol (accuracy or seconds)."""
    measured = with_page_sets(long[long["kind"] == "measured"])
    data = with_page_sets(data)
    measured_keys = _key_of(measured)
    data_keys = _key_of(data)
    rows = []
    for key in lay.keys:
        g = measured[measured_keys == key]
        raw = data[data_keys == key]
        by_p = {r["protocol"]: r for _, r in g.iterrows()}
        row = {
            "Method": g["entry"].iloc[0],
            "Setting": _join_unique(g["setting"]),
            "Backbone": lay.backbone(_join_unique(g["backbone"])),
            "Seeds": _seeds_text(g["n_seeds"]),
        }
        if lay.tasks:
            row["Tasks"] = _seeds_text(g["n_tasks"])
        for p in lay.order:
            r = by_p.get(p)
            if r is None:
                row[lay.headers[p]] = "—"
            elif seconds:
                row[lay.headers[p]] = "" if math.isnan(r["seconds"]) else f"{r['seconds']:.3f}"
            else:
                cell = _fmt_mean_ci(r["accuracy"], r["ci95"], 2)
                if r["task_set"] and not r["page_set"]:  # the row's label does not say it
                    cell += f" (tasks {r['task_set']})"
                if is_imported(r["task_source"]):
                    cell += " (imported)"
                row[lay.headers[p]] = cell
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


def _reported_display(long: pd.DataFrame, lay: _Layout) -> pd.DataFrame:
    """Markdown table of the reported numbers with the best measured entry of the same method."""
    rep = long[long["kind"] == "reported"]
    measured = long[long["kind"] == "measured"]
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
            if is_imported(best["task_source"]):
                ours += " (imported)"
            if best["entry"] != best["method"]:
                ours += f" ({best['entry']})"
        rows.append(
            {
                "Method": r["method"],
                lay.where_header: lay.where.get(r["protocol"], r["protocol"]),
                "Reported (%)": _fmt_reported(r["accuracy"], r["ci95"]),
                "Measured here (%)": ours,
                "Source": r["source"],
            }
        )
    return pd.DataFrame(rows)


def _write_page(
    long: pd.DataFrame,
    data: pd.DataFrame,
    lay: _Layout,
    out: Path,
    *,
    note: str = "",
    links: Sequence[str] = (),
    ci_note: str = "",
) -> list[Path]:
    """Write ``<stem>.md``, ``.csv`` (``long``, numbers as numbers) and ``.tex`` (wide, reported
    rows below a rule); return the paths."""
    shown, right = _wide(long, data, lay)
    md = [f"# {lay.title}", ""]
    if note:
        md += [note, ""]
    md += [line.replace("{n_entries}", str(len(shown))) for line in lay.intro]
    md += [
        f"## Accuracy (%) by {lay.axis}",
        "",
        lay.order_note,
        "",
        markdown_table(shown, right).rstrip("\n"),
        "",
    ]
    if ci_note:
        md += [ci_note, ""]
    rep = _reported_display(long, lay)
    if not rep.empty:
        md += [
            "## Reported in papers (not measured here)",
            "",
            "Numbers copied from the run cards (`baselines/*.toml`), beside the best measured "
            "configuration of the same method; the papers' protocols may differ from ours "
            "(see the cards' `differences`).",
            "",
            markdown_table(rep, [False, lay.where_right, True, True, False]).rstrip("\n"),
            "",
        ]
    secs, sright = _wide(long, data, lay, seconds=True)
    md += [f"## Seconds per task by {lay.axis}", "", markdown_table(secs, sright).rstrip("\n"), ""]
    md += lay.figures
    if links:
        md += ["## Per-protocol pages (with paired comparisons)", ""]
        md += [f"- [{Path(name).stem}]({name})" for name in links] + [""]

    out.mkdir(parents=True, exist_ok=True)
    paths = write_md_and_csv(out, lay.stem, md, long)
    tex_rows = [shown]
    rep_long = long[long["kind"] == "reported"]
    if not rep_long.empty:
        extra = []
        for (method, source), g in rep_long.groupby(["method", "source"], sort=False):
            row = dict.fromkeys(shown.columns, "")
            row["Method"] = f"{method} (reported: {_short_source(source)})"
            hit = False
            for _, r in g.iterrows():
                if r["protocol"] in lay.headers:
                    row[lay.headers[r["protocol"]]] = _fmt_reported(r["accuracy"], r["ci95"])
                    hit = True
            if hit:
                extra.append(row)
        if extra:
            tex_rows.append(pd.DataFrame(extra, columns=shown.columns))
    tex_table = pd.concat(tex_rows, ignore_index=True)
    caption = lay.caption
    if len(tex_rows) > 1:
        caption += "; rows below the rule are reported in papers, not measured here"
    tex = latex_table(
        tex_table,
        right,
        caption=caption,
        label=f"tab:{lay.stem}",
        rule_before=len(shown) if len(tex_rows) > 1 else None,
    )
    tex_path = out / f"{lay.stem}.tex"
    write_text_atomic(tex_path, tex)
    paths.append(tex_path)
    return paths


def _settings(data: pd.DataFrame) -> str:
    return ", ".join(sorted({s for s in data["setting"] if s})) or "unknown setting"


# --------------------------------------------------------------------------- family pages


def family_protocols(df: pd.DataFrame, family: str) -> list[str]:
    """The family's protocols with results, by numeric ``x_value`` (missing last), then name."""
    data = prepare(df)
    sub = data[families(data) == family]
    xs = sub.groupby("protocol")["x_value"].min()
    return sorted(
        xs.index, key=lambda p: (math.isnan(xs[p]), 0.0 if math.isnan(xs[p]) else xs[p], p)
    )


def _reported_x(protocol: str, family: str, data: pd.DataFrame) -> float | None:
    """The x value of a reported protocol of ``family``; ``None`` when it is another family's.

    Read from the rows; a protocol without results counts as the family's when its name says
    so (:func:`protocol_family`), with no x value (protocol files are not read)."""
    rows = data[data["protocol"] == protocol]
    if not rows.empty:
        return float(rows["x_value"].min()) if families(rows).iloc[0] == family else None
    return math.nan if protocol_family(protocol) == family else None


def family_summary(
    df: pd.DataFrame, family: str, reported: Mapping[str, Reported] | None = None
) -> pd.DataFrame:
    """Long table of a family: one ``kind="measured"`` row per protocol and entry (method,
    config_hash, code_fingerprint, backbone, task set) with :func:`summarise`'s numbers, then one ``kind="reported"`` row per number the papers
    report for a protocol of the family (``reported`` maps protocol → method → number)."""
    data = prepare(df)
    sub = data[families(data) == family]
    if sub.empty:
        known = sorted(set(families(data)))
        raise ReportError(f"no results for family {family!r}; families with results: {known}")
    order = family_protocols(sub, family)
    xs = sub.groupby("protocol")["x_value"].min().to_dict()
    label = axis_label(sub)
    table = _measured(sub, order)
    table["family"] = family
    table["x_value"] = table["protocol"].map(xs)
    table["x_label"] = label
    table["kind"] = "measured"
    table["source"] = ""
    rows = []
    for protocol, numbers in sorted((reported or {}).items()):
        x = _reported_x(protocol, family, data)
        if x is None:
            continue  # another family's protocol
        for method, value, source, ci in _reported_items(numbers):
            rows.append(
                _reported_row(
                    method,
                    value,
                    source,
                    ci,
                    family=family,
                    protocol=protocol,
                    x_value=x,
                    x_label=label,
                )
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


def _entry_order(measured: pd.DataFrame, order: Sequence[str]) -> list[tuple[str, ...]]:
    """:data:`~fewshot_bench.report.entries.PAGE_KEY` tuples, best at the largest x first; entries lacking it after."""
    pos = {p: i for i, p in enumerate(order)}
    keys = []
    for key, g in with_page_sets(measured).groupby(PAGE_KEY, sort=True):
        last = g.loc[g["protocol"].map(pos).idxmax()]
        keys.append((-pos[last["protocol"]], -last["accuracy"], tuple(key)))
    return [k for _, _, k in sorted(keys)]


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
    data = prepare(df)
    data = data[families(data) == family]
    long = family_summary(data, family, reported)
    order = family_protocols(data, family)
    label = axis_label(data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or safe_name(family)
    settings = _settings(data)
    x_of = data.groupby("protocol")["x_value"].min()
    xs = [float(x_of[p]) for p in order if not math.isnan(x_of[p])]
    span = f" ({xs[0]:g}–{xs[-1]:g} {label})" if len(xs) > 1 else ""

    png: Path | None = None
    if data["x_value"].dropna().nunique() > 1:
        png = plot_accuracy_curve(data, out / f"{stem}.png", title=f"{family}: accuracy vs {label}")

    rep = long[long["kind"] == "reported"]
    where = {
        p: p if math.isnan(x) else f"{x:g}"
        for p, x in zip(rep["protocol"], rep["x_value"], strict=True)
    }
    lay = _Layout(
        title=family,
        stem=stem,
        order=order,
        headers=_columns(long, order),
        keys=_entry_order(long[long["kind"] == "measured"], order),
        intro=[
            f"Setting: {settings}. {len(order)} protocols{span}, {{n_entries}} entries, "
            f"{len(data)} task results.",
            "",
        ],
        axis=label,
        order_note="Rows are ordered by accuracy at the largest budget; — = not run.",
        where_header=str(long["x_label"].iloc[0]) or "x",
        where=where,
        where_right=True,
        caption=f"{family} ({settings}): mean accuracy (%) ± 95% CI by {label}",
        backbone=short_backbone,
        figures=[f"![accuracy vs {label}]({png.name})", ""] if png is not None else [],
    )
    paths = _write_page(long, data, lay, out, note=note, links=links, ci_note=ci_note)
    return paths + ([png] if png is not None else [])


def best_at_largest(df: pd.DataFrame, family: str) -> tuple[str, str, float, float, str]:
    """(entry, x header, accuracy %, ci95, setting) of the best entry at the family's largest x
    value; the entry label ends in ``" (imported tasks)"`` when it ran on imported episodes."""
    long = family_summary(df, family)
    order = family_protocols(df, family)
    headers = _columns(long, order)
    measured = long[(long["kind"] == "measured") & (long["protocol"] == order[-1])]
    best = measured.loc[measured["accuracy"].idxmax()]
    return (
        str(best["entry"]) + (" (imported tasks)" if is_imported(best["task_source"]) else ""),
        headers[order[-1]],
        float(best["accuracy"]),
        float(best["ci95"]),
        str(best["setting"]),
    )


# --------------------------------------------------------------------------- group pages

_NAME_TOKENS = re.compile(r"([-_.])")


def group_headers(protocols: Sequence[str]) -> dict[str, str]:
    """Protocol → column header of a group page: the names without the name parts they all
    share at the start and at the end (``omniglot-5w1s``, ``omniglot-20w5s`` → ``5w1s``,
    ``20w5s``; ``mini-imagenet-5w1s``, ``omniglot-5w1s`` → ``mini-imagenet``, ``omniglot``).
    Parts are separated by ``-``, ``_`` or ``.``. The full names where fewer than two protocols
    are given or where that would leave an empty or repeated header."""
    names = list(dict.fromkeys(protocols))
    if len(names) < 2:
        return {p: p for p in names}
    toks = [_NAME_TOKENS.split(p) for p in names]  # word, sep, word, ..., word
    shortest = min(len(t) for t in toks)

    def same(sl: Callable[[list[str]], list[str]]) -> bool:
        return len({tuple(sl(t)) for t in toks}) == 1

    head = 0  # leading (word, separator) pairs shared by all
    while 2 * (head + 1) < shortest and same(lambda t, k=head + 1: t[: 2 * k]):
        head += 1
    tail = 0  # trailing (separator, word) pairs shared by all
    while 2 * (head + tail + 1) < shortest and same(lambda t, k=tail + 1: t[len(t) - 2 * k :]):
        tail += 1
    short = ["".join(t[2 * head : len(t) - 2 * tail]) for t in toks]
    if (head == 0 and tail == 0) or "" in short or len(set(short)) < len(short):
        return {p: p for p in names}
    return dict(zip(names, short, strict=True))


def _mean_order(measured: pd.DataFrame) -> list[tuple[str, ...]]:
    """:data:`~fewshot_bench.report.entries.PAGE_KEY` tuples by the mean accuracy over the columns each entry has (best
    first), then method, config hash, code, backbone and task set."""
    keys = []
    for key, g in with_page_sets(measured).groupby(PAGE_KEY, sort=True):
        keys.append((-float(g["accuracy"].mean()), tuple(key)))
    return [k for _, k in sorted(keys)]


def group_summary(
    df: pd.DataFrame,
    protocols: Sequence[str],
    reported: Mapping[str, Reported] | None = None,
    *,
    name: str = "group",
) -> pd.DataFrame:
    """Long table of a group page (:data:`GROUP_COLUMNS`): one ``kind="measured"`` row per
    (protocol, entry) of the given protocols, by protocol in the order given then
    accuracy, then one ``kind="reported"`` row per number the papers report for them
    (``reported`` maps protocol → method → ``value``, ``(value, source)`` or
    ``(value, source, ci)``). ``column`` is the protocol's header (:func:`group_headers`).

    Entries are (method, config_hash, code_fingerprint, backbone, task set); the runner's config
    hash covers the backbone, so one method on two backbones gives two entries, labelled by
    their backbones."""
    order = list(dict.fromkeys(protocols))
    if not order:
        raise ReportError("a group page needs at least one protocol")
    data = prepare(df)
    sub = data[data["protocol"].isin(order)]
    if sub.empty:
        known = sorted(data["protocol"].unique())
        raise ReportError(f"no results for any of {order}; protocols with results: {known}")
    headers = group_headers(order)
    table = _measured(sub, order)
    table["group"] = name
    table["column"] = table["protocol"].map(headers)
    table["kind"] = "measured"
    table["source"] = ""
    rows = []
    rep = reported or {}
    for protocol in order:
        items = sorted(_reported_items(rep.get(protocol, {})))
        for method, value, source, ci in items:
            rows.append(
                _reported_row(
                    method,
                    value,
                    source,
                    ci,
                    group=name,
                    protocol=protocol,
                    column=headers[protocol],
                )
            )
    parts = [table[GROUP_COLUMNS]]
    if rows:
        parts.append(pd.DataFrame(rows, columns=GROUP_COLUMNS))
    out = pd.concat(parts, ignore_index=True)
    return out.astype({"n_seeds": int, "n_tasks": int})


def write_group_page(
    df: pd.DataFrame,
    protocols: Sequence[str],
    out_dir: str | Path,
    reported: Mapping[str, Reported] | None = None,
    *,
    name: str,
    notes: Sequence[str] = (),
    stem: str | None = None,
    links: Sequence[str] = (),
    ci_note: str = "",
) -> list[Path]:
    """Write ``<name>.md``, ``.csv`` (:func:`group_summary`, numbers as numbers) and ``.tex``
    (wide) into ``out_dir``: one row per entry, one column per protocol in the order given
    (— where an entry did not run it; a protocol without results is an empty column), rows by
    the mean accuracy over the columns each has. ``notes``: dataset lines; ``links``:
    per-protocol page file names to list. Return the paths."""
    order = list(dict.fromkeys(protocols))
    long = group_summary(df, order, reported, name=name)
    data = prepare(df)
    data = data[data["protocol"].isin(order)]
    headers = group_headers(order)
    measured = long[long["kind"] == "measured"]
    settings = _settings(data)
    missing = [p for p in order if p not in set(data["protocol"])]
    intro = [
        f"Setting: {settings}. {len(order)} protocols, {{n_entries}} entries, "
        f"{len(data)} task results.",
        "",
    ]
    if any(headers[p] != p for p in order):
        intro += ["Columns: " + ", ".join(f"{headers[p]} = {p}" for p in order) + ".", ""]
    if missing:
        intro += [f"No results yet: {', '.join(missing)}.", ""]
    lay = _Layout(
        title=name,
        stem=stem or safe_name(name),
        order=order,
        headers=headers,
        keys=_mean_order(measured),
        intro=intro,
        axis="protocol",
        order_note=(
            "Rows are ordered by the mean accuracy over the columns each row has; — = not run "
            "(left out of that mean). Tasks: episodes per cell, all seeds (a range where cells "
            "differ)."
        ),
        where_header="Protocol",
        where={p: p for p in order},
        where_right=False,
        caption=f"{name} ({settings}): mean accuracy (%) ± 95% CI per protocol",
        tasks=True,
        backbone=short_backbone,
    )
    note = "\n\n".join(n for n in notes if n)
    return _write_page(long, data, lay, Path(out_dir), note=note, links=links, ci_note=ci_note)
