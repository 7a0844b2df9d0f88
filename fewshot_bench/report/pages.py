"""Leaderboard files: per-protocol pages, family and group pages, and ``index.md``.

Every page is written from the results store's rows alone (plus the reported numbers passed
in, from the run cards): the dataset line comes from the ``data_note`` column, families from
``family``, entry names from ``params``; imported episodes and protocols that ran on several
task sets get a note of their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fewshot_bench.atomic import write_text_atomic
from fewshot_bench.report.entries import families, is_imported, safe_name
from fewshot_bench.report.family import (
    best_at_largest,
    family_protocols,
    short_backbone,
    write_family_page,
    write_group_page,
)
from fewshot_bench.report.notes import dataset_note, dataset_notes, provenance_notes
from fewshot_bench.report.plots import axis_label, plot_accuracy_curve
from fewshot_bench.report.shapes import is_shape_family, write_shape_page
from fewshot_bench.report.stats import ReportError, prepare
from fewshot_bench.report.tables import (
    DIFFERENT_TASK_SETS,
    Reported,
    _fmt_mean_ci,
    comparison_matrix,
    comparison_table,
    leaderboard,
    markdown_table,
    to_latex,
    to_markdown,
    write_md_and_csv,
)

__all__ = [
    "CI_NOTE",
    "PageLine",
    "safe_name",
    "write_all",
    "write_family",
    "write_group",
    "write_index",
    "write_leaderboard",
    "write_leaderboards",
]

CI_NOTE = (
    "Mean accuracy ± 95% confidence interval. When every seed holds one task (semi-supervised "
    "splits) the interval is over seeds with Student-t; otherwise episodes of all seeds are pooled "
    "(1.96·sd/√n, Student-t below 30 episodes). Paired comparisons use only tasks both entries ran "
    "(the same task: same manifest hash, seed and task index; never task i of one task set with "
    "task i of another): mean difference in percentage points and the paired t-test p-value."
)


def _notes(data: pd.DataFrame, protocols: Sequence[str], note: str | None) -> list[str]:
    """Markdown paragraphs under a page title: the data note, imported episodes, task sets."""
    first = dataset_note(data, protocols) if note is None else note
    return [n for n in [first, *provenance_notes(data, protocols)] if n]


def write_leaderboard(
    df: pd.DataFrame,
    protocol: str,
    out_dir: str | Path,
    reported: Reported | None = None,
    *,
    family: str | None = None,
    note: str | None = None,
    plot: bool = True,
    family_page: str | None = None,
    group_page: str | None = None,
) -> list[Path]:
    """Write ``<protocol>.md``, ``.csv`` and ``.tex`` (and ``.png``) into ``out_dir``; return paths.

    The PNG (accuracy vs ``x_value`` of the protocol's whole family, e.g. all label counts of
    CIFAR-10) is written when ``plot`` and ``x_value`` takes more than one value in that family.
    ``family`` overrides the rows' ``family``. ``note``: the data line (default:
    :func:`~fewshot_bench.report.notes.dataset_note` of the rows' ``data_note``); notes on
    imported episodes and on several task sets of the protocol are always added.
    ``family_page``, ``group_page``: a family or group page file to link to. Other files in
    ``out_dir`` are left untouched.
    """
    data = prepare(df)
    board = leaderboard(data, protocol, reported)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = safe_name(protocol)
    rows = data[data["protocol"] == protocol]
    fam_of_rows = families(data)
    fam = family or fam_of_rows[data["protocol"] == protocol].iloc[0]
    settings = ", ".join(sorted({s for s in board["setting"] if s})) or "unknown setting"

    paths: list[Path] = []
    png: Path | None = None
    fam_rows = data[(fam_of_rows == fam) | (data["protocol"] == protocol)]
    if plot and fam_rows["x_value"].dropna().nunique() > 1:
        title = None if family is None else f"{family}: accuracy vs {axis_label(fam_rows)}"
        png = plot_accuracy_curve(fam_rows, out / f"{stem}.png", title=title)

    md = [f"# {protocol}", ""]
    for line in _notes(data, [protocol], note):
        md += [line, ""]
    md += [f"Setting: {settings}. {len(rows)} task results.", ""]
    if family_page:
        md += [f"Family page (all budgets): [{Path(family_page).stem}]({family_page})", ""]
    if group_page:
        md += [f"Group page: [{Path(group_page).stem}]({group_page})", ""]
    shown = board.assign(backbone=board["backbone"].map(short_backbone))
    md += [to_markdown(shown).rstrip("\n"), "", CI_NOTE, ""]
    if len(board) > 1:
        pairs = comparison_table(data, protocol)
        if (pairs["n_shared"] > 0).any() or (pairs["note"] == DIFFERENT_TASK_SETS).any():
            md += ["## Paired comparison (row − column, pp)", ""]
            if (pairs["note"] == DIFFERENT_TASK_SETS).any():
                md += [
                    "Entries on different task sets ran different tasks under the same indices: "
                    "they are not paired.",
                    "",
                ]
            md += [to_markdown(comparison_matrix(data, protocol)).rstrip("\n"), ""]
    if png is not None:
        md += [f"![accuracy vs {fam}]({png.name})", ""]
    paths += write_md_and_csv(out, stem, md, board)
    tex_path = out / f"{stem}.tex"
    caption = f"{protocol} ({settings}): mean accuracy ± 95% CI"
    if board["task_source"].map(is_imported).any():
        caption += "; imported episodes where the task set says so"
    to_latex(board, tex_path, caption=caption, label=f"tab:{stem}")
    paths.append(tex_path)
    if png is not None:
        paths.append(png)
    return paths


def write_leaderboards(
    df: pd.DataFrame,
    out_dir: str | Path,
    protocols: Sequence[str] | None = None,
    reported: Mapping[str, Reported] | None = None,
) -> list[Path]:
    """:func:`write_leaderboard` for each protocol (all with results by default);
    ``reported`` maps protocol → that protocol's reported numbers."""
    data = prepare(df)
    names = list(protocols) if protocols is not None else sorted(data["protocol"].unique())
    paths: list[Path] = []
    for p in names:
        paths += write_leaderboard(data, p, out_dir, (reported or {}).get(p))
    return paths


def _family_stem(family: str, protocols: Sequence[str]) -> str:
    stem = safe_name(family)
    return f"{stem}-family" if stem in {safe_name(p) for p in protocols} else stem


def write_family(
    df: pd.DataFrame,
    family: str,
    out_dir: str | Path,
    reported: Mapping[str, Reported] | None = None,
) -> list[Path]:
    """Pages for a protocol family: one page per protocol, plus, when the family has more than
    one protocol with results, the family page (:func:`write_family_page`) they link to."""
    data = prepare(df)
    protos = family_protocols(data, family)
    if not protos:
        known = sorted(set(families(data)))
        raise ReportError(f"no results for family {family!r}; families with results: {known}")
    rep = reported or {}
    if len(protos) == 1:
        return write_leaderboard(data, protos[0], out_dir, rep.get(protos[0]), family=family)
    shapes = is_shape_family(data, family)
    stem = f"{safe_name(family)}-shapes" if shapes else _family_stem(family, protos)
    paths: list[Path] = []
    links = []
    for p in protos:
        written = write_leaderboard(
            data,
            p,
            out_dir,
            rep.get(p),
            family=family,
            plot=False,
            family_page=f"{stem}.md",
        )
        links.append(written[0].name)
        paths += written
    if shapes:  # protocols differ in episode shape, not in budget: methods x shapes
        return write_shape_page(data, family, out_dir) + paths
    note = "\n\n".join(_notes(data, protos, None))
    page = write_family_page(
        data, family, out_dir, rep, note=note, stem=stem, links=links, ci_note=CI_NOTE
    )
    return page + paths


def write_group(
    df: pd.DataFrame,
    protocols: Sequence[str],
    name: str,
    out_dir: str | Path,
    reported: Mapping[str, Reported] | None = None,
) -> list[Path]:
    """Pages for protocols that are not one sweep (e.g. Omniglot 5/20-way 1/5-shot): one page
    per protocol with results (linking to the group page), plus the group page
    :func:`write_group_page` ``<name>.md/.csv/.tex`` with one column per protocol in the order
    given (``<name>-group`` when ``name`` is one of the protocols). ``reported`` maps protocol →
    method → ``(value, source[, ci])``. Group page paths first."""
    data = prepare(df)
    order = list(dict.fromkeys(protocols))
    present = [p for p in order if p in set(data["protocol"])]
    if not present:
        known = sorted(data["protocol"].unique())
        raise ReportError(f"no results for any of {order}; protocols with results: {known}")
    stem = safe_name(name)
    if stem in {safe_name(p) for p in order}:
        stem += "-group"
    rep = reported or {}
    paths: list[Path] = []
    links = []
    for p in present:
        written = write_leaderboard(data, p, out_dir, rep.get(p), group_page=f"{stem}.md")
        links.append(written[0].name)
        paths += written
    page = write_group_page(
        data,
        order,
        out_dir,
        rep,
        name=name,
        notes=[*dataset_notes(data, order), *provenance_notes(data, order)],
        stem=stem,
        links=links,
        ci_note=CI_NOTE,
    )
    return page + paths


@dataclass(frozen=True)
class PageLine:
    """One line of ``index.md``: a page, its protocols and its best entry."""

    family: str
    page: str
    n_protocols: int
    best: str
    where: str
    accuracy: float
    ci95: float
    setting: str = ""


def _page_line(data: pd.DataFrame, family: str) -> PageLine:
    protos = family_protocols(data, family)
    if len(protos) > 1:
        entry, where, acc, hw, setting = best_at_largest(data, family)
        shapes = is_shape_family(data, family)
        page = f"{safe_name(family)}-shapes.md" if shapes else f"{_family_stem(family, protos)}.md"
        return PageLine(family, page, len(protos), entry, where, acc, hw, setting)
    board = leaderboard(data, protos[0])
    top = board.iloc[0]
    page = f"{safe_name(protos[0])}.md"
    entry = str(top["entry"]) + (" (imported tasks)" if is_imported(top["task_source"]) else "")
    return PageLine(family, page, 1, entry, protos[0], top["accuracy"], top["ci95"], top["setting"])


def write_index(lines: Sequence[PageLine], out_dir: str | Path) -> Path:
    """``index.md``: one table row per page (family, best entry and its accuracy)."""
    rows = []
    for ln in lines:
        acc = _fmt_mean_ci(ln.accuracy, ln.ci95, 2)
        rows.append(
            {
                "Page": f"[{ln.family}]({ln.page})",
                "Protocols": str(ln.n_protocols),
                "Best entry": ln.best,
                "Setting": ln.setting,
                "At": ln.where,
                "Accuracy (%)": acc,
            }
        )
    columns = ["Page", "Protocols", "Best entry", "Setting", "At", "Accuracy (%)"]
    shown = pd.DataFrame(rows, columns=columns)
    text = "\n".join(
        [
            "# Leaderboards",
            "",
            "One line per protocol family; for sweeps the best entry is the one at the largest "
            "budget; its setting says whether it saw the queries (transductive) or the unlabeled "
            "pool (semi-supervised). Accuracy is the mean ± 95% CI measured here.",
            "",
            markdown_table(shown, [False, True, False, False, False, True]).rstrip("\n"),
        ]
    )
    path = Path(out_dir) / "index.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text + "\n")
    return path


def write_all(
    df: pd.DataFrame,
    out_dir: str | Path,
    reported: Mapping[str, Reported] | None = None,
) -> list[Path]:
    """:func:`write_family` for every protocol family with results, then ``index.md`` (last)."""
    data = prepare(df)
    fams = families(data)
    paths: list[Path] = []
    lines = []
    for family in sorted(set(fams)):
        paths += write_family(data, family, out_dir, reported)
        lines.append(_page_line(data, family))
    paths.append(write_index(lines, out_dir))
    return paths
