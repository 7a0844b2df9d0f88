"""A static HTML leaderboard site: ``index.html`` and one page per board, plain files that open
from disk (``file://``) or any static host, with no server, CDN or network at view time.

A *board* is what one Markdown page set covers (:func:`boards_for_all`: one per protocol
family, as ``fsbench leaderboard --all``; or one protocol, one family, one named group). A board
page has one table per protocol: sortable columns, a filter by setting, the mean ± 95% CI drawn
as a bar, the accuracy plot where the board spans several budgets, and per entry a provenance
panel (the command that reproduces it, parameters, hashes, hardware, wall time, seeds, commits,
the paper's number from the run card).

Every number comes from the statistics the Markdown boards use (:func:`leaderboard`,
:func:`format_table`, :func:`comparison_matrix`); nothing is recomputed here except sums and
counts of the store's own columns for the provenance panels. All text from the store is
HTML-escaped: plugin authors choose method names and parameters.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd

from fewshot_bench.atomic import write_text_atomic
from fewshot_bench.report.entries import (
    ENTRY_KEY,
    families,
    safe_name,
    short_backbone,
)
from fewshot_bench.report.family import family_protocols
from fewshot_bench.report.notes import dataset_notes, provenance_notes
from fewshot_bench.report.pages import CI_NOTE
from fewshot_bench.report.plots import axis_label, plot_accuracy_curve
from fewshot_bench.report.site_provenance import (
    _duration,
    _e,
    _is_nan,
    _wall,
    panel,
    reproduce_command,
)
from fewshot_bench.report.stats import ReportError, prepare
from fewshot_bench.report.tables import (
    _HEADERS,
    Reported,
    _fmt_mean_ci,
    comparison_matrix,
    format_table,
    leaderboard,
)

__all__ = [
    "ASSETS",
    "Board",
    "board_for",
    "boards_for_all",
    "group_board",
    "reproduce_command",
    "write_site",
]

#: The local files every page links to, copied into ``DIR/assets/``.
ASSETS = ("site.css", "site.js")
#: Settings in the order the filter lists them (others follow, sorted).
SETTING_ORDER = ("inductive", "transductive", "semi-supervised")
_BAR_W, _BAR_H, _BAR_PAD = 140, 14, 4
#: Board columns whose long text wraps in its cell.
_WRAP = {"tasks"}
#: Board columns shown in the provenance panel rather than the table (keeps it narrow).
PANEL_ONLY = ("source", "ci_over", "device", "config_hash", "code_fingerprint")


@dataclass(frozen=True)
class Board:
    """One page of the site: a title, its file stem and its protocols in column order."""

    title: str
    stem: str
    protocols: tuple[str, ...]


# --------------------------------------------------------------------------- which boards


def _unique_stems(boards: list[Board]) -> list[Board]:
    """Boards with stems that are unique and never ``index``."""
    seen: set[str] = {"index"}
    out = []
    for b in boards:
        stem, n = b.stem, 1
        while stem in seen:
            n += 1
            stem = f"{b.stem}-{n}"
        seen.add(stem)
        out.append(Board(b.title, stem, b.protocols))
    return out


def boards_for_all(df: pd.DataFrame) -> list[Board]:
    """One board per protocol family with results (as ``fsbench leaderboard --all``), by name;
    a family's protocols in budget order."""
    data = prepare(df)
    names = sorted(set(families(data)))
    return _unique_stems([Board(f, safe_name(f), tuple(family_protocols(data, f))) for f in names])


def board_for(df: pd.DataFrame, name: str) -> Board:
    """The board of one protocol or one family name (a protocol name wins, as in ``fsbench
    run``)."""
    data = prepare(df)
    if name in set(data["protocol"]):
        return Board(name, _stem(name), (name,))
    protos = family_protocols(data, name)
    if not protos:
        raise ReportError(
            f"no results for {name!r}; protocols with results: "
            f"{sorted(set(data['protocol']))}, families: {sorted(set(families(data)))}"
        )
    return Board(name, _stem(name), tuple(protos))


def group_board(protocols: Sequence[str], name: str) -> Board:
    """A named board over protocols that are not one sweep, in the order given."""
    return Board(name, _stem(name), tuple(dict.fromkeys(protocols)))


def _stem(name: str) -> str:
    stem = safe_name(name)
    return f"{stem}-board" if stem == "index" else stem


# --------------------------------------------------------------------------- small helpers


def _entry_id(protocol: str, key: Sequence[object]) -> str:
    """A stable anchor for one entry: the protocol's stem and a hash of its entry key."""
    digest = hashlib.sha1("\x1f".join(map(str, [protocol, *key])).encode()).hexdigest()[:10]
    return f"e-{safe_name(protocol)}-{digest}"


def _settings_in_order(values: Sequence[str]) -> list[str]:
    found = {s for v in values for s in str(v).split(", ") if s}
    return [s for s in SETTING_ORDER if s in found] + sorted(found - set(SETTING_ORDER))


# --------------------------------------------------------------------------- CI bars


def _scale(table: pd.DataFrame) -> tuple[float, float]:
    """The accuracy range (percent) one table's bars share: every interval and paper number."""
    acc, hw = table["accuracy"], table["ci95"].fillna(0.0)
    values = [*(acc - hw), *(acc + hw)]
    if "reported" in table.columns:
        values += [v for v in table["reported"] if not _is_nan(v)]
    values = [v for v in values if not _is_nan(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 100.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 1.0, hi + 1.0
    return lo, hi


def ci_bar(mean: float, hw: float, lo: float, hi: float, reported: float = math.nan) -> str:
    """An inline SVG: the 95% interval as a band, the mean as a tick, the paper's number as a
    red diamond, on the axis ``lo``..``hi`` (percent)."""

    def x(v: float) -> float:
        return _BAR_PAD + (v - lo) / (hi - lo) * (_BAR_W - 2 * _BAR_PAD)

    mid = _BAR_H / 2
    title = _fmt_mean_ci(mean, hw, 2)
    parts = [f'<line class="axis" x1="0" y1="{mid}" x2="{_BAR_W}" y2="{mid}"/>']
    if not _is_nan(mean):
        if not _is_nan(hw):
            a, b = x(mean - hw), x(mean + hw)
            parts.append(
                f'<rect class="band" x="{a:.1f}" y="2" width="{max(b - a, 1.0):.1f}" '
                f'height="{_BAR_H - 4}"/>'
            )
        m = x(mean)
        parts.append(f'<line class="mean" x1="{m:.1f}" y1="0" x2="{m:.1f}" y2="{_BAR_H}"/>')
    if not _is_nan(reported):
        r = x(reported)
        parts.append(
            f'<path class="paper" d="M{r:.1f} {mid - 4} L{r + 4:.1f} {mid} L{r:.1f} {mid + 4} '
            f'L{r - 4:.1f} {mid} Z"/>'
        )
        title += f"; paper {reported:.2f}"
    return (
        f'<svg class="ci" width="{_BAR_W}" height="{_BAR_H}" viewBox="0 0 {_BAR_W} {_BAR_H}" '
        f'role="img" aria-label="{_e(title)}"><title>{_e(title)}</title>{"".join(parts)}</svg>'
    )


# --------------------------------------------------------------------------- one protocol


def _raw_columns(board: pd.DataFrame) -> dict[str, str]:
    """Display header → the board column it shows (as :func:`format_table` names them)."""
    out: dict[str, str] = {}
    for col in board.columns:
        if col == "method" and "entry" in board.columns:
            continue
        out.setdefault(_HEADERS.get(str(col), str(col)), str(col))
    return out


def _board_table(board: pd.DataFrame, ids: list[str], reported_any: bool) -> str:
    """One protocol's ranked table as sortable HTML (display strings from format_table)."""
    shown_board = board.assign(backbone=board["backbone"].map(short_backbone))
    shown, right = format_table(shown_board)
    raw = _raw_columns(board)
    lo, hi = _scale(board)
    heads, numeric = [], []
    for header, is_right in zip(shown.columns, right, strict=True):
        col = raw.get(header, "")
        num = bool(col) and pd.api.types.is_numeric_dtype(board[col])
        numeric.append(num)
        cls = "sort num" if is_right else "sort"
        kind = "num" if num else "text"
        heads.append(f'<th class="{cls}" data-type="{kind}" scope="col">{_e(header)}</th>')
        if col == "accuracy":
            heads.append('<th scope="col">95% CI</th>')
    body = []
    for i, (_, row) in enumerate(board.iterrows()):
        cells = []
        for j, header in enumerate(shown.columns):
            col = raw.get(header, "")
            text = shown.iloc[i, j]
            cls = ' class="num"' if right[j] else ""
            key = ""
            if numeric[j]:
                v = row[col]
                key = f' data-sort="{"" if _is_nan(v) else repr(float(v))}"'
            if col == "entry":
                cells.append(f'<td class="entry"><a href="#{ids[i]}">{_e(text)}</a></td>')
            elif col in _WRAP:
                cells.append(f'<td class="wrap">{_e(text)}</td>')
            else:
                cells.append(f"<td{cls}{key}>{_e(text)}</td>")
            if col == "accuracy":
                rep = row["reported"] if reported_any else math.nan
                cells.append(f"<td>{ci_bar(row['accuracy'], row['ci95'], lo, hi, rep)}</td>")
        body.append(
            f'<tr id="row-{ids[i]}" data-setting="{_e(row["setting"])}" '
            f'data-entry="{_e(row["entry"])}">{"".join(cells)}</tr>'
        )
    return (
        '<div class="table-wrap"><table class="board sortable"><thead><tr>'
        + "".join(heads)
        + "</tr></thead><tbody>\n"
        + "\n".join(body)
        + "\n</tbody></table></div>"
    )


def _matrix_html(data: pd.DataFrame, protocol: str) -> str:
    m = comparison_matrix(data, protocol)
    head = "".join(f'<th scope="col">{_e(c)}</th>' for c in m.columns)
    rows = []
    for label, r in m.iterrows():
        cells = "".join(f'<td class="num">{_e(v)}</td>' for v in r)
        rows.append(f'<tr><th scope="row">{_e(label)}</th>{cells}</tr>')
    return (
        "<details><summary>Paired comparison (row − column, pp; paired t-test p)</summary>"
        f'<div class="table-wrap"><table><thead><tr><th>{_e(m.index.name)}</th>{head}</tr>'
        f"</thead><tbody>{''.join(rows)}</tbody></table></div></details>"
    )


def _protocol_section(
    data: pd.DataFrame, protocol: str, reported: Reported, *, heading: bool = True
) -> tuple[str, list[str], list[str]]:
    """(the protocol's section, its provenance panels, its settings); ``heading``: start
    with the protocol's name (not when it is the page's title)."""
    rows = data[data["protocol"] == protocol]  # prepared: keeps the task sets of the whole
    board = leaderboard(rows, protocol, reported or None)
    groups = dict(iter(rows.groupby(ENTRY_KEY[1:], sort=False)))
    keys = [tuple(k) for k in board[ENTRY_KEY[1:]].itertuples(index=False)]
    ids = [_entry_id(protocol, k) for k in keys]
    board = board.assign(protocol=protocol, params=[groups[k]["params"].iloc[0] for k in keys])
    shown = board.drop(columns=["protocol", "params", *PANEL_ONLY], errors="ignore")
    reported_any = "reported" in board.columns and board["reported"].notna().any()
    notes = provenance_notes(rows, [protocol])  # the data note is on the page, once
    html = [f'<section class="protocol" id="p-{safe_name(protocol)}">']
    if heading:
        html.append(f"<h2>{_e(protocol)}</h2>")
    html += [f'<p class="note">{_e(n)}</p>' for n in notes]
    settings = _settings_in_order(list(board["setting"]))
    html.append(
        f'<p class="meta">Setting: {_e(", ".join(settings) or "unknown")}. {len(board)} entries, '
        f"{len(rows)} task results. Click an entry for its provenance; click a column header "
        "to sort.</p>"
    )
    html.append(_board_table(shown, ids, reported_any))
    if len(board) > 1:
        html.append(_matrix_html(rows, protocol))
    html.append("</section>")
    panels = [
        panel(r, groups[k], anchor, reported)
        for (_, r), k, anchor in zip(board.iterrows(), keys, ids, strict=True)
    ]
    return "\n".join(html), panels, settings


# --------------------------------------------------------------------------- pages


def _page(title: str, body: str, *, index: bool = False) -> str:
    nav = "" if index else '<nav class="top"><a href="index.html">← all boards</a></nav>'
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)} — fewshot-bench</title>\n"
        '<link rel="stylesheet" href="assets/site.css">\n</head>\n<body>\n'
        f"{nav}\n{body}\n"
        '<script src="assets/site.js"></script>\n</body>\n</html>\n'
    )


def _plot(data: pd.DataFrame, board: Board, present: list[str], out: Path) -> Path | None:
    """The board's accuracy-vs-budget PNG, when its protocols are one family's sweep of several
    budgets (distinct x values), as the Markdown family pages draw it."""
    rows = data[data["protocol"].isin(present)]
    xs = rows.groupby("protocol")["x_value"].min()
    one_family = families(rows).nunique() == 1
    if len(present) < 2 or not one_family or xs.isna().any() or xs.duplicated().any():
        return None
    label = axis_label(rows)
    return plot_accuracy_curve(
        rows, out / f"{board.stem}.png", title=f"{board.title}: accuracy vs {label}"
    )


@dataclass(frozen=True)
class _Line:
    """What ``index.html`` says about one board."""

    board: Board
    present: list[str]
    settings: list[str]
    n_entries: int
    n_rows: int
    best: str
    best_where: str
    best_acc: str
    wall: float


def _board_page(
    data: pd.DataFrame, board: Board, out: Path, reported: Mapping[str, Reported]
) -> tuple[list[Path], _Line]:
    present = [p for p in board.protocols if p in set(data["protocol"])]
    if not present:
        raise ReportError(
            f"no results for any of {list(board.protocols)}; protocols with results: "
            f"{sorted(set(data['protocol']))}"
        )
    missing = [p for p in board.protocols if p not in present]
    sections, panels, settings = [], [], []
    n_entries = 0
    for p in present:
        heading = len(present) > 1 or p != board.title
        html, prov, sets = _protocol_section(data, p, reported.get(p, {}), heading=heading)
        sections.append(html)
        panels += prov
        settings += sets
        n_entries += len(prov)
    settings = _settings_in_order(settings)
    rows = data[data["protocol"].isin(present)]
    paths: list[Path] = []
    png = _plot(data, board, present, out)
    body = [f"<h1>{_e(board.title)}</h1>"]
    body += [f'<p class="note">{_e(n)}</p>' for n in dataset_notes(rows, present)]
    body.append(
        f'<p class="meta">{len(present)} protocol{"s" if len(present) > 1 else ""}, '
        f"{n_entries} entries, {len(rows)} task results; wall time "
        f"{_e(_duration(_wall(rows)))} (sum over tasks).</p>"
    )
    if missing:
        body.append(f'<p class="note">No results yet: {_e(", ".join(missing))}.</p>')
    options = ['<option value="">all settings</option>'] + [
        f'<option value="{_e(s)}">{_e(s)}</option>' for s in settings
    ]
    body.append(
        '<div class="controls"><label>Setting <select id="setting-filter">'
        + "".join(options)
        + '</select></label><span class="count" id="shown-count"></span>'
        '<span class="legend">bar: <i></i>95% CI <b></b>mean <s></s>paper (run card)</span></div>'
    )
    if len(present) > 1:
        body.append(
            "<p>Protocols: "
            + ", ".join(f'<a href="#p-{safe_name(p)}">{_e(p)}</a>' for p in present)
            + "</p>"
        )
    if png is not None:
        paths.append(png)
        body.append(
            f'<figure class="plot"><img src="{_e(png.name)}" alt="accuracy vs budget, '
            f'{_e(board.title)}"><figcaption class="legend">Mean accuracy with 95% CI bands.'
            "</figcaption></figure>"
        )
    body += sections
    body.append(f'<p class="ci-note">{_e(CI_NOTE)}</p>')
    body.append('<h2 id="provenance">Provenance</h2>')
    body.append('<p class="prov-hint">Click an entry in a table to show its panel here.</p>')
    body += panels
    page = out / f"{board.stem}.html"
    write_text_atomic(page, _page(board.title, "\n".join(body)))
    paths.insert(0, page)
    last = leaderboard(data[data["protocol"] == present[-1]], present[-1])
    top = last.iloc[0]
    line = _Line(
        board=board,
        present=present,
        settings=settings,
        n_entries=n_entries,
        n_rows=len(rows),
        best=str(top["entry"]),
        best_where=present[-1],
        best_acc=_fmt_mean_ci(top["accuracy"], top["ci95"], 2),
        wall=_wall(rows),
    )
    return paths, line


def _index_page(lines: Sequence[_Line], out: Path) -> Path:
    head = ["Board", "Protocols", "Settings", "Entries", "Task results", "Best entry", "At"]
    head += ["Accuracy (%)", "Wall time"]
    rows = []
    for ln in lines:
        cells = [
            f'<td><a href="{_e(ln.board.stem)}.html">{_e(ln.board.title)}</a></td>',
            f'<td class="num">{len(ln.present)}</td>',
            f"<td>{_e(', '.join(ln.settings))}</td>",
            f'<td class="num">{ln.n_entries}</td>',
            f'<td class="num">{ln.n_rows}</td>',
            f"<td>{_e(ln.best)}</td>",
            f"<td>{_e(ln.best_where)}</td>",
            f'<td class="num">{_e(ln.best_acc)}</td>',
            f'<td class="num" data-sort="{"" if _is_nan(ln.wall) else repr(ln.wall)}">{_e(_duration(ln.wall, short=True))}</td>',
        ]
        rows.append(f'<tr data-setting="{_e(", ".join(ln.settings))}">{"".join(cells)}</tr>')
    kinds = ["text", "num", "text", "num", "num", "text", "text", "num", "num"]
    ths = "".join(
        f'<th class="sort{" num" if k == "num" else ""}" data-type="{k}" scope="col">{_e(h)}</th>'
        for h, k in zip(head, kinds, strict=True)
    )
    body = [
        "<h1>fewshot-bench leaderboards</h1>",
        '<p class="meta">One board per protocol family (or the protocols selected). The best '
        "entry is the top of the last protocol's board (the largest budget of a sweep). Each "
        "board page has sortable tables, a setting filter, 95% CI bars and a provenance panel "
        "per entry.</p>",
        f'<div class="table-wrap"><table class="sortable index"><thead><tr>{ths}</tr></thead>'
        f"<tbody>\n{chr(10).join(rows)}\n</tbody></table></div>",
        f'<p class="ci-note">{_e(CI_NOTE)}</p>',
    ]
    path = out / "index.html"
    write_text_atomic(path, _page("Leaderboards", "\n".join(body), index=True))
    return path


def _copy_assets(out: Path) -> list[Path]:
    folder = out / "assets"
    folder.mkdir(parents=True, exist_ok=True)
    src = resources.files("fewshot_bench.report") / "site_assets"
    paths = []
    for name in ASSETS:
        paths.append(write_text_atomic(folder / name, (src / name).read_text(encoding="utf-8")))
    return paths


def write_site(
    df: pd.DataFrame,
    out_dir: str | Path,
    boards: Sequence[Board] | None = None,
    reported: Mapping[str, Reported] | None = None,
) -> list[Path]:
    """Write the site into ``out_dir``: ``index.html`` (last in the returned list), one
    ``<stem>.html`` per board (default: :func:`boards_for_all`), their plots and
    ``assets/site.css``, ``assets/site.js``. ``reported`` maps protocol → method → the paper's
    number ``value``, ``(value, source)`` or ``(value, source, ci)`` (the run cards). Other files
    in ``out_dir`` are left untouched."""
    data = prepare(df)
    chosen = list(boards) if boards is not None else boards_for_all(data)
    if not chosen:
        raise ReportError("no boards to write: the results hold no protocol")
    chosen = _unique_stems(chosen)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = _copy_assets(out)
    lines = []
    for board in chosen:
        written, line = _board_page(data, board, out, reported or {})
        paths += written
        lines.append(line)
    paths.append(_index_page(lines, out))
    return paths
