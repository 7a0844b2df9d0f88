"""fewshot_bench.report: CI math, paired tests, tables, renderers, plots, leaderboard files."""

from __future__ import annotations

import io
import json
import math
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from report_rows import v2_row
from scipy import stats

from fewshot_bench.report import (
    CI,
    ReportError,
    aggregate,
    comparison_matrix,
    comparison_table,
    latex_escape,
    leaderboard,
    mean_ci,
    paired_test,
    plot_accuracy_curve,
    prepare,
    protocol_family,
    summarise,
    to_csv,
    to_latex,
    to_markdown,
    write_leaderboard,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(protocol, method, seed, task, acc, **kw):
    """A full schema-2 store row (see report_rows.v2_row)."""
    return v2_row(protocol, method, seed, task, acc, **kw)


@pytest.fixture(scope="module")
def ssl_df() -> pd.DataFrame:
    """Semi-supervised family: three label counts, one task per seed, two methods."""
    rng = np.random.default_rng(0)
    rows = []
    for proto, x in [("cifar10-40", 4.0), ("cifar10-250", 25.0), ("cifar10-4000", 400.0)]:
        for method, base in [("label_prop", 0.6), ("mean_teacher", 0.45)]:
            for seed in range(4):
                acc = base + 0.05 * math.log10(x) + rng.normal(0, 0.02)
                rows.append(
                    _row(proto, method, seed, 0, acc, setting="semi-supervised", x_value=x,
                         x_label="labels per class", seconds=12.0)
                )  # fmt: skip
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def episodic_df() -> pd.DataFrame:
    """Episodic protocol, two seeds x 50 episodes, three methods on the same tasks."""
    rng = np.random.default_rng(1)
    rows = []
    for method, base, setting in [
        ("protonet", 0.50, "inductive"),
        ("proto_lp", 0.56, "transductive"),
        ("maml", 0.48, "inductive"),
    ]:
        for seed in range(2):
            for t in range(50):
                acc = float(np.clip(base + rng.normal(0, 0.08), 0, 1))
                rows.append(_row("mini-5way-1shot", method, seed, t, acc, setting=setting))
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ confidence intervals


def test_mean_ci_hand_computed():
    v = [0.5, 0.6, 0.7, 0.8]
    sd = math.sqrt(0.05 / 3)  # 0.129099...
    normal = mean_ci(v, method="normal")
    assert normal.mean == pytest.approx(0.65)
    assert normal.sd == pytest.approx(0.1290994, abs=1e-7)
    assert normal.half_width == pytest.approx(0.1265175, abs=1e-6)  # 1.96 * sd / 2
    assert normal.n == 4 and normal.method == "normal"
    t = mean_ci(v, method="t")
    assert t.half_width == pytest.approx(3.182446 * sd / 2, abs=1e-6)  # 0.205426
    assert t.method == "t"
    assert (t.low, t.high) == pytest.approx((0.65 - 0.205426, 0.65 + 0.205426), abs=1e-6)
    assert mean_ci(v).method == "t"  # auto: few values -> Student-t
    assert mean_ci(np.linspace(0, 1, 30)).method == "normal"
    assert t.format() == "65.00 ± 20.54"


def test_mean_ci_single_value_and_bad_input():
    one = mean_ci([0.7])
    assert one.mean == 0.7 and one.n == 1
    assert math.isnan(one.half_width) and math.isnan(one.sd)
    assert one.method == "none" and not one.has_interval
    assert "no CI" in one.format()
    with pytest.raises(ReportError, match="no values"):
        mean_ci([])
    with pytest.raises(ReportError, match="NaN"):
        mean_ci([0.5, float("nan")])
    with pytest.raises(ValueError):
        mean_ci([0.5, 0.6], method="bootstrap")  # type: ignore[arg-type]


def test_aggregate_unit(ssl_df, episodic_df):
    ssl = aggregate(ssl_df[(ssl_df.protocol == "cifar10-250") & (ssl_df.method == "label_prop")])
    assert ssl.unit == "seeds" and ssl.ci.method == "t" and ssl.ci.n == 4
    ep = aggregate(episodic_df[episodic_df.method == "protonet"])
    assert ep.unit == "tasks" and ep.ci.method == "normal" and ep.ci.n == 100
    assert ep.describe() == "100 tasks (normal)"


# ------------------------------------------------------------------ paired tests


def test_paired_test_known_differences():
    diffs = np.array([0.10, 0.05, 0.20, -0.02, 0.08, 0.12])
    b = np.array([0.50, 0.60, 0.40, 0.70, 0.55, 0.45])
    rows = [_row("p", "B", s, t, b[2 * s + t]) for s in range(3) for t in range(2)]
    rows += [
        _row("p", "A", s, t, b[2 * s + t] + diffs[2 * s + t]) for s in range(3) for t in range(2)
    ]
    rows.append(_row("p", "A", 9, 0, 0.99))  # only A ran this task: not paired
    rows.append(_row("other", "B", 0, 0, 0.1))  # another protocol, only B
    r = paired_test(pd.DataFrame(rows), "A", "B")
    assert r.n == 6
    assert r.mean_diff == pytest.approx(diffs.mean())
    assert r.ci.half_width == pytest.approx(
        stats.t.ppf(0.975, 5) * diffs.std(ddof=1) / math.sqrt(6)
    )
    assert r.t_pvalue == pytest.approx(stats.ttest_rel(b + diffs, b).pvalue)
    assert r.wilcoxon_pvalue == pytest.approx(stats.wilcoxon(diffs).pvalue)
    # CI and t-test agree: the interval excludes 0 iff p < 0.05
    assert (r.ci.low > 0) == (r.t_pvalue < 0.05)
    # reversed order flips the sign
    assert paired_test(pd.DataFrame(rows), "B", "A").mean_diff == pytest.approx(-diffs.mean())


def test_paired_test_identical_methods():
    rows = [_row("p", m, 0, t, 0.5 + 0.01 * t) for m in ("A", "B") for t in range(5)]
    r = paired_test(pd.DataFrame(rows), "A", "B")
    assert r.mean_diff == 0 and r.t_pvalue == 1.0 and r.wilcoxon_pvalue == 1.0


def test_paired_test_errors():
    rows = [_row("p", "A", 0, t, 0.5) for t in range(3)]
    rows += [_row("p", "B", 1, t, 0.6) for t in range(3)]  # other seed: nothing shared
    df = pd.DataFrame(rows)
    with pytest.raises(ReportError, match="share no tasks"):
        paired_test(df, "A", "B")
    with pytest.raises(ReportError, match="no results for method 'C'"):
        paired_test(df, "A", "C")
    two_cfg = df.copy()
    extra = pd.DataFrame([_row("p", "A", 0, t, 0.4, config_hash="other") for t in range(3)])
    two_cfg = pd.concat([two_cfg, extra], ignore_index=True)
    with pytest.raises(ReportError, match="several configurations"):
        paired_test(two_cfg, "A", "B")


# ------------------------------------------------------------------ tables


def test_summarise(episodic_df):
    df = episodic_df.copy()
    df.loc[df.method == "maml", "top5"] = 0.9
    df.loc[(df.method == "maml") & (df.seed == 1), "device"] = "cuda:0"
    s = summarise(df)
    assert len(s) == 3
    assert set(s["n_tasks"]) == {100} and set(s["n_seeds"]) == {2}
    maml = s[s.method == "maml"].iloc[0]
    assert maml["top5"] == pytest.approx(90.0)
    assert maml["device"] == "cpu, cuda:0"
    proto = s[s.method == "protonet"].iloc[0]
    expected = mean_ci(df[df.method == "protonet"].accuracy, method="normal")
    assert proto["accuracy"] == pytest.approx(expected.mean * 100)
    assert proto["ci95"] == pytest.approx(expected.half_width * 100)
    assert math.isnan(proto["top5"])
    assert proto["seconds"] == pytest.approx(0.5)


def test_summarise_orders_sweeps_by_budget(episodic_df):
    # label counts that sort wrongly as text (100 < 1000 < 2000 < 250 < 50)
    rows = []
    for n in (1000, 50, 2000, 250, 100):
        for method, base in [("lp", 0.7), ("lr", 0.6), ("mt", 0.8 if n == 250 else 0.5)]:
            rows += [
                _row(f"cifar10-{n}", method, s, 0, base + 0.01 * s, x_value=float(n),
                     x_label="labels", setting="semi-supervised")
                for s in range(3)
            ]  # fmt: skip
    df = pd.concat([pd.DataFrame(rows), episodic_df], ignore_index=True)
    s = summarise(df)
    sweep = s[s.protocol.str.startswith("cifar10-")]
    protos = list(dict.fromkeys(sweep["protocol"]))
    assert protos == ["cifar10-50", "cifar10-100", "cifar10-250", "cifar10-1000", "cifar10-2000"]
    assert list(sweep[sweep.protocol == "cifar10-250"]["method"]) == ["mt", "lp", "lr"]
    assert list(sweep[sweep.protocol == "cifar10-50"]["method"]) == ["lp", "lr", "mt"]
    # families first ("cifar10" < "mini"), each family contiguous, accuracy descending inside
    assert list(s["protocol"].iloc[-3:]) == ["mini-5way-1shot"] * 3
    assert s[s.protocol == "mini-5way-1shot"]["accuracy"].is_monotonic_decreasing
    # the store's "family" column takes precedence over names
    fam = df.assign(family=np.where(df.protocol == "mini-5way-1shot", "a-first", "z-last"))
    assert summarise(fam)["protocol"].iloc[0] == "mini-5way-1shot"


def test_prepare_duplicates_and_missing_columns():
    rows = [
        _row("p", "A", 0, 0, 0.3, timestamp="2024-01-01"),
        _row("p", "A", 0, 0, 0.8, timestamp="2024-02-01"),
    ]
    with pytest.warns(UserWarning, match="duplicate"):
        out = prepare(pd.DataFrame(rows))
    assert len(out) == 1 and out["accuracy"].iloc[0] == 0.8
    minimal = pd.DataFrame([{"protocol": "p", "manifest_hash": "m", "method": "A",
                             "config_hash": "c", "seed": 0, "task_index": 0,
                             "accuracy": 0.5}])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(summarise(minimal)) == 1
    with pytest.raises(ReportError, match="missing column"):
        prepare(minimal.drop(columns="task_index"))
    # without the manifest hash rows of different task sets could be pooled: refused
    with pytest.raises(ReportError, match=r"missing column.*manifest_hash"):
        prepare(minimal.drop(columns="manifest_hash"))


def test_leaderboard(episodic_df):
    reported = {"protonet": (49.42, "Snell et al. 2017"), "maml": 48.70}
    board = leaderboard(episodic_df, "mini-5way-1shot", reported=reported)
    assert list(board["rank"]) == [1, 2, 3]
    assert board["accuracy"].is_monotonic_decreasing
    assert board["entry"].iloc[0] == "proto_lp"
    assert set(board["setting"]) == {"inductive", "transductive"} and board["setting"].all()
    pn = board[board.method == "protonet"].iloc[0]
    assert pn["reported"] == 49.42 and pn["source"] == "Snell et al. 2017"
    assert pn["delta_reported"] == pytest.approx(pn["accuracy"] - 49.42)
    assert math.isnan(board[board.method == "proto_lp"]["reported"].iloc[0])
    with pytest.raises(ReportError, match="no results for protocol"):
        leaderboard(episodic_df, "nope")


def test_comparison_tables(episodic_df):
    pairs = comparison_table(episodic_df, "mini-5way-1shot")
    assert len(pairs) == 6 and set(pairs["n_shared"]) == {100}
    direct = paired_test(episodic_df, "proto_lp", "protonet")
    row = pairs[(pairs.a == "proto_lp") & (pairs.b == "protonet")].iloc[0]
    assert row["mean_diff"] == pytest.approx(direct.mean_diff * 100)
    assert row["p_t"] == pytest.approx(direct.t_pvalue)
    m = comparison_matrix(episodic_df, "mini-5way-1shot")
    assert m.shape == (3, 3) and list(m.index) == list(m.columns)
    assert all(m.loc[k, k] == "—" for k in m.index)
    assert m.loc["proto_lp", "protonet"].startswith(f"{direct.mean_diff * 100:+.2f} (p")


# ------------------------------------------------------------------ renderers


def test_markdown_csv_latex(episodic_df):
    board = leaderboard(episodic_df, "mini-5way-1shot", reported={"protonet": (49.42, "a_b 5%")})
    top = board.iloc[0]
    cell = f"{top['accuracy']:.2f} ± {top['ci95']:.2f}"

    md = to_markdown(board)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + len(board)
    assert cell in md and "| proto_lp |" in md and "Accuracy (%)" in md
    assert len({line.count("|") for line in lines}) == 1  # every row has the same cells

    csv = to_csv(board)
    back = pd.read_csv(io.StringIO(csv))
    assert list(back["entry"]) == list(board["entry"])
    assert np.allclose(back["accuracy"], board["accuracy"].round(4))
    assert np.allclose(back["ci95"], board["ci95"].round(4))

    tex = to_latex(board, caption="mini_imagenet 100%", label="tab:x")
    assert f"{top['accuracy']:.2f} $\\pm$ {top['ci95']:.2f}" in tex
    assert "proto\\_lp" in tex and "Accuracy (\\%)" in tex and "a\\_b 5\\%" in tex
    assert "\\caption{mini\\_imagenet 100\\%}" in tex
    body = [ln for ln in tex.splitlines() if not ln.startswith(("%", "\\label"))]
    assert not any(re.search(r"(?<!\\)[_%#]", ln) for ln in body)
    assert tex.count("\\begin{") == tex.count("\\end{") == 2
    ncol = len(tex.split("\\begin{tabular}{")[1].split("}")[0])
    assert all(ln.count(" & ") == ncol - 1 for ln in body if ln.endswith("\\\\"))


def test_latex_escape():
    assert latex_escape("a_b & 50% $x$ #1 {y} ~ ^ \\") == (
        "a\\_b \\& 50\\% \\$x\\$ \\#1 \\{y\\} \\textasciitilde{} \\textasciicircum{} "
        "\\textbackslash{}"
    )
    assert latex_escape("1 ± 2") == "1 $\\pm$ 2"


def test_renderers_write_files(tmp_path, ssl_df):
    board = leaderboard(ssl_df, "cifar10-250")
    assert to_markdown(board, tmp_path / "a" / "b.md") == (tmp_path / "a" / "b.md").read_text()
    assert to_csv(board, tmp_path / "b.csv") == (tmp_path / "b.csv").read_text()
    assert to_latex(board, tmp_path / "b.tex") == (tmp_path / "b.tex").read_text()
    assert "4 seeds (t)" in (tmp_path / "a" / "b.md").read_text()


def test_single_task_renders_marker():
    board = leaderboard(pd.DataFrame([_row("p", "A", 0, 0, 0.5)]), "p")
    assert "50.00 (no CI)" in to_markdown(board)


# ------------------------------------------------------------------ plots and files


def test_protocol_family():
    assert protocol_family("cifar10-250") == "cifar10"
    assert protocol_family("miniimagenet-5way-1shot") == "miniimagenet"
    assert protocol_family("mini_5w1s") == "mini"
    assert protocol_family("imagenet-lowshot-n5") == "imagenet-lowshot"
    assert protocol_family("fashion-mnist-ssl-40labels") == "fashion-mnist-ssl"
    assert protocol_family("cifar10") == "cifar10"
    assert protocol_family("250") == "250"


def test_plot_accuracy_curve(tmp_path, ssl_df):
    out = plot_accuracy_curve(ssl_df, tmp_path / "curve.png")
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    with pytest.raises(ReportError, match="no result row has a value"):
        plot_accuracy_curve(ssl_df.assign(x_value=None), tmp_path / "none.png")


def test_write_leaderboard(tmp_path, ssl_df, episodic_df):
    keep = tmp_path / "README.md"
    keep.write_text("mine")
    df = pd.concat([ssl_df, episodic_df], ignore_index=True)
    paths = write_leaderboard(
        df, "cifar10-250", tmp_path, reported={"mean_teacher": (45.49, "Liu et al.")}
    )
    assert [p.name for p in paths] == [
        "cifar10-250.md",
        "cifar10-250.csv",
        "cifar10-250.tex",
        "cifar10-250.png",
    ]
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    assert paths[3].read_bytes()[:8] == PNG_MAGIC
    md = paths[0].read_text()
    assert "45.49" in md and "Liu et al." in md and "![" in md and "Paired comparison" in md
    # x_value does not vary in the episodic family: no plot
    paths2 = write_leaderboard(df, "mini-5way-1shot", tmp_path)
    assert [p.suffix for p in paths2] == [".md", ".csv", ".tex"]
    assert keep.read_text() == "mine"
    assert not list(tmp_path.glob("*.tmp"))


def test_ci_dataclass_str():
    ci = CI(0.5, 0.01, 10, 0.02, "t")
    assert str(ci) == "0.5000 ± 0.0100"


def test_entries_are_named_by_their_non_default_parameters_as_run():
    """Labels come from the store's ``params`` column (as run), never from today's defaults."""
    from fewshot_bench.report import format_params

    spectral = json.dumps({"propagator": "spectral"})
    assert format_params(spectral) == "propagator=spectral"
    assert format_params(json.dumps({"init": "/x/y/conv4-inst.pt", "lr": 3e-3})) == (
        "init=conv4-inst.pt, lr=0.003"
    )
    assert format_params("{}") == format_params("") == format_params(None) == ""
    assert format_params("k=3") == "k=3"  # already formatted text stays as it is
    rows = [
        _row("p", "propagation-classifier", 0, t, 0.5 + 0.1 * t, params=spectral) for t in range(3)
    ]
    # the full config may hold any values (a default that changed later): only params counts
    rows = [{**r, "config": json.dumps({"method": r["method"], "params": {"k": 99}})} for r in rows]
    board = leaderboard(pd.DataFrame(rows), "p")
    assert board["entry"].tolist() == ["propagation-classifier (propagator=spectral)"]
    # a method name no one registered here is reported all the same
    alien = [_row("p", "plugin-method", 0, t, 0.4, params='{"depth": 3}') for t in range(2)]
    board = leaderboard(pd.DataFrame(alien), "p")
    assert board["entry"].tolist() == ["plugin-method (depth=3)"]
