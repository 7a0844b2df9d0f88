"""``fsbench tune``: a grid run on validation-class episodes (real Omniglot), the chosen point
written as a --method-config file, and its record bound into the rows of the run that uses it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from fewshot_bench.cli import main
from fewshot_bench.methods.params import tomllib
from fewshot_bench.run.fixtures import write_episodic_protocol


@pytest.fixture(scope="module")
def proto(tmp_path_factory) -> Path:
    # 5-way 1-shot, one query per class: k matters a lot on such small graphs
    return write_episodic_protocol(
        tmp_path_factory.mktemp("tune"), "tune-shape", n_tasks=8, n_query=1
    )


def test_tune_picks_on_validation_classes_and_run_records_it(proto, shared_data, tmp_path, capsys):
    out = tmp_path / "tuned.toml"
    common = ["--backbone", "pixels", "--data-root", str(shared_data), "--quiet"]
    code = main(
        ["tune", str(proto), "-m", "diffusion", "--grid", "k=1,9", "--tasks", "12"]
        + ["--workdir", str(tmp_path / "w"), "--out", str(out), *common]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "tune-shape.tune-val: 12 episodes of split val" in printed
    doc = tomllib.loads(out.read_text())
    (method,) = doc["method"]
    tuning = method["tuning"]
    assert method["name"] == "diffusion" and method["k"] in (1, 9)
    assert tuning["split"] == "val" and tuning["episodes"] == 12
    assert tuning["chosen"] == {"k": method["k"]}
    # tuning rows live in their own store, never in the results store
    assert not (tmp_path / "w" / "results.sqlite").exists()
    assert (tmp_path / "w" / "tune" / "tune-shape.tune-val.sqlite").exists()
    # the run binds the tuning record into every row's configuration
    run = ["run", str(proto), "--method-config", str(out), "--workdir", str(tmp_path / "w")]
    assert main(run + common) == 0
    with sqlite3.connect(tmp_path / "w" / "results.sqlite") as c:
        configs = [json.loads(r[0]) for r in c.execute("SELECT config FROM results")]
    assert len(configs) == 8 and all(cfg["tuning"] == tuning for cfg in configs)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--grid", "k=1,9", "--split", "test"], "is one of tune-shape's evaluation splits"),
        (["--grid", "k"], "write NAME=V1,V2"),
        ([], "needs at least one --grid"),
        (["--grid", "k=1,9", "--grid", "k=3"], "names 'k' twice"),
        (["--grid", "k=0,3"], "k=0 is not allowed"),
    ],
)
def test_bad_tune_requests_are_one_line_errors(
    proto, shared_data, tmp_path, capsys, extra, message
):
    args = ["tune", str(proto), "-m", "diffusion", "--tasks", "4", "--backbone", "pixels"]
    args += ["--data-root", str(shared_data), "--workdir", str(tmp_path), "--quiet", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
