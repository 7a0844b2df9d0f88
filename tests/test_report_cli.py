"""`fsbench report` and `fsbench leaderboard` read only the store: names come from its rows, a
missing, empty or foreign file is a one-line error (exit 2) and is never created or changed."""

from __future__ import annotations

import io
import sqlite3

import pandas as pd
import pytest
from report_rows import imported, v2_row

from fewshot_bench.cli import main
from fewshot_bench.run.store import ResultRow, ResultsStore

FAMILY = "my-sweep"  # in no protocol file: known only from the store's rows


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    cards = tmp_path / "cards"
    cards.mkdir()
    monkeypatch.setenv("FSBENCH_BASELINES", str(cards))
    monkeypatch.setenv("FSBENCH_PROTOCOLS", str(tmp_path / "no-protocols"))
    rows = []
    for n in (20, 200):
        for s in range(3):
            for m, base in (("alpha", 0.5), ("beta", 0.6)):
                rows.append(
                    v2_row(f"{FAMILY}-n{n}", m, s, 0, base + n / 1000 + 0.01 * s, family=FAMILY,
                           x_value=float(n), x_label="labels", setting="semi-supervised",
                           params='{"k": 7}' if m == "beta" else "{}")
                )  # fmt: skip
    for t in range(6):
        rows.append(
            v2_row("solo", "alpha", 0, t, 0.8, family="solo", task_source=imported("solo.jsonl"))
        )
    wd = tmp_path / "runs"
    with ResultsStore(wd / "results.sqlite") as store:
        store.append(ResultRow(**r) for r in rows)
    return wd


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fsbench: error: "), err
    return err


@pytest.mark.parametrize("command", [["report"], ["leaderboard", "--all"]])
def test_missing_empty_or_foreign_store_is_a_one_line_error(tmp_path, capsys, command):
    wd = tmp_path / "runs"
    out = ["--out", str(tmp_path / "lb")] if command[0] == "leaderboard" else []
    assert main([*command, "--workdir", str(wd), *out]) == 2
    assert "no results store" in _error(capsys)
    assert not wd.exists()  # never created

    wd.mkdir()
    store = wd / "results.sqlite"
    store.write_bytes(b"")
    assert main([*command, "--workdir", str(wd), *out]) == 2
    assert "no results table" in _error(capsys)
    assert store.read_bytes() == b""

    store.write_text("protocol,method\nx,y\n")
    assert main([*command, "--workdir", str(wd), *out]) == 2
    assert "not a readable SQLite database" in _error(capsys)
    assert store.read_text() == "protocol,method\nx,y\n"

    store.unlink()
    with sqlite3.connect(store) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER)")
    conn.close()
    before = store.read_bytes()
    assert main([*command, "--workdir", str(wd), *out]) == 2
    assert "another program" in _error(capsys)
    assert store.read_bytes() == before
    assert sorted(p.name for p in wd.iterdir()) == ["results.sqlite"]  # no -wal, no -shm


def test_report_selects_by_protocol_or_family_from_the_store(workdir, capsys):
    base = ["report", "--workdir", str(workdir), "--format", "csv"]
    assert main([*base, "--protocol", FAMILY]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(dict.fromkeys(table.protocol)) == [f"{FAMILY}-n20", f"{FAMILY}-n200"]
    assert set(table.params.fillna("")) == {"", "k=7"}  # as run, from the store
    assert main([*base, "--protocol", "solo"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(table.tasks) == ["imported: solo.jsonl"]
    assert main([*base, "--protocol", "nope"]) == 2
    err = _error(capsys)
    assert "nope" in err and f"{FAMILY}-n20" in err and f"families: ['{FAMILY}', 'solo']" in err
    assert main(["report", "--workdir", str(workdir)]) == 0
    md = capsys.readouterr().out
    assert "| Task set |" in md and "imported: solo.jsonl" in md


def test_leaderboard_names_come_from_the_store(tmp_path, workdir, capsys):
    out = tmp_path / "lb"
    base = ["--workdir", str(workdir), "--out", str(out)]
    assert main(["leaderboard", FAMILY, *base]) == 0  # a family no protocol file knows
    assert (out / f"{FAMILY}.md").exists() and (out / f"{FAMILY}-n200.md").exists()
    page = (out / f"{FAMILY}.md").read_text()
    assert "beta (k=7)" in page and "| 20 labels | 200 labels |" in page
    assert main(["leaderboard", f"{FAMILY}-n20", *base, "--out", str(out / "one")]) == 0
    assert sorted(p.name for p in (out / "one").iterdir()) == [
        f"{FAMILY}-n20.csv",
        f"{FAMILY}-n20.md",
        f"{FAMILY}-n20.tex",
    ]
    capsys.readouterr()
    assert main(["leaderboard", "nope", *base]) == 2
    assert "no results for nope" in _error(capsys)

    # a group page: a family expands in place (by budget), names keep the order given
    assert main(["leaderboard", "solo", FAMILY, "--name", "mix", *base]) == 0
    md = (out / "mix.md").read_text()
    assert "| solo | my-sweep-n20 | my-sweep-n200 |" in md
    assert "Imported episodes: solo.jsonl" in md and "(imported)" in md

    assert main(["leaderboard", "--all", *base, "--out", str(out / "all")]) == 0
    index = (out / "all" / "index.md").read_text()
    assert f"[{FAMILY}]({FAMILY}.md)" in index and "(imported tasks)" in index


def test_leaderboard_reads_several_stores_but_no_protocol_twice(tmp_path, workdir, capsys):
    """`--also-workdir`: boards of a protocol kept in a store of its own join the others; the same
    protocol in two stores would count its tasks twice and is refused."""
    other = tmp_path / "runs-big"
    with ResultsStore(other / "results.sqlite") as store:
        store.append(
            ResultRow(**v2_row("big", m, 0, t, acc, family="big"))
            for t in range(4)
            for m, acc in (("alpha", 0.7), ("beta", 0.9))
        )
    out = tmp_path / "lb"
    both = ["--workdir", str(workdir), "--also-workdir", str(other)]
    assert main(["leaderboard", "--all", *both, "--out", str(out)]) == 0
    index = (out / "index.md").read_text()
    assert "[big](big.md)" in index and f"[{FAMILY}]({FAMILY}.md)" in index
    assert "| 1 | beta |" in (out / "big.md").read_text()
    assert main(["leaderboard", "--all", *both, "--also-workdir", str(workdir), "--out",
                 str(out)]) == 2  # fmt: skip
    err = _error(capsys)
    assert "both" in err and "count twice" in err
