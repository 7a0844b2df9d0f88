"""The shape page of a [shapes] family: methods x shapes, paired differences to
nearest-prototype, and the summary of where each method holds."""

from __future__ import annotations

import numpy as np
import pytest
from report_rows import v2_frame, v2_row

from fewshot_bench.report.pages import write_family
from fewshot_bench.report.shapes import is_shape_family, shape_tables

SHAPES = {"5w1s-q1": 1.0, "5w1s-q5": 1.0, "20w1s-q1": 1.0}


@pytest.fixture
def frame():
    rng = np.random.default_rng(0)
    rows = []
    for shape in SHAPES:
        protocol = f"fam-{shape}"
        for i in range(40):
            base = float(rng.random() < 0.9)
            # "graph" drops 20 points on the 20-way shape only; "tied" is always identical
            graph = base if shape != "20w1s-q1" or i % 5 else 0.0
            for method, acc in (("nearest-prototype", base), ("graph", graph), ("tied", base)):
                rows.append(
                    v2_row(protocol, method, 0, i, acc, family="fam", x_value=SHAPES[shape])
                )
    return v2_frame(rows)


def test_shape_family_page(frame, tmp_path):
    assert is_shape_family(frame, "fam")
    acc, diff, summary = shape_tables(frame, "fam")
    assert list(acc.columns) == ["5w1s-q1", "5w1s-q5", "20w1s-q1"]  # natural order
    assert summary.loc["graph", "worst Δ vs nearest-prototype"].startswith("-")
    assert "(20w1s-q1)" in summary.loc["graph", "worst Δ vs nearest-prototype"]
    assert summary.loc["graph", "shapes within 1 point"] == "2/3"
    assert summary.loc["tied", "shapes within 1 point"] == "3/3"
    assert diff.loc["tied", "5w1s-q1"].startswith("+0.00")
    paths = write_family(frame, "fam", tmp_path)
    assert paths[0].name == "fam-shapes.md"
    text = paths[0].read_text()
    assert "| graph | 3 |" in text and "## Paired difference to nearest-prototype" in text
