"""``scripts/rounding_sensitivity.py``: the perturbed copy with ``eps=0`` reproduces the method's
own rows, and a perturbed copy runs and is reported beside them."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
from pathlib import Path

import pytest

from fewshot_bench.run.fixtures import write_episodic_protocol

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rounding_sensitivity.py"


def _script():
    spec = importlib.util.spec_from_file_location("rounding_sensitivity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eps_zero_reproduces_the_method_and_noise_is_reported(shared_data, tmp_path, capsys):
    proto = write_episodic_protocol(tmp_path, "tiny-sens", n_tasks=4, n_unlabeled=2)
    workdir = tmp_path / "runs"
    args = [str(proto), "-m", "diffusion", "--params", '{"k": 5}', "--eps", "1e-3"]
    args += [
        "--workdir",
        str(workdir),
        "--",
        "--backbone",
        "pixels",
        "--data-root",
        str(shared_data),
    ]
    assert _script().main(args) == 0
    out = capsys.readouterr().out
    assert "eps=0 reproduces the method's rows: 4/4 tasks" in out
    assert "eps=0.001: |accuracy change| mean" in out and "over 4 tasks" in out
    with sqlite3.connect(workdir / "results.sqlite") as con:
        rows = con.execute("select method, params, accuracy from results").fetchall()
    by = {}
    for method, params, acc in rows:
        by.setdefault((method, json.loads(params).get("eps", 0.0)), []).append(acc)
    assert sorted(by) == [("diffusion", 0.0), ("perturbed", 0.0), ("perturbed", 0.001)]
    assert all(len(v) == 4 for v in by.values())
    assert by[("diffusion", 0.0)] == by[("perturbed", 0.0)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "protonet"], "'protonet' consumes images; only feature methods can be perturbed"),
        (["-m", "no-such-method"], "'no-such-method' is not a built-in method"),
        (["--params", "[1]"], "--params must be a JSON object"),
    ],
)
def test_bad_arguments_are_named(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        _script().main(["omniglot-5w1s", *args])
    assert stop.value.code == 2 and message in capsys.readouterr().err
