"""Rows of different task sets or code are never pooled or paired; imported episodes are marked.

An entry is (protocol, method, config_hash, code_fingerprint, backbone) on one task set: a
protocol whose (protocol, seed) rows carry two manifest hashes ran two different task sets."""

from __future__ import annotations

import pandas as pd
import pytest
from report_rows import SHA, imported, manifest_hash, v2_row

from fewshot_bench.report import (
    ReportError,
    comparison_matrix,
    comparison_table,
    curve_table,
    group_summary,
    leaderboard,
    paired_test,
    prepare,
    summarise,
    task_set_notes,
    to_latex,
    to_markdown,
    write_all,
    write_group,
    write_leaderboard,
)

P = "omniglot-5w1s"
N_TASKS = 12
OLD = "2024-01-01T00:00:00"
NEW = "2024-02-01T00:00:00"


def short(protocol: str, seed: int, tasks: str = "") -> str:
    return manifest_hash(protocol, seed, tasks)[:8]


def _edited_protocol() -> pd.DataFrame:
    """A ran, then the protocol file was edited (new protocol hash, new manifests); A and B ran
    again on the new tasks. Task i of the old set is not task i of the new one."""
    rows = []
    for s in range(2):
        for t in range(N_TASKS):
            rows.append(
                v2_row(P, "A", s, t, 0.40 + 0.01 * t, protocol_hash="old-protocol", tasks="old",
                       timestamp=OLD)
            )  # fmt: skip
            rows.append(v2_row(P, "A", s, t, 0.70 + 0.01 * t + 0.002 * s, timestamp=NEW))
            rows.append(v2_row(P, "B", s, t, 0.65 + 0.01 * t, timestamp=NEW))
    return pd.DataFrame(rows)


def test_two_manifests_of_one_protocol_are_two_entries_never_pooled():
    df = _edited_protocol()
    old, new = df.protocol_hash == "old-protocol", df.protocol_hash != "old-protocol"
    board = leaderboard(df, P)
    assert len(board) == 3
    assert set(board.entry) == {f"A [tasks {short(P, 0, 'old')}]", f"A [tasks {short(P, 0)}]", "B"}
    by_set = board[board.method == "A"].set_index("task_set")
    a_old = df[old & (df.method == "A")]
    a_new = df[new & (df.method == "A")]
    assert by_set.loc[short(P, 0, "old"), "accuracy"] == pytest.approx(a_old.accuracy.mean() * 100)
    assert by_set.loc[short(P, 0), "accuracy"] == pytest.approx(a_new.accuracy.mean() * 100)
    pooled = df[df.method == "A"].accuracy.mean() * 100
    assert not (board.accuracy - pooled).abs().lt(1e-9).any()  # never averaged together
    assert set(board.n_tasks) == {2 * N_TASKS}
    # which is which: the manifests per seed, and the task set column
    assert by_set.loc[short(P, 0, "old"), "manifests"] == (
        f"0:{manifest_hash(P, 0, 'old')} 1:{manifest_hash(P, 1, 'old')}"
    )
    assert board.set_index("entry").loc["B", "tasks"] == f"sampled (tasks {short(P, 0)})"
    # the tables of every kind keep them apart too
    assert len(summarise(df)) == 3
    assert len(group_summary(df, [P]).query("kind == 'measured'")) == 3
    series = set(curve_table(df).series)
    assert series == {"A [tasks " + short(P, 0, "old") + "]", f"A [tasks {short(P, 0)}]", "B"}

    (note,) = task_set_notes(df)
    assert note.startswith(f"{P} ran on 2 different task sets")
    assert "never pooled and never paired" in note
    for s in (0, 1):
        assert f"{short(P, s, 'old')} (seed {s})" in note and f"{short(P, s)} (seed {s})" in note
    assert "protocol hash old-prot" in note and f"first run {OLD}" in note


def test_page_names_the_task_sets(tmp_path):
    paths = write_leaderboard(_edited_protocol(), P, tmp_path)
    md = paths[0].read_text()
    assert f"{P} ran on 2 different task sets" in md
    assert f"| A [tasks {short(P, 0, 'old')}] |" in md and "Task set" in md
    assert "different task sets" in md  # in the paired comparison, instead of a test
    assert "manifests" in paths[1].read_text().splitlines()[0]  # the CSV keeps the hashes


def test_paired_comparisons_pair_only_the_same_tasks():
    df = _edited_protocol()
    pairs = comparison_table(df, P).set_index(["a", "b"])
    a_old, a_new = f"A [tasks {short(P, 0, 'old')}]", f"A [tasks {short(P, 0)}]"
    assert pairs.loc[(a_new, "B"), "n_shared"] == 2 * N_TASKS
    assert pairs.loc[(a_new, "B"), "mean_diff"] == pytest.approx(5.1)  # 5 pp + 0.2 pp on seed 1
    assert pairs.loc[(a_old, "B"), "n_shared"] == 0
    assert pairs.loc[(a_old, "B"), "note"] == "different task sets"
    assert pd.isna(pairs.loc[(a_old, "B"), "p_t"])
    matrix = comparison_matrix(df, P)
    assert matrix.loc[a_old, "B"] == matrix.loc[a_new, a_old] == "different task sets"
    assert matrix.loc[a_new, "B"].startswith("+5.10 (p")

    # paired_test pairs A's new tasks with B's; A's old rows are never matched by index
    r = paired_test(df, "A", "B")
    assert r.n == 2 * N_TASKS and r.mean_diff == pytest.approx(0.051)
    only_old = df[(df.method == "B") | (df.protocol_hash == "old-protocol")]
    with pytest.raises(ReportError, match="share no task set") as err:
        paired_test(only_old, "A", "B")
    assert short(P, 0, "old") in str(err.value) and short(P, 0) in str(err.value)


def test_episodes_imported_after_a_run():
    """Seeds 0-1 sampled and run by A and B; then episodes imported for them (same protocol
    hash, other manifests) and C run on those: two task sets, C marked imported."""
    rows = []
    for s in range(2):
        for t in range(N_TASKS):
            rows += [v2_row(P, m, s, t, b, timestamp=OLD) for m, b in (("A", 0.6), ("B", 0.5))]
            rows.append(
                v2_row(P, "C", s, t, 0.9, tasks="imported", task_source=imported(), timestamp=NEW)
            )
    df = pd.DataFrame(rows)
    board = leaderboard(df, P).set_index("entry")
    assert list(board.index) == ["C", "A", "B"]  # one entry per name: no qualifier needed
    assert board.loc["C", "tasks"] == f"imported: episodes.jsonl (tasks {short(P, 0, 'imported')})"
    assert board.loc["A", "tasks"] == f"sampled (tasks {short(P, 0)})"
    md = to_markdown(leaderboard(df, P))
    assert "| Task set |" in md and "imported: episodes.jsonl" in md
    assert comparison_matrix(df, P).loc["C", "A"] == "different task sets"
    with pytest.raises(ReportError, match="share no task set"):
        paired_test(df, "C", "A")


def test_code_fingerprints_of_one_config_are_separate_entries():
    rows = []
    for t in range(N_TASKS):
        rows.append(v2_row(P, "A", 0, t, 0.6 + 0.01 * t, code_fingerprint="c0de-v1-aaaa"))
        rows.append(v2_row(P, "A", 0, t, 0.7 + 0.01 * t, code_fingerprint="c0de-v2-bbbb"))
        rows.append(v2_row(P, "B", 0, t, 0.5 + 0.01 * t))
    df = pd.DataFrame(rows)
    board = leaderboard(df, P)
    assert list(board.entry) == ["A [code c0de-v2-]", "A [code c0de-v1-]", "B"]
    assert list(board.accuracy.round(6)) == [75.5, 65.5, 55.5]
    assert "| Code |" in to_markdown(board)
    assert "| Code |" not in to_markdown(leaderboard(df[df.method == "B"], P))  # only when needed
    # same tasks: the two code versions are paired with each other, not pooled
    cell = comparison_matrix(df, P).loc["A [code c0de-v2-]", "A [code c0de-v1-]"]
    assert cell.startswith("+10.00 (p")
    with pytest.raises(ReportError, match="several entries on the same tasks"):
        paired_test(df, "A", "B")
    assert paired_test(df, "A", "B", code_a="c0de-v1").mean_diff == pytest.approx(0.1)


def test_a_sampler_change_splits_by_first_use():
    """Same protocol hash, source and data, yet two manifests for a seed (the sampler changed):
    still two task sets, in the order they were first used."""
    rows = [v2_row(P, "A", 0, t, 0.5, tasks="first", timestamp=OLD) for t in range(3)]
    rows += [v2_row(P, "A", 0, t, 0.8, timestamp=NEW) for t in range(3)]
    board = leaderboard(pd.DataFrame(rows), P)
    assert sorted(board.task_set) == sorted([short(P, 0, "first"), short(P, 0)])
    assert list(board.n_tasks) == [3, 3]


def test_a_forged_task_set_column_cannot_pool_two_manifests():
    rows = [v2_row(P, "A", 0, t, 0.5, tasks=str(t % 2)) for t in range(4)]
    forged = prepare(pd.DataFrame(rows)).assign(task_set="")
    with pytest.raises(ReportError, match="never pooled"):
        summarise(forged)


def _imported_sweep() -> pd.DataFrame:
    """A two-budget family; the 100-label protocol's episodes all imported."""
    rows = []
    for n in (10, 100):
        src = imported("labels-100.jsonl") if n == 100 else "sampled"
        for s in range(3):
            for m, base in (("lp", 0.6), ("lr", 0.5)):
                rows.append(
                    v2_row(f"sweep-{n}", m, s, 0, base + n / 1000 + 0.01 * s, family="sweep",
                           task_source=src, x_value=float(n), x_label="labels",
                           setting="semi-supervised")
                )  # fmt: skip
    return pd.DataFrame(rows)


def test_imported_entries_are_marked_in_every_table_and_page(tmp_path):
    df = _imported_sweep()
    board = leaderboard(df, "sweep-100")
    assert set(board.tasks) == {"imported: labels-100.jsonl"} and set(board.task_set) == {""}
    assert "imported: labels-100.jsonl" in to_markdown(board)
    assert "imported: labels-100.jsonl" in to_latex(board)
    assert "imported: labels-100.jsonl" in to_markdown(summarise(df))  # `fsbench report`
    assert "Task set" not in to_markdown(leaderboard(df, "sweep-10"))  # all sampled: no column
    assert all(s.endswith("(imported)") for s in curve_table(df).series)

    write_all(df, tmp_path)
    sha = f"labels-100.jsonl (sha256 {SHA[:12]}…)"
    page = (tmp_path / "sweep-100.md").read_text()
    assert f"Imported episodes: {sha} gave the tasks of sweep-100 seeds 0–2" in page
    assert "imported: labels-100.jsonl" in page
    family = (tmp_path / "sweep.md").read_text()
    assert f"Imported episodes: {sha}" in family
    table = family.split("## Accuracy (%) by labels", 1)[1].split("\n\n")[2]
    body = [ln for ln in table.splitlines()[2:]]
    assert len(body) == 2 and all(ln.count("(imported)") == 1 for ln in body)  # 100-label cells
    assert "(imported)" in (tmp_path / "sweep.tex").read_text()
    assert "(imported tasks)" in (tmp_path / "index.md").read_text()
    assert "sweep-10.md" in {p.name for p in tmp_path.iterdir()}
    assert "Imported" not in (tmp_path / "sweep-10.md").read_text()

    group = write_group(df, ["sweep-10", "sweep-100"], "both", tmp_path / "g")
    md = group[0].read_text()
    assert f"Imported episodes: {sha}" in md and md.count("(imported)") >= 2
