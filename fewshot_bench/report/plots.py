"""Accuracy-vs-labels plots with 95% CI bands, written as PNG without a display.

Uses :class:`matplotlib.figure.Figure` with the Agg canvas directly (never ``pyplot``), so it
works headless and does not touch the global backend.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from fewshot_bench.report.entries import (
    PAGE_KEY,
    entry_labels,
    families,
    is_imported,
    protocol_family,
    with_page_sets,
)
from fewshot_bench.report.stats import ReportError, aggregate, prepare

__all__ = ["axis_label", "curve_table", "families", "plot_accuracy_curve", "protocol_family"]


def curve_table(df: pd.DataFrame, x: str = "x_value") -> pd.DataFrame:
    """The points behind :func:`plot_accuracy_curve`: one row per series and x value, with
    ``accuracy`` and ``ci95`` in percent and the CI unit (``ci_over``).

    A series is one entry across protocols (method, config, code, backbone, and task set where
    it ran on several of a protocol; :data:`~fewshot_bench.report.entries.PAGE_KEY`), named as
    on the pages; ``" (imported)"`` is added to
    a series any of whose points ran on imported episodes."""
    df = prepare(df)
    if x not in df.columns:
        raise ReportError(f"results have no {x!r} column to plot against")
    df = df.assign(_x=pd.to_numeric(df[x], errors="coerce")).dropna(subset=["_x"])
    if df.empty:
        raise ReportError(f"no result row has a value in {x!r}; nothing to plot")
    df = with_page_sets(df)
    entries = df.drop_duplicates(PAGE_KEY)
    names = dict(
        zip(
            entries[PAGE_KEY].itertuples(index=False, name=None),
            entry_labels(entries.assign(task_set=entries["page_set"])),
            strict=True,
        )
    )
    imported = {
        k for k, g in df.groupby(PAGE_KEY, sort=False) if g["task_source"].map(is_imported).any()
    }
    settings = set(df["setting"])
    rows = []
    for key, g in df.groupby([*PAGE_KEY, "setting", "_x"], sort=True):
        entry, s, xv = tuple(key[: len(PAGE_KEY)]), key[-2], key[-1]
        label = names[entry] + (" (imported)" if entry in imported else "")
        label += f" ({s})" if len(settings) > 1 and s else ""
        agg = aggregate(g, "accuracy")
        rows.append(
            {
                "series": label,
                "method": entry[0],
                "config_hash": entry[1],
                "code_fingerprint": entry[2],
                "backbone": entry[3],
                "page_set": entry[4],
                "setting": s,
                "x": float(xv),
                "accuracy": agg.ci.mean * 100,
                "ci95": agg.ci.half_width * 100,
                "ci_over": agg.describe(),
            }
        )
    return pd.DataFrame(rows)


def axis_label(df: pd.DataFrame, x: str = "x_value") -> str:
    """The x-axis label: the results' ``x_label`` values for ``x_value``, else the column name."""
    if x == "x_value" and "x_label" in df.columns:
        given = sorted({str(v) for v in df["x_label"].dropna() if str(v)})
        if given:
            return " / ".join(given)
    return x.replace("_", " ")


def plot_accuracy_curve(
    df: pd.DataFrame,
    path: str | Path,
    *,
    x: str = "x_value",
    title: str | None = None,
    x_label: str | None = None,
) -> Path:
    """Accuracy (%) against ``x`` (labels or shots per class) per method with 95% CI bands, as PNG.

    Rows without an ``x`` value are left out. The x axis is logarithmic when the values span more
    than one decade. The default title is the protocol family (see :func:`protocol_family`).
    """
    prepared = prepare(df)
    points = curve_table(prepared, x)
    if x_label is None:
        x_label = axis_label(prepared, x)
    if title is None:
        with_x = prepared[pd.to_numeric(prepared[x], errors="coerce").notna()]
        fams = sorted(set(families(with_x)))
        title = f"{', '.join(fams)}: accuracy vs {x_label}"

    n_series = points["series"].nunique()
    many = n_series > 6
    fig = Figure(figsize=(10.0, 4.8) if many else (6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs_all = np.sort(points["x"].unique())
    colors = matplotlib.colormaps["tab20" if n_series > 10 else "tab10"].colors
    styles = ["-", "--", ":", "-."]
    # best series at the largest x first, so the legend reads like the leaderboard
    last = points[points["x"] == xs_all[-1]].sort_values("accuracy", ascending=False)["series"]
    order = list(dict.fromkeys([*last, *points["series"]]))
    for i, series in enumerate(order):
        g = points[points["series"] == series].sort_values("x")
        xs, ys, hw = g["x"].to_numpy(), g["accuracy"].to_numpy(), g["ci95"].to_numpy()
        color = colors[i % len(colors)]
        style = styles[(i // len(colors)) % len(styles)]
        ax.plot(xs, ys, style, color=color, marker="o", markersize=4, linewidth=1.5, label=series)
        if np.isfinite(hw).any():
            band = 0.08 if many else 0.2
            ax.fill_between(xs, ys - hw, ys + hw, color=color, alpha=band, linewidth=0)
    positive = xs_all[xs_all > 0]
    if len(positive) == len(xs_all) and len(xs_all) > 1 and xs_all.max() / xs_all.min() > 10:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(xs_all))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{v:g}" for v in xs_all])
    elif len(xs_all) <= 12:
        ax.set_xticks(xs_all)
        ax.set_xticklabels([f"{v:g}" for v in xs_all])
    ax.set_xlabel(x_label)
    ax.set_ylabel("accuracy (%) ± 95% CI")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if many:
        ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
