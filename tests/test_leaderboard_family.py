"""Family and group pages, data notes, `fsbench leaderboard --all` / `--name` and `fsbench report`
ordering, all from schema-2 store rows."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from report_rows import manifest_hash, v2_row

from fewshot_bench.cli import main
from fewshot_bench.report import (
    dataset_note,
    dataset_notes,
    family_summary,
    group_headers,
    group_summary,
    mean_ci,
    short_backbone,
    write_family,
    write_group,
    write_leaderboard,
)
from fewshot_bench.run.store import ResultRow, ResultsStore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAMILY = "fashion-mnist-ssl"
BUDGETS = (50, 250, 1000)
# (method, config, setting, backbone, accuracy at 50 / 250 / 1000 labels; None = not run)
ENTRIES = [
    ("lr", "cfg-lr-000000", "inductive", "pixels", (0.60, 0.70, 0.80)),
    ("lp", "cfg-lp-aaaaaa", "semi-supervised", "pixels", (0.65, 0.72, 0.90)),
    ("lp", "cfg-lp-bbbbbb", "semi-supervised", "conv4", (0.50, 0.55, 0.60)),
    ("mt", "cfg-mt-000000", "semi-supervised", "images", (0.70, 0.75, None)),
]
SEED_NOISE = (-0.01, 0.0, 0.02)
CARD = """
method = "mt"
title = "Mean Teacher"
paper = "Tarvainen & Valpola 2017"

[protocols.fashion-mnist-ssl-250]
reported = 81.5
source = "Someone et al. 2019, Table 3 (Fashion-MNIST, 250 labels)"
"""


def _sweep_rows() -> list[dict]:
    rows = []
    for method, cfg, setting, backbone, accs in ENTRIES:
        for n, acc in zip(BUDGETS, accs, strict=True):
            if acc is None:
                continue
            for seed, noise in enumerate(SEED_NOISE):
                rows.append(
                    v2_row(
                        f"{FAMILY}-{n}",
                        method,
                        seed,
                        0,
                        acc + noise,
                        family=FAMILY,
                        config_hash=cfg,
                        setting=setting,
                        backbone=backbone,
                        n_query=100,
                        seconds=n / 100 + seed,
                        x_value=float(n),
                        x_label="labels",
                    )
                )
    return rows


@pytest.fixture()
def sweep_df() -> pd.DataFrame:
    return pd.DataFrame(_sweep_rows())


REPORTED = {f"{FAMILY}-250": {"mt": (81.5, "Someone et al. 2019, Table 3")}}


def _table_rows(md: str, heading: str) -> list[list[str]]:
    """Header and body cells of the first Markdown table after ``heading``."""
    lines = md.split(heading, 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    block = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        block.append([c.strip() for c in ln.strip("|").split(" | ")])
    return [block[0], *block[2:]]


def test_family_summary_long(sweep_df):
    long = family_summary(sweep_df, FAMILY, REPORTED)
    measured = long[long.kind == "measured"]
    assert len(measured) == 11 and list(dict.fromkeys(measured.x_value)) == [50.0, 250.0, 1000.0]
    assert set(measured.entry) == {"lr", "lp [pixels]", "lp [conv4]", "mt"}
    cell = measured[(measured.protocol == f"{FAMILY}-250") & (measured.method == "lr")].iloc[0]
    ci = mean_ci([0.70 + e for e in SEED_NOISE], method="t")  # Student-t over the 3 seeds
    assert cell.accuracy == pytest.approx(ci.mean * 100)
    assert cell.ci95 == pytest.approx(ci.half_width * 100)
    assert cell.ci_over == "3 seeds (t)" and cell.n_seeds == 3
    rep = long[long.kind == "reported"]
    assert len(rep) == 1 and rep.iloc[0].accuracy == 81.5 and rep.iloc[0].x_value == 250.0
    other = {"omniglot-5w1s": {"protonet": 98.8}, **REPORTED}  # another family's number: left out
    assert len(family_summary(sweep_df, FAMILY, other).query("kind == 'reported'")) == 1


def test_write_family_pages(tmp_path, sweep_df):
    paths = write_family(sweep_df, FAMILY, tmp_path, REPORTED)
    names = [p.name for p in paths]
    assert names[:4] == [f"{FAMILY}.md", f"{FAMILY}.csv", f"{FAMILY}.tex", f"{FAMILY}.png"]
    for n in BUDGETS:  # one page per budget as well, without its own copy of the plot
        assert {f"{FAMILY}-{n}.md", f"{FAMILY}-{n}.csv", f"{FAMILY}-{n}.tex"} <= set(names)
        assert f"{FAMILY}-{n}.png" not in names
        assert f"({FAMILY}.md)" in (tmp_path / f"{FAMILY}-{n}.md").read_text()
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    assert (tmp_path / f"{FAMILY}.png").read_bytes()[:8] == PNG_MAGIC

    md = (tmp_path / f"{FAMILY}.md").read_text()
    # no data note in the rows: nothing to say (no protocol file or data root is read)
    assert md.startswith(f"# {FAMILY}\n\nSetting: inductive, semi-supervised. 3 protocols")
    assert "3 protocols (50–1000 labels), 4 entries, 33 task results" in md
    table = _table_rows(md, "## Accuracy (%) by labels")
    header = table[0]
    assert header[:4] == ["Method", "Setting", "Backbone", "Seeds"]
    assert header[4:] == ["50 labels", "250 labels", "1000 labels", "s / task (all)"]
    # ordered by accuracy at 1000 labels; mt (not run at 1000) last
    assert [r[0] for r in table[1:]] == ["lp [pixels]", "lr", "lp [conv4]", "mt"]
    lr = table[2]
    ci = mean_ci([0.70 + e for e in SEED_NOISE], method="t")
    assert lr[1:4] == ["inductive", "pixels", "3"]
    assert lr[5] == f"{ci.mean * 100:.2f} ± {ci.half_width * 100:.2f}"
    assert table[3][2] == "conv4"
    assert table[4][6] == "—"  # mt at 1000 labels
    assert lr[7] == f"{np.mean([n / 100 + s for n in BUDGETS for s in range(3)]):.3f}"

    rep = _table_rows(md, "## Reported in papers (not measured here)")
    assert rep[0] == ["Method", "labels", "Reported (%)", "Measured here (%)", "Source"]
    mt_ci = mean_ci([0.75 + e for e in SEED_NOISE], method="t")
    mt_cell = f"{mt_ci.mean * 100:.2f} ± {mt_ci.half_width * 100:.2f}"
    assert rep[1] == ["mt", "250", "81.50", mt_cell, "Someone et al. 2019, Table 3"]
    secs = _table_rows(md, "## Seconds per task by labels")
    assert secs[0][4:] == ["50 labels", "250 labels", "1000 labels"]
    assert secs[2][4:] == ["1.500", "3.500", "11.000"]  # lr: mean over seeds of n/100 + seed
    assert f"![accuracy vs labels]({FAMILY}.png)" in md

    back = pd.read_csv(tmp_path / f"{FAMILY}.csv")
    assert pd.api.types.is_float_dtype(back["accuracy"]) and pd.api.types.is_float_dtype(
        back["x_value"]
    )
    reported = back[back.kind == "reported"].iloc[0]
    assert (reported.method, reported.x_value, reported.accuracy) == ("mt", 250.0, 81.5)
    assert back[back.kind == "measured"]["accuracy"].between(40, 100).all()

    tex = (tmp_path / f"{FAMILY}.tex").read_text()
    lines = tex.splitlines()
    rep_line = next(i for i, ln in enumerate(lines) if "(reported: Someone et al. 2019)" in ln)
    assert lines[rep_line - 1] == "\\midrule" and "81.50" in lines[rep_line]
    assert "250 labels" in tex and "$\\pm$" in tex and "not measured here" in tex
    ncol = len(tex.split("\\begin{tabular}{")[1].split("}")[0])
    assert all(ln.count(" & ") == ncol - 1 for ln in lines if ln.endswith("\\\\"))


def test_family_of_one_protocol_is_a_plain_page(tmp_path, sweep_df):
    one = sweep_df[sweep_df.protocol == f"{FAMILY}-250"]
    paths = write_family(one, FAMILY, tmp_path, REPORTED)
    assert [p.name for p in paths] == [f"{FAMILY}-250.md", f"{FAMILY}-250.csv", f"{FAMILY}-250.tex"]


JPEG_NOTE = (
    "JPEG copy of CIFAR-10 (cifar10-jpeg/train.zip, test.zip): not bit-exact with the "
    "official batches"
)


def _cifar(rows: pd.DataFrame | list[dict]) -> pd.DataFrame:
    """The sweep as CIFAR-10 runs that read the JPEG copy (recorded in the rows' data note)."""
    df = pd.DataFrame(rows)
    protocols = df.protocol.str.replace(FAMILY, "cifar10-ssl")
    return df.assign(
        protocol=protocols,
        family="cifar10-ssl",
        manifest_hash=[manifest_hash(p, s) for p, s in zip(protocols, df.seed, strict=True)],
        data_fingerprint="jpeg-copy-fingerprint",
        data_note=JPEG_NOTE,
    )


def test_data_note_comes_from_the_store(tmp_path, sweep_df, monkeypatch):
    monkeypatch.setenv("FSBENCH_DATA", str(tmp_path / "nothing-here"))  # never looked at
    cifar = _cifar(sweep_df)
    assert dataset_note(cifar) == f"Data: {JPEG_NOTE}."
    assert dataset_notes(cifar, "cifar10-ssl-250") == [f"Data: {JPEG_NOTE}."]
    assert dataset_note(sweep_df) == "" and dataset_notes(sweep_df) == []
    both = pd.concat([cifar, sweep_df], ignore_index=True)
    assert dataset_notes(both, ["cifar10-ssl-250", f"{FAMILY}-250"]) == [
        f"Data (cifar10-ssl-250): {JPEG_NOTE}."
    ]
    mixed = cifar.copy()  # one entry's rows were read from the official batches
    official = mixed.method == "lr"
    mixed.loc[official, "data_note"] = ""
    mixed.loc[official, "data_fingerprint"] = "official-batches-fingerprint"
    assert dataset_notes(mixed, ["cifar10-ssl-50"]) == [
        f"Data (some entries of cifar10-ssl-50): {JPEG_NOTE}."
    ]

    out = tmp_path / "pages"
    write_family(cifar, "cifar10-ssl", out)
    for page in ("cifar10-ssl.md", "cifar10-ssl-250.md"):
        assert f"Data: {JPEG_NOTE}." in (out / page).read_text()
    write_leaderboard(cifar, "cifar10-ssl-50", out / "single")
    assert (
        (out / "single" / "cifar10-ssl-50.md")
        .read_text()
        .startswith(f"# cifar10-ssl-50\n\nData: {JPEG_NOTE}.\n\nSetting: ")
    )
    write_leaderboard(cifar, "cifar10-ssl-50", out / "own", note="Data: as I say.")
    assert "Data: as I say." in (out / "own" / "cifar10-ssl-50.md").read_text()


# ------------------------------------------------------------------ command line


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A results store with a label sweep, one CIFAR-10 budget and an episodic protocol."""
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "mt.toml").write_text(CARD)
    monkeypatch.setenv("FSBENCH_BASELINES", str(cards))
    rows = _sweep_rows()
    fm250 = [r for r in rows if r["protocol"] == f"{FAMILY}-250"]
    rows += _cifar(fm250).replace({np.nan: None}).to_dict("records")
    rng = np.random.default_rng(0)
    for method, base in [("protonet", 0.95), ("nearest", 0.7)]:
        for t in range(20):
            rows.append(
                v2_row(
                    "omniglot-5w1s",
                    method,
                    0,
                    t,
                    float(np.clip(base + rng.normal(0, 0.03), 0, 1)),
                    family="omniglot-5w1s",  # a protocol file of its own: its own family
                    config_hash=f"cfg-{method}",
                    setting="inductive",
                    x_value=1.0,
                    x_label="shots per class",
                )
            )
    wd = tmp_path / "runs"
    with ResultsStore(wd / "results.sqlite") as store:
        store.append(ResultRow(**r) for r in rows)
    return wd


def test_cli_leaderboard_all(tmp_path, workdir, capsys):
    out = tmp_path / "lb"
    args = ["leaderboard", "--all", "--workdir", str(workdir), "--out", str(out)]
    # --data-root is accepted (older scripts) and ignored: the data note comes from the store
    assert main([*args, "--data-root", str(tmp_path / "nothing")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == f"wrote {out / 'index.md'}"
    for name in (f"{FAMILY}.md", f"{FAMILY}.png", f"{FAMILY}-1000.md", "cifar10-ssl-250.md"):
        assert (out / name).exists()
    assert (out / "omniglot-5w1s.md").exists() and not (out / "omniglot-5w1s.png").exists()
    assert not (out / "cifar10-ssl.md").exists()  # one CIFAR-10 budget: no family page

    index = _table_rows((out / "index.md").read_text(), "# Leaderboards")
    assert index[0] == ["Page", "Protocols", "Best entry", "Setting", "At", "Accuracy (%)"]
    by_page = {r[0]: r for r in index[1:]}
    assert set(by_page) == {
        "[cifar10-ssl](cifar10-ssl-250.md)",
        f"[{FAMILY}]({FAMILY}.md)",
        "[omniglot-5w1s](omniglot-5w1s.md)",
    }
    best = by_page[f"[{FAMILY}]({FAMILY}.md)"]
    ci = mean_ci([0.90 + e for e in SEED_NOISE], method="t")
    assert best[1:] == [
        "3",
        "lp [pixels]",
        "semi-supervised",
        "1000 labels",
        f"{ci.mean * 100:.2f} ± {ci.half_width * 100:.2f}",
    ]
    assert by_page["[omniglot-5w1s](omniglot-5w1s.md)"][2] == "protonet"

    fam_md = (out / f"{FAMILY}.md").read_text()
    assert "## Reported in papers (not measured here)" in fam_md
    assert "| mt | 250 | 81.50 |" in fam_md and "Someone et al. 2019" in fam_md
    assert "JPEG copy" in (out / "cifar10-ssl-250.md").read_text()
    assert "JPEG" not in fam_md
    omni = (out / "omniglot-5w1s.md").read_text()
    assert omni.startswith("# omniglot-5w1s\n\nSetting: inductive. 40 task results.")
    assert "Paired comparison" in omni and "Imported" not in omni and "task sets" not in omni


def test_cli_leaderboard_named(tmp_path, workdir, capsys):
    out = tmp_path / "lb"
    base = ["--workdir", str(workdir), "--out", str(out)]
    assert main(["leaderboard", "omniglot-5w1s", *base]) == 0  # old behaviour for a protocol
    assert sorted(p.name for p in out.iterdir()) == [
        "omniglot-5w1s.csv",
        "omniglot-5w1s.md",
        "omniglot-5w1s.tex",
    ]
    assert main(["leaderboard", FAMILY, *base]) == 0
    assert (out / f"{FAMILY}.md").exists() and (out / f"{FAMILY}-50.md").exists()
    assert not (out / "index.md").exists()
    capsys.readouterr()
    assert main(["leaderboard", *base]) == 2
    assert main(["leaderboard", FAMILY, "--all", *base]) == 2
    assert "not both" in capsys.readouterr().err


def test_cli_report_orders_by_budget(workdir, capsys):
    assert main(["report", "--workdir", str(workdir), "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    protos = list(dict.fromkeys(table["protocol"]))
    assert protos == [
        "cifar10-ssl-250",
        f"{FAMILY}-50",
        f"{FAMILY}-250",
        f"{FAMILY}-1000",
        "omniglot-5w1s",
    ]
    at_1000 = table[table.protocol == f"{FAMILY}-1000"]
    assert at_1000["accuracy"].is_monotonic_decreasing


# ------------------------------------------------------------------ group pages

GROUP = ["omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s"]
CKPT = "checkpoint:/x/runs/conv4-ce.pt"
# (method, config, backbone, accuracy on each GROUP protocol; None = not run)
GROUP_ENTRIES = [
    ("nearest-prototype", "cfg-np-pixels", "pixels", (0.60, 0.70, 0.40, 0.50)),
    ("nearest-prototype", "cfg-np-conv4", CKPT, (0.90, 0.96, 0.80, 0.92)),
    ("protonet", "cfg-pn-1shot", "images", (0.98, None, 0.95, None)),
    ("protonet", "cfg-pn-5shot", "images", (None, 0.99, None, 0.97)),
]
TASK_NOISE = (-0.02, -0.01, 0.0, 0.01, 0.02)
GROUP_REPORTED = {
    "omniglot-5w1s": {"protonet": (98.8, "Snell et al. 2017, Table 1"), "maml": (98.7, "Finn")},
    "omniglot-20w5s": {"protonet": (98.9, "Snell et al. 2017, Table 1", 0.1)},
    "omniglot-semi-5w1s": {"protonet": (94.62, "Ren et al. 2018", 0.09)},  # not in the group
}
GROUP_CARD = """
method = "protonet"
title = "Prototypical Networks"
paper = "Snell et al. 2017"

[protocols.omniglot-5w1s]
reported = 98.8
source = "Snell et al. 2017, Table 1 (Omniglot, 5-way 1-shot)"

[protocols.omniglot-20w5s]
reported = 98.9
reported_ci = 0.1
source = "Snell et al. 2017, Table 1 (Omniglot, 20-way 5-shot)"
"""


OMNIGLOT_NOTE = "Omniglot read from images_background.zip / images_evaluation.zip"


def _group_rows() -> list[dict]:
    rows = []
    for method, cfg, backbone, accs in GROUP_ENTRIES:
        for i, (protocol, acc) in enumerate(zip(GROUP, accs, strict=True)):
            if acc is None:
                continue
            for t, noise in enumerate(TASK_NOISE):
                rows.append(
                    v2_row(
                        protocol,
                        method,
                        0,
                        t,
                        acc + noise,
                        family=protocol,
                        data_note=OMNIGLOT_NOTE,
                        config_hash=cfg,
                        setting="inductive",
                        backbone=backbone,
                        seconds=0.1 * (i + 1),
                        x_value=1.0 if "1s" in protocol else 5.0,
                        x_label="shots per class",
                    )
                )
    return rows


def _cell(acc: float) -> str:
    ci = mean_ci([acc + e for e in TASK_NOISE])
    return f"{ci.mean * 100:.2f} ± {ci.half_width * 100:.2f}"


def test_group_headers_and_backbones():
    assert group_headers(GROUP) == dict(zip(GROUP, ["5w1s", "5w5s", "20w1s", "20w5s"], strict=True))
    assert group_headers(["mini-imagenet-5w1s", "cifar-fs-5w1s", "omniglot-5w1s"]) == {
        "mini-imagenet-5w1s": "mini-imagenet",
        "cifar-fs-5w1s": "cifar-fs",
        "omniglot-5w1s": "omniglot",
    }
    assert list(group_headers(["omniglot-5w1s", "omniglot-semi-5w1s"]).values()) == [
        "5w1s",
        "semi-5w1s",
    ]
    assert list(group_headers(["cifar10-ssl-250", "cifar10-ssl-4000"]).values()) == ["250", "4000"]
    for names in (["omniglot-5w1s"], ["a-1", "b-2"], ["x", "x-1"]):  # nothing clean to strip
        assert group_headers(names) == {n: n for n in names}
    assert short_backbone(CKPT) == "conv4-ce.pt" and short_backbone("pixels") == "pixels"
    assert short_backbone("hub:/models/resnet.bin") == "hub:resnet.bin"
    assert short_backbone(f"pixels, {CKPT}") == "pixels, conv4-ce.pt"


def test_group_summary_long():
    long = group_summary(pd.DataFrame(_group_rows()), GROUP, GROUP_REPORTED, name="omniglot")
    assert list(long.columns)[:4] == ["group", "protocol", "column", "kind"]
    measured = long[long.kind == "measured"]
    assert len(measured) == 12 and list(dict.fromkeys(measured.protocol)) == GROUP
    assert set(measured.entry) == {
        "nearest-prototype [pixels]",
        "nearest-prototype [conv4-ce.pt]",
        "protonet [cfg-pn-1]",
        "protonet [cfg-pn-5]",
    }
    cell = measured[(measured.column == "20w1s") & (measured.config_hash == "cfg-np-conv4")]
    assert cell.iloc[0].backbone == CKPT and cell.iloc[0].n_tasks == len(TASK_NOISE)
    assert f"{cell.iloc[0].accuracy:.2f} ± {cell.iloc[0].ci95:.2f}" == _cell(0.80)
    rep = long[long.kind == "reported"]
    assert list(zip(rep.protocol, rep.method, rep.accuracy, strict=True)) == [
        ("omniglot-5w1s", "maml", 98.7),
        ("omniglot-5w1s", "protonet", 98.8),
        ("omniglot-20w5s", "protonet", 98.9),
    ]
    assert np.isnan(rep.iloc[1].ci95) and rep.iloc[2].ci95 == 0.1  # the paper's ± on its row


def test_write_group_page(tmp_path):
    df = pd.DataFrame(_group_rows())
    paths = write_group(df, GROUP, "omniglot", tmp_path, GROUP_REPORTED)
    names = [p.name for p in paths]
    assert names[:3] == ["omniglot.md", "omniglot.csv", "omniglot.tex"]
    for p in GROUP:  # the per-protocol pages as well, linking to the group page
        assert {f"{p}.md", f"{p}.csv", f"{p}.tex"} <= set(names)
        assert "Group page: [omniglot](omniglot.md)" in (tmp_path / f"{p}.md").read_text()
    assert "omniglot.png" not in names  # no x axis across a group

    md = (tmp_path / "omniglot.md").read_text()
    assert md.startswith(f"# omniglot\n\nData: {OMNIGLOT_NOTE}.\n\nSetting: inductive.")
    assert md.count("Data") == 1  # one note for one data note
    assert "Columns: 5w1s = omniglot-5w1s, 5w5s = omniglot-5w5s," in md
    table = _table_rows(md, "## Accuracy (%) by protocol")
    assert table[0] == [
        "Method",
        "Setting",
        "Backbone",
        "Seeds",
        "Tasks",
        "5w1s",
        "5w5s",
        "20w1s",
        "20w5s",
        "s / task (all)",
    ]
    # by the mean over the columns a row has: 5-shot ProtoNet (98, 97) above 1-shot (98, 95.5)
    assert [r[0] for r in table[1:]] == [
        "protonet [cfg-pn-5]",
        "protonet [cfg-pn-1]",
        "nearest-prototype [conv4-ce.pt]",
        "nearest-prototype [pixels]",
    ]
    pn5, pn1, conv4, pixels = table[1:]
    assert pn5[5:9] == ["—", _cell(0.99), "—", _cell(0.97)]
    assert pn1[5:9] == [_cell(0.98), "—", _cell(0.95), "—"]
    assert conv4[1:5] == ["inductive", "conv4-ce.pt", "1", "5"]
    assert pixels[2] == "pixels" and pixels[8] == _cell(0.50)
    assert (
        pn5[9] == f"{np.mean([0.2, 0.4]):.3f}"
        and conv4[9] == f"{np.mean([0.1, 0.2, 0.3, 0.4]):.3f}"
    )

    rep = _table_rows(md, "## Reported in papers (not measured here)")
    assert rep[0] == ["Method", "Protocol", "Reported (%)", "Measured here (%)", "Source"]
    assert rep[1:] == [
        ["maml", "omniglot-5w1s", "98.70", "not run", "Finn"],
        [
            "protonet",
            "omniglot-5w1s",
            "98.80",
            f"{_cell(0.98)} (protonet [cfg-pn-1])",
            "Snell et al. 2017, Table 1",
        ],
        [
            "protonet",
            "omniglot-20w5s",
            "98.90 ± 0.10",
            f"{_cell(0.97)} (protonet [cfg-pn-5])",
            "Snell et al. 2017, Table 1",
        ],
    ]
    secs = _table_rows(md, "## Seconds per task by protocol")
    assert secs[3][5:] == ["0.100", "0.200", "0.300", "0.400"]
    assert "- [omniglot-20w5s](omniglot-20w5s.md)" in md

    back = pd.read_csv(tmp_path / "omniglot.csv")
    assert list(back.columns[:4]) == ["group", "protocol", "column", "kind"]
    assert pd.api.types.is_float_dtype(back["accuracy"])
    assert set(back[back.kind == "measured"].backbone) == {"pixels", CKPT, "images"}

    tex = (tmp_path / "omniglot.tex").read_text()
    lines = tex.splitlines()
    rule = lines.index("\\midrule", lines.index("\\midrule") + 1)
    assert lines[rule + 1].startswith("maml (reported: Finn)")
    pn = lines[rule + 2]
    assert pn.startswith("protonet (reported: Snell et al. 2017)") and pn.count("98.") == 2
    assert pn.endswith("& 98.90 $\\pm$ 0.10 &  \\\\")
    assert "5w1s & 5w5s & 20w1s & 20w5s" in tex and "conv4-ce.pt" in tex and "/x/runs" not in tex
    ncol = len(tex.split("\\begin{tabular}{")[1].split("}")[0])
    assert all(ln.count(" & ") == ncol - 1 for ln in lines if ln.endswith("\\\\"))


def test_group_page_gaps_and_notes(tmp_path):
    df = pd.DataFrame(_group_rows())
    df = df[df.protocol != "omniglot-20w1s"]  # not run yet: an empty column, no page
    protos = [*GROUP, f"{FAMILY}-250"]
    df = pd.concat([df, pd.DataFrame(_sweep_rows()).query("protocol == @protos[-1]")])
    paths = write_group(df, protos, "omniglot-5w1s", tmp_path, GROUP_REPORTED)
    names = [p.name for p in paths]
    assert names[0] == "omniglot-5w1s-group.md"  # the name of a protocol page: suffixed
    assert "omniglot-20w1s.md" not in names and "omniglot-5w1s.md" in names
    md = (tmp_path / "omniglot-5w1s-group.md").read_text()
    assert "No results yet: omniglot-20w1s." in md and "Columns:" not in md
    # the data note holds for the Omniglot rows only: it says for which protocols
    note = f"Data (omniglot-5w1s, omniglot-5w5s, omniglot-20w5s): {OMNIGLOT_NOTE}."
    assert md.startswith(f"# omniglot-5w1s\n\n{note}\n\nSetting: ")
    table = _table_rows(md, "## Accuracy (%) by protocol")
    assert table[0][5:10] == [*GROUP, f"{FAMILY}-250"]
    assert all(r[7] == "—" for r in table[1:])  # omniglot-20w1s
    assert table[-1][0] == "lp [conv4]"  # worst mean at the bottom; labelled by backbone
    assert dataset_notes(df, GROUP[:2]) == [dataset_note(df, GROUP[:2])]
    assert dataset_note(df, GROUP[:2]) == f"Data: {OMNIGLOT_NOTE}."


def test_cli_leaderboard_group(tmp_path, monkeypatch, capsys):
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "protonet.toml").write_text(GROUP_CARD)
    monkeypatch.setenv("FSBENCH_BASELINES", str(cards))
    wd = tmp_path / "runs"
    with ResultsStore(wd / "results.sqlite") as store:
        store.append(ResultRow(**r) for r in _group_rows())
    out = tmp_path / "lb"
    base = ["--workdir", str(wd), "--out", str(out)]
    assert main(["leaderboard", *GROUP, "--name", "omniglot", *base]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"wrote {out / 'omniglot.md'}"
    md = (out / "omniglot.md").read_text()
    table = _table_rows(md, "## Accuracy (%) by protocol")
    assert table[0][5:9] == ["5w1s", "5w5s", "20w1s", "20w5s"]
    assert {r[2] for r in table[1:]} == {"pixels", "conv4-ce.pt", "images"}
    rep = _table_rows(md, "## Reported in papers (not measured here)")
    assert [r[2] for r in rep[1:]] == ["98.80", "98.90 ± 0.10"]  # reported_ci from the card
    assert (out / "omniglot-20w5s.md").exists() and not (out / "index.md").exists()

    assert main(["leaderboard", "omniglot-20w5s", "omniglot-5w1s", "--name", "x", *base]) == 0
    x = _table_rows((out / "x.md").read_text(), "## Accuracy (%) by protocol")
    assert x[0][5:7] == ["20w5s", "5w1s"]  # in the order given

    capsys.readouterr()
    assert main(["leaderboard", *GROUP, *base]) == 2
    assert "--name" in capsys.readouterr().err
    assert main(["leaderboard", "--all", "--name", "omniglot", *base]) == 2
    assert main(["leaderboard", *GROUP, "--all", "--name", "x", *base]) == 2
