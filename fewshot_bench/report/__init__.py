"""Reports: confidence intervals, paired tests, leaderboards (Markdown, CSV, LaTeX) and plots.

All functions take the results store as a DataFrame (``run.load_results``), one row per task.
See :mod:`fewshot_bench.report.stats` for how intervals are computed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fewshot_bench.atomic import write_text_atomic
from fewshot_bench.report.plots import (
    axis_label,
    curve_table,
    families,
    plot_accuracy_curve,
    protocol_family,
)
from fewshot_bench.report.stats import (
    CI,
    PairedResult,
    ReportError,
    aggregate,
    format_p,
    mean_ci,
    paired_test,
    prepare,
)
from fewshot_bench.report.tables import (
    Reported,
    comparison_matrix,
    comparison_table,
    latex_escape,
    leaderboard,
    summarise,
    to_csv,
    to_latex,
    to_markdown,
)

__all__ = [
    "CI",
    "PairedResult",
    "ReportError",
    "Reported",
    "aggregate",
    "comparison_matrix",
    "comparison_table",
    "curve_table",
    "families",
    "format_p",
    "latex_escape",
    "leaderboard",
    "mean_ci",
    "paired_test",
    "plot_accuracy_curve",
    "prepare",
    "protocol_family",
    "summarise",
    "to_csv",
    "to_latex",
    "to_markdown",
    "safe_name",
    "write_leaderboard",
    "write_leaderboards",
]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

CI_NOTE = (
    "Mean accuracy ± 95% confidence interval. When every seed holds one task (semi-supervised "
    "splits) the interval is over seeds with Student-t; otherwise episodes of all seeds are pooled "
    "(1.96·sd/√n, Student-t below 30 episodes). Paired comparisons use only tasks both entries ran "
    "(same protocol, seed and task index): mean difference in percentage points and the paired "
    "t-test p-value."
)


def safe_name(protocol: str) -> str:
    """A file-name stem for a protocol (characters outside ``[A-Za-z0-9._-]`` become ``_``)."""
    return _UNSAFE.sub("_", protocol).strip("._") or "protocol"


def write_leaderboard(
    df: pd.DataFrame,
    protocol: str,
    out_dir: str | Path,
    reported: Reported | None = None,
    *,
    family: str | None = None,
) -> list[Path]:
    """Write ``<protocol>.md``, ``.csv`` and ``.tex`` (and ``.png``) into ``out_dir``; return paths.

    The PNG (accuracy vs ``x_value`` of the protocol's whole family, e.g. all label counts of
    CIFAR-10) is written when ``x_value`` takes more than one value in that family. ``family``
    overrides :func:`protocol_family`. Other files in ``out_dir`` are left untouched.
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
    if fam_rows["x_value"].dropna().nunique() > 1:
        title = None if family is None else f"{family}: accuracy vs {axis_label(fam_rows)}"
        png = plot_accuracy_curve(fam_rows, out / f"{stem}.png", title=title)

    md = [f"# {protocol}", "", f"Setting: {settings}. {len(rows)} task results.", ""]
    md += [to_markdown(board).rstrip("\n"), "", CI_NOTE, ""]
    if len(board) > 1:
        pairs = comparison_table(data, protocol)
        if (pairs["n_shared"] > 0).any():
            md += ["## Paired comparison (row − column, pp)", ""]
            md += [to_markdown(comparison_matrix(data, protocol)).rstrip("\n"), ""]
    if png is not None:
        md += [f"![accuracy vs {fam}]({png.name})", ""]
    md_path = out / f"{stem}.md"
    write_text_atomic(md_path, "\n".join(md).rstrip("\n") + "\n")
    paths.append(md_path)

    csv_path = out / f"{stem}.csv"
    to_csv(board, csv_path)
    paths.append(csv_path)

    tex_path = out / f"{stem}.tex"
    caption = f"{protocol} ({settings}): mean accuracy ± 95% CI"
    to_latex(board, tex_path, caption=caption, label=f"tab:{stem}")
    paths.append(tex_path)
    if png is not None:
        paths.append(png)
    return paths


def write_leaderboards(
    df: pd.DataFrame,
    out_dir: str | Path,
    protocols: Sequence[str] | None = None,
    reported: dict[str, Reported] | None = None,
) -> list[Path]:
    """:func:`write_leaderboard` for each protocol (all with results by default);
    ``reported`` maps protocol → that protocol's reported numbers."""
    data = prepare(df)
    names = list(protocols) if protocols is not None else sorted(data["protocol"].unique())
    paths: list[Path] = []
    for p in names:
        paths += write_leaderboard(data, p, out_dir, (reported or {}).get(p))
    return paths
