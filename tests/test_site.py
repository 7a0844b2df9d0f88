"""The static HTML site (fewshot_bench/report/site.py) without a browser: the files it writes,
that they reference nothing off the disk, that text from the store is escaped, that the numbers
are the Markdown boards' numbers, and that the reproduce command parses back to what ran."""

from __future__ import annotations

import json
import re
import shlex
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from report_rows import v2_frame, v2_row

from fewshot_bench.cli import build_parser, main, parse_method_spec
from fewshot_bench.report import leaderboard
from fewshot_bench.report.site import (
    board_for,
    boards_for_all,
    group_board,
    reproduce_command,
    write_site,
)
from fewshot_bench.report.tables import _fmt_mean_ci
from fewshot_bench.run.store import ResultRow, ResultsStore

EVIL_PARAMS = {"note": "<script>alert(1)</script>", "prior": [0.2, 0.8], "tag": 'a,"b"'}
EVIL_METHOD = "evil<img src=x onerror=alert(2)>"


def _rows() -> pd.DataFrame:
    """A CIFAR-10-like sweep (250 and 1000 labels; 3 seeds of one task each) with inductive,
    transductive and semi-supervised entries, one with hostile parameters and name, and one
    episodic protocol of another family."""
    rows = []
    accs = {"nearest-prototype": 0.40, "diffusion": 0.55, "mean-teacher": 0.60, EVIL_METHOD: 0.5}
    settings = {
        "nearest-prototype": "inductive",
        "diffusion": "transductive",
        "mean-teacher": "semi-supervised",
        EVIL_METHOD: "transductive",
    }
    for protocol, x in (("cifar10-250", 250.0), ("cifar10-1000", 1000.0)):
        for method, acc in accs.items():
            params = json.dumps(EVIL_PARAMS) if method == EVIL_METHOD else "{}"
            for seed in range(3):
                rows.append(
                    v2_row(
                        protocol,
                        method,
                        seed,
                        0,
                        acc + x / 10000 + 0.01 * seed,
                        family="cifar10",
                        setting=settings[method],
                        params=params,
                        x_value=x,
                        x_label="labels",
                        data_note="JPEG copy of CIFAR-10",
                        seconds=2.0,
                    )
                )
    for method, acc in (("nearest-prototype", 0.9), ("diffusion", 0.95)):
        for task in range(8):
            rows.append(
                v2_row(
                    "omni-5w1s",
                    method,
                    0,
                    task,
                    acc - 0.01 * (task % 3),
                    family="omni-5w1s",
                    setting=settings[method],
                )
            )
    return v2_frame(rows)


class _Tables(HTMLParser):
    """Rows (cell texts) of every ``table.board`` and every ``href``/``src`` of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.links: list[str] = []
        self._in_board = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("href", "src"):
            if a.get(key):
                self.links.append(a[key])
        if tag == "table" and "board" in (a.get("class") or "").split():
            self._in_board = True
            self.tables.append([])
        elif self._in_board and tag == "tr" and self._row is None:
            self._row = []
        elif self._row is not None and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table" and self._in_board:
            self._in_board = False
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(path: Path) -> _Tables:
    p = _Tables()
    p.feed(path.read_text(encoding="utf-8"))
    return p


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, pd.DataFrame, list[Path]]:
    df = _rows()
    out = tmp_path_factory.mktemp("site")
    reported = {"cifar10-1000": {"mean-teacher": (65.0, "Tarvainen & Valpola 2017, Table 1", 1.5)}}
    return out, df, write_site(df, out, reported=reported)


def test_files_and_boards(site):
    out, df, paths = site
    names = sorted(p.relative_to(out).as_posix() for p in paths)
    assert names == [
        "assets/site.css",
        "assets/site.js",
        "cifar10.html",
        "cifar10.png",
        "index.html",
        "omni-5w1s.html",
    ]
    assert paths[-1].name == "index.html" and all(p.is_file() for p in paths)
    assert [b.protocols for b in boards_for_all(df)] == [
        ("cifar10-250", "cifar10-1000"),
        ("omni-5w1s",),
    ]
    assert (out / "cifar10.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    index = _parse(out / "index.html")
    assert {"cifar10.html", "omni-5w1s.html", "assets/site.css", "assets/site.js"} <= set(
        index.links
    )


def test_nothing_off_the_disk(site):
    """Every href/src is a local file of the site or an anchor; no URL anywhere in tags."""
    out, _, paths = site
    for page in [p for p in paths if p.suffix == ".html"]:
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text), page
        assert "@import" not in text and "url(" not in text
        for link in _parse(page).links:
            if link.startswith("#"):
                assert f'id="{link[1:]}"' in text, (page.name, link)
                continue
            target = link.split("#", 1)[0]
            assert (out / target).is_file(), (page.name, link)
    for asset in ("site.css", "site.js"):
        text = (out / "assets" / asset).read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text and "url(" not in text


def test_store_text_is_escaped(site):
    out, _, _ = site
    text = (out / "cifar10.html").read_text(encoding="utf-8")
    assert "<script>alert" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "evil&lt;img src=x onerror=alert(2)&gt;" in text
    # the only scripts are the site's own file
    assert re.findall(r"<script[^>]*>", text) == ['<script src="assets/site.js">']


def test_numbers_are_the_markdown_boards(site):
    """Each table row is the leaderboard() row: same order, entry and mean ± CI text."""
    out, df, _ = site
    tables = _parse(out / "cifar10.html").tables
    assert len(tables) == 2  # one per protocol, in budget order
    for protocol, table in zip(("cifar10-250", "cifar10-1000"), tables, strict=True):
        board = leaderboard(df, protocol)
        header, body = table[0], table[1:]
        m, a = header.index("Method"), header.index("Accuracy (%)")
        assert [r[m] for r in body] == list(board["entry"])
        assert [r[a] for r in body] == [
            _fmt_mean_ci(x, h, 2) for x, h in zip(board["accuracy"], board["ci95"], strict=True)
        ]
        # over seeds, Student-t: three seeds of one task each
        assert (board["ci_over"] == "3 seeds (t)").all()
    text = (out / "cifar10.html").read_text(encoding="utf-8")
    assert "JPEG copy of CIFAR-10" in text
    assert "65.00 ± 1.50 — Tarvainen &amp; Valpola 2017, Table 1" in text  # the run card
    for setting in ("inductive", "transductive", "semi-supervised"):
        assert f'<option value="{setting}">' in text


def test_reproduce_command_parses_back(site):
    """The panel's command is a valid `fsbench run` line whose -m gives the stored params."""
    _, df, _ = site
    rows = df[(df["protocol"] == "cifar10-250") & (df["method"] == EVIL_METHOD)]
    command, notes = reproduce_command(rows)
    argv = shlex.split(command)
    assert argv[:2] == ["fsbench", "run"]
    args = build_parser().parse_args(argv[1:])
    assert args.protocol == "cifar10-250" and args.backbone == "pixels"
    assert args.seeds == [0, 1, 2] and args.max_tasks == 1
    name, params = parse_method_spec(args.method[0])
    assert name == EVIL_METHOD and params == EVIL_PARAMS
    assert notes == []
    gap = rows[rows["seed"] == 0].assign(task_index=3)
    assert reproduce_command(gap)[1] == ["the stored tasks are not the first N of each seed"]


def test_selected_boards(tmp_path):
    df = _rows()
    one = board_for(df, "cifar10-250")
    assert one.protocols == ("cifar10-250",)
    assert board_for(df, "cifar10").protocols == ("cifar10-250", "cifar10-1000")
    paths = write_site(df, tmp_path, [group_board(["omni-5w1s", "cifar10-250", "nope"], "mix")])
    assert sorted(p.name for p in paths) == ["index.html", "mix.html", "site.css", "site.js"]
    text = (tmp_path / "mix.html").read_text(encoding="utf-8")
    assert "No results yet: nope." in text
    assert [len(t) - 1 for t in _parse(tmp_path / "mix.html").tables] == [2, 4]


def _store(path: Path) -> Path:
    with ResultsStore(path) as store:
        store.append(ResultRow(**r) for r in _rows().to_dict("records"))
    return path


def test_cli_html(tmp_path, capsys):
    wd = tmp_path / "runs"
    wd.mkdir()
    _store(wd / "results.sqlite")
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    base = ["leaderboard", "--all", "--workdir", str(wd)]
    assert main([*base, "--html", str(afile)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--html {afile} is a file, not a folder; give a folder" in err
    assert afile.read_text() == "keep me"
    site = tmp_path / "new" / "site"  # created with its parents; --html alone: no Markdown
    assert main([*base, "--html", str(site)]) == 0
    assert sorted(p.name for p in site.iterdir()) == [
        "assets",
        "cifar10.html",
        "cifar10.png",
        "index.html",
        "omni-5w1s.html",
    ]
    assert not (tmp_path / "leaderboards").exists()
    both = tmp_path / "both"
    assert main(["leaderboard", "cifar10", "--workdir", str(wd), "--html", str(both / "h"),
                 "--out", str(both / "md")]) == 0  # fmt: skip
    assert (both / "md" / "cifar10.md").is_file() and (both / "h" / "cifar10.html").is_file()
