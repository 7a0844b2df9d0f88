"""Reports: confidence intervals, paired tests, leaderboards (Markdown, CSV, LaTeX) and plots.

All functions take the results store as a DataFrame (``run.load_results``), one row per task,
and read nothing else: entry names come from the store's ``params`` column, families from
``family``, dataset notes from ``data_note``; no method, dataset or protocol code is imported,
so a published table does not move when a default or a protocol file changes later. Run cards
(``baselines/*.toml``, :mod:`fewshot_bench.report.cards`) are read as data for the papers'
reported numbers.

An entry is (protocol, method, config_hash, code_fingerprint, backbone) on one task set; rows
of different task sets (manifests) or code are never pooled, and paired comparisons pair only
the very same tasks (see :mod:`fewshot_bench.report.entries`, :mod:`fewshot_bench.report.stats`).

Modules, leaves first (each imports only modules above it, so there is no import cycle):
``entries`` → ``stats`` → ``notes``, ``tables``, ``plots`` → ``shapes``, ``family`` → ``pages``;
``cards`` stands alone. This package module only re-exports.
"""

from __future__ import annotations

from fewshot_bench.report.entries import (
    ENTRY_KEY,
    PAGE_KEY,
    entry_labels,
    entry_name,
    families,
    format_params,
    protocol_family,
    safe_name,
    short_backbone,
)
from fewshot_bench.report.family import (
    best_at_largest,
    family_protocols,
    family_summary,
    group_headers,
    group_summary,
    write_family_page,
    write_group_page,
)
from fewshot_bench.report.notes import (
    dataset_note,
    dataset_notes,
    imported_notes,
    provenance_notes,
    task_set_notes,
)
from fewshot_bench.report.pages import (
    CI_NOTE,
    PageLine,
    write_all,
    write_family,
    write_group,
    write_index,
    write_leaderboard,
    write_leaderboards,
)
from fewshot_bench.report.plots import axis_label, curve_table, plot_accuracy_curve
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
    markdown_table,
    summarise,
    to_csv,
    to_latex,
    to_markdown,
)

__all__ = [
    "CI",
    "CI_NOTE",
    "ENTRY_KEY",
    "PAGE_KEY",
    "PageLine",
    "PairedResult",
    "ReportError",
    "Reported",
    "aggregate",
    "axis_label",
    "best_at_largest",
    "comparison_matrix",
    "comparison_table",
    "curve_table",
    "dataset_note",
    "dataset_notes",
    "entry_labels",
    "entry_name",
    "families",
    "family_protocols",
    "family_summary",
    "format_p",
    "format_params",
    "group_headers",
    "group_summary",
    "imported_notes",
    "latex_escape",
    "leaderboard",
    "markdown_table",
    "mean_ci",
    "paired_test",
    "plot_accuracy_curve",
    "prepare",
    "protocol_family",
    "provenance_notes",
    "safe_name",
    "short_backbone",
    "summarise",
    "task_set_notes",
    "to_csv",
    "to_latex",
    "to_markdown",
    "write_all",
    "write_family",
    "write_family_page",
    "write_group",
    "write_group_page",
    "write_index",
    "write_leaderboard",
    "write_leaderboards",
]
