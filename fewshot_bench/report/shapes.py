"""The shape-robustness page of a protocol family whose protocols differ in episode shape
(``[shapes]`` families such as ``omniglot-shapes``): methods as rows, shapes as columns, and
each method's paired difference to a reference method (nearest-prototype) shape by shape.

Like every report it reads only the results store: a shape is the protocol name less the
family prefix (``5w1s-q5-u5d5-dir2``), an entry is (method, parameters, code, backbone).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from fewshot_bench.atomic import write_text_atomic
from fewshot_bench.report.entries import entry_labels, short_backbone, with_page_sets
from fewshot_bench.report.stats import (
    ReportError,
    aggregate,
    mean_ci,
    paired_differences,
    prepare,
)
from fewshot_bench.report.tables import markdown_table

#: The entry every other is compared with, task by task.
REFERENCE = "nearest-prototype"
#: A method counts as holding on a shape when its paired difference to the reference is above
#: minus this many percentage points.
TOLERANCE = 1.0


def is_shape_family(df: pd.DataFrame, family: str) -> bool:
    """Whether ``family``'s protocols differ in episode shape rather than in budget: several of
    its protocols share one ``x_value``."""
    sub = df[df["family"] == family].drop_duplicates("protocol")
    return len(sub) > 1 and sub["x_value"].duplicated().any()


def shape_tables(df: pd.DataFrame, family: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(accuracy ``mean ± CI`` per entry and shape, paired difference to the reference per entry
    and shape, summary per entry: shapes, mean accuracy, worst difference, shapes held)."""
    data = prepare(df)
    data = data[data["family"] == family].copy()
    if data.empty:
        raise ReportError(f"no results for family {family!r}")
    data["shape"] = data["protocol"].str.removeprefix(f"{family}-")
    # one label per entry across the shapes, qualified (backbone, config, code) only where
    # several entries share a name, as on family pages
    data = with_page_sets(data)
    data["entry"] = entry_labels(data.assign(task_set=data["page_set"]))
    shapes = sorted(data["shape"].unique(), key=_shape_order)
    entries = list(dict.fromkeys(data.sort_values("entry")["entry"]))
    acc = pd.DataFrame(index=entries, columns=shapes, dtype=object)
    diff = pd.DataFrame(index=entries, columns=shapes, dtype=object)
    worst: dict[str, tuple[float, str]] = {}
    held: dict[str, int] = {}
    means: dict[str, list[float]] = {}
    refs = [e for e in entries if e.split(" [")[0] == REFERENCE]
    for shape in shapes:
        here = data[data["shape"] == shape]
        ref = here[here["entry"] == refs[0]] if refs else None
        for entry, rows in here.groupby("entry"):
            acc.loc[entry, shape] = aggregate(rows).ci.format()
            means.setdefault(entry, []).append(float(rows["accuracy"].mean()))
            if ref is None or entry == refs[0] or ref.empty:
                continue
            d = paired_differences(rows, ref)
            if len(d) == 0:
                continue
            ci = mean_ci(d)
            diff.loc[entry, shape] = f"{100 * ci.mean:+.2f} ± {100 * ci.half_width:.2f}"
            if entry not in worst or ci.mean < worst[entry][0]:
                worst[entry] = (ci.mean, shape)
            held[entry] = held.get(entry, 0) + int(100 * ci.mean > -TOLERANCE)
    summary = pd.DataFrame(
        {
            "shapes": [int(acc.loc[e].notna().sum()) for e in entries],
            "mean accuracy": [f"{100 * np.mean(means[e]):.2f}" for e in entries],
            f"worst Δ vs {REFERENCE}": [
                f"{100 * worst[e][0]:+.2f} ({worst[e][1]})" if e in worst else "—" for e in entries
            ],
            f"shapes within {TOLERANCE:g} point": [
                f"{held[e]}/{int(diff.loc[e].notna().sum())}" if e in held else "—" for e in entries
            ],
        },
        index=entries,
    )
    backbones = sorted({short_backbone(b) for b in data["backbone"]})
    summary.attrs["backbones"] = backbones
    return acc.fillna("—"), diff.fillna("—"), summary


def _shape_order(shape: str) -> tuple:
    """Natural order: way, shot, queries, then pool and imbalance (numbers compared as numbers)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", shape))


def _markdown(frame: pd.DataFrame, first: str) -> str:
    table = frame.reset_index().rename(columns={"index": first}).astype(str)
    return markdown_table(table, [c != first for c in table.columns])


def write_shape_page(df: pd.DataFrame, family: str, out_dir: str | Path) -> list[Path]:
    """``<family>-shapes.md`` and ``.csv``: the summary, the accuracy table and the paired
    differences (methods as rows, shapes as columns)."""
    acc, diff, summary = shape_tables(df, family)
    out = Path(out_dir)
    lines = [
        f"# {family}: accuracy across episode shapes",
        "",
        f"Backbone: {', '.join(summary.attrs['backbones'])}. A shape is `<way>w<shot>s-q<queries "
        "per class>`, `-u<unlabeled per class>d<distractor classes>` with an unlabeled pool, "
        "`-dir<α>` when the queries per class are drawn from a Dirichlet(α) (imbalanced). Every "
        "method ran on the same tasks of each shape.",
        "",
        "## Summary",
        "",
        _markdown(summary, "Method"),
        "",
        f"Δ is the paired difference to {REFERENCE} on the very same tasks (percentage points, "
        f"mean ± 95% CI); a method holds on a shape when Δ > −{TOLERANCE:g}.",
        "",
        "## Accuracy (%)",
        "",
        _markdown(acc, "Method"),
        "",
        f"## Paired difference to {REFERENCE} (points)",
        "",
        _markdown(diff, "Method"),
        "",
        "Accuracy: mean ± 95% CI over the shape's episodes (1.96·sd/√n).",
        "",
    ]
    md = write_text_atomic(out / f"{family}-shapes.md", "\n".join(lines))
    csv = out / f"{family}-shapes.csv"
    write_text_atomic(csv, acc.to_csv(index_label="method"))
    return [md, csv]
