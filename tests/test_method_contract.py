"""The method contract the runner owns: typed parameters checked before any task runs, what
each setting receives (device, unlabeled pool, queries one at a time or all at once), one name
per plugin, ``--plugin`` with a file or ``module:Class``, ``--method-config`` files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from fewshot_bench.cli import main
from fewshot_bench.errors import ProtocolError
from fewshot_bench.methods import available_methods
from fewshot_bench.methods.params import Param, parse_method_spec, validate
from fewshot_bench.run.assemble import queries_at_once
from fewshot_bench.run.executor import (
    MethodError,
    MethodSpec,
    ProcessExecutor,
    deliver,
    given_task,
)
from fewshot_bench.run.fixtures import write_episodic_protocol
from fewshot_bench.tasks.task import Task

REPO = Path(__file__).resolve().parents[1]
PROBES = str(REPO / "tests" / "probe_methods.py")


@pytest.fixture(scope="module")
def proto(tmp_path_factory) -> Path:
    return write_episodic_protocol(
        tmp_path_factory.mktemp("contract"), "contract", n_tasks=4, n_unlabeled=2, n_distractor=1
    )


def run(proto: Path, workdir: Path, data: Path, *methods: str, extra: tuple = ()) -> int:
    args = ["run", str(proto), "--backbone", "pixels", "--quiet", "--workdir", str(workdir)]
    args += ["--data-root", str(data), *extra]
    for m in methods:
        args += ["-m", m]
    return main(args)


BAD_VALUES = [
    ("diffusion:k=0", "k=0", "int >= 1"),
    ("diffusion:k=-1", "k=-1", "int >= 1"),
    ("diffusion:temperature=0", "temperature=0", "float > 0"),
    ("diffusion:temperature=-20", "temperature=-20", "float > 0"),
    ("diffusion:temperature=abc", "temperature='abc'", "float > 0"),
    ("spectral-propagation:n_eig=0", "n_eig=0", "int >= 2"),
    ("spectral-propagation:vote_temperature=0", "vote_temperature=0", "float > 0"),
    ("logistic-regression:max_iter=0", "max_iter=0", "int >= 1"),
    ("logistic-regression:l2=abc", "l2='abc'", "float >= 0"),
    ("logistic-regression:l2=nan", "l2=nan", "float >= 0"),
    ("logistic-regression:l2=1e400", "l2=inf", "float >= 0"),
    ("nearest-prototype:normalize=False", "normalize=False", "one of 'l2', 'center-l2', 'none'"),
    ("diffusion:queries_in_graph=maybe", "queries_in_graph='maybe'", "one of 'auto', True, False"),
    ("diffusion:prior=[0.5,-1]", "prior=[0.5, -1]", "list of float >= 0 or 'auto' or none"),
    ("nn-propagation:use_unlabeled=2", "use_unlabeled=2", "bool"),
    ("protonet:steps=1.5", "steps=1.5", "int >= 0"),
    ("nearest-prototype:bogus=1", "no parameter(s) bogus", "see `fsbench methods"),
]


@pytest.mark.parametrize(("spec", "value", "allowed"), BAD_VALUES)
def test_bad_values_are_refused_in_one_line_before_any_task(
    proto, shared_data, tmp_path, capsys, spec, value, allowed
):
    code = run(proto, tmp_path / "w", shared_data, spec)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    name = spec.partition(":")[0]
    assert f"method {name!r}" in err and value in err and allowed in err
    # nothing ran: no store was created, let alone filled
    assert not (tmp_path / "w" / "results.sqlite").exists()


def test_values_are_typed_and_lists_may_hold_commas():
    name, params = parse_method_spec("diffusion:k=20,prior=[0.2,0.2,0.2,0.2,0.2],norm=sinkhorn")
    assert name == "diffusion"
    assert params == {"k": 20, "prior": [0.2] * 5, "norm": "sinkhorn"}
    cls = available_methods()["diffusion"]
    m = cls(**params)
    assert m.params["prior"] == [0.2] * 5 and m.params["n_iter"] == "auto"
    # strings from the command line are converted to the declared type
    assert cls(k="15", graph_cache="false").params["k"] == 15
    assert cls(k="15", graph_cache="false").params["graph_cache"] is False
    assert cls(n_iter="4").params["n_iter"] == 4
    assert available_methods()["nearest-prototype"](normalize="none").params["normalize"] == "none"
    # a plugin with plain defaults gets inferred types
    with pytest.raises(ProtocolError, match="scale='big'.*float"):
        validate("x", {"scale": Param(1.0)}, {"scale": "big"})


def test_every_builtin_method_has_a_documented_schema():
    for name, cls in available_methods().items():
        if not cls.__module__.startswith("fewshot_bench."):
            continue  # test plugins registered in this process
        assert cls.schema, name
        for key, p in cls.schema.items():
            assert p.doc, f"{name}.{key} has no doc"
            assert p.check(p.default) == p.default or p.default is None
        # one meaning per name: normalize is never a bool
        if "normalize" in cls.schema:
            assert cls.schema["normalize"].choices == ("l2", "center-l2", "none"), name
        # every temperature divides; none of the old inverse-temperature names are left
        assert not {"sigma", "tau", "nn_sigma", "version"} & set(cls.schema), name


def test_methods_name_prints_the_schema(capsys):
    assert main(["methods", "diffusion"]) == 0
    out = capsys.readouterr().out
    assert "[graph]" in out and "[diffusion]" in out
    assert "k = 'auto'  (int >= 1 or 'auto')" in out and "neighbours per node" in out
    assert main(["methods", "no-such-method"]) == 2


def test_method_config_file(proto, shared_data, tmp_path, capsys):
    cfg = tmp_path / "methods.toml"
    cfg.write_text(
        '[[method]]\nname = "diffusion"\nk = 3\nprior = [0.2, 0.2, 0.2, 0.2, 0.2]\n'
        '[[method]]\nname = "nearest-prototype"\nnormalize = "none"\n'
    )
    assert run(proto, tmp_path / "w", shared_data, extra=("--method-config", str(cfg))) == 0
    with sqlite3.connect(tmp_path / "w" / "results.sqlite") as c:
        got = dict(c.execute("SELECT method, COUNT(*) FROM results GROUP BY method").fetchall())
    assert got == {"diffusion": 4, "nearest-prototype": 4}
    bad = tmp_path / "bad.toml"
    bad.write_text('[[method]]\nname = "diffusion"\nk = 0\n')
    assert run(proto, tmp_path / "w2", shared_data, extra=("--method-config", str(bad))) == 2
    assert "k=0 is not allowed" in capsys.readouterr().err


# --------------------------------------------------------------------- what each setting gets
def probe_task(n_way: int = 3, n_query: int = 7, n_unlabeled: int = 4) -> Task:
    g = torch.Generator().manual_seed(0)
    return Task(
        support=torch.randn(n_way * 2, 6, generator=g),
        support_labels=torch.arange(n_way).repeat(2),
        unlabeled=torch.randn(n_unlabeled, 6, generator=g),
        query=torch.randn(n_query, 6, generator=g),
        n_way=n_way,
        kind="features",
    )


@pytest.fixture(scope="module")
def worker():
    ex = ProcessExecutor((PROBES,))
    yield ex
    ex.close()


@pytest.mark.parametrize(
    ("setting", "queries_seen", "unlabeled_seen", "recorded"),
    [
        ("inductive", 1, 0, "inductive"),
        ("semi-supervised", 1, 4, "semi-supervised"),
        ("transductive", 7, 4, "transductive"),
    ],
)
def test_what_each_setting_receives(worker, setting, queries_seen, unlabeled_seen, recorded):
    """The probe returns, per query, how many queries and unlabeled items its call held and
    whether the tensors were on the task's device; the runner decides all three."""
    handle = worker.open(MethodSpec("contract-probe", {"setting": setting}), "cpu")
    tasks = [probe_task(), probe_task(n_query=3)]
    scores, settings = worker.map(handle, tasks, [0, 1])
    worker.release(handle)
    assert settings == [recorded, recorded]
    for task, s in zip(tasks, scores, strict=True):
        assert s.shape == (task.query.shape[0], 3)
        if setting != "transductive":
            assert (s[:, 0] == 1).all()  # one query per call, every time
        else:
            assert (s[:, 0] == task.query.shape[0]).all()
        assert (s[:, 1] == unlabeled_seen).all()
        assert (s[:, 2] == 1).all()  # on the device the runner was asked for
    # a task without a pool is recorded as what the method got: inductive
    handle = worker.open(MethodSpec("contract-probe", {"setting": "semi-supervised"}), "cpu")
    _, settings = worker.map(handle, [probe_task(n_unlabeled=0)], [0])
    worker.release(handle)
    assert settings == ["inductive"]


def test_an_inductive_method_cannot_use_its_queries_jointly(worker):
    """A hostile "inductive" method that labels each query by its rank among the queries of its
    call (a transductive trick) gets nothing from it: every call holds one query."""
    handle = worker.open(MethodSpec("joint-query-ranker", {}), "cpu")
    task = probe_task(n_query=9)
    (scores,), _ = worker.map(handle, [task], [0])
    worker.release(handle)
    assert (scores.argmax(1) == 0).all()  # rank 0 of 1, for every query


def test_a_plugin_claiming_a_rowwise_scorer_still_gets_one_query_per_call(worker):
    """Only built-in classes are taken at their word: a plugin's ``rowwise_scorer`` is ignored."""
    handle = worker.open(MethodSpec("rowwise-claimer", {}), "cpu")
    (scores,), _ = worker.map(handle, [probe_task(n_query=9)], [0])
    worker.release(handle)
    assert (scores.argmax(1) == 0).all()
    assert not queries_at_once("rowwise-claimer", "")
    assert not queries_at_once("nearest-prototype", f"{PROBES}:RowwiseClaimer")


ROWWISE = sorted(n for n, c in available_methods().items() if c.__dict__.get("rowwise_scorer"))


def test_the_rowwise_builtins_are_the_simple_feature_methods():
    assert ROWWISE == [
        "logistic-regression",
        "nearest-prototype",
        "nn-propagation",
        "propagation-classifier",
        "simpleshot",
    ]
    assert all(queries_at_once(name, "") for name in ROWWISE)
    assert not queries_at_once("protonet", "")  # a network: not declared row-wise


@pytest.mark.parametrize("name", ROWWISE)
def test_rowwise_builtins_score_all_queries_as_one_at_a_time(name, digits):
    """What the declaration promises: ``scorer(Q)[i] == scorer(Q[i:i+1])`` (to float rounding;
    the same argmax) on a real task with an unlabeled pool, so batching changes no result."""
    from digits_episodes import digits_episode

    from fewshot_bench.methods.base import TaskContext

    x, y = digits
    task, _ = digits_episode(x, y, 3, way=5, shot=2, queries=8, n_unl=6)
    method = available_methods()[name]()
    setting = "semi-supervised" if method.setting == "semi-supervised" else "inductive"
    given = given_task(task, setting)
    (scorer,) = method.fit_tasks([given], [TaskContext.create(0)])
    together = scorer(task.query)
    alone = torch.cat([scorer(task.query[i : i + 1]) for i in range(task.query.shape[0])])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert torch.equal(together.argmax(1), alone.argmax(1))


def test_a_rowwise_builtin_gets_each_chunk_in_one_score_request(worker):
    calls = []

    def counting(*request):
        calls.append(request[0])
        return worker._call(*request)

    handle = worker.open(MethodSpec("nearest-prototype", {}), "cpu")
    tasks = [probe_task(n_query=9), probe_task(n_query=4)]
    scores, _ = deliver(counting, handle, tasks, [0, 1])
    worker.release(handle)
    assert calls == ["fit", "score", "drop"]
    assert [tuple(s.shape) for s in scores] == [(9, 3), (4, 3)]


def test_scorer_shape_is_checked(worker):
    handle = worker.open(MethodSpec("contract-probe", {"setting": "inductive", "bad_shape": True}))
    with pytest.raises(MethodError, match=r"scored 1 queries with shape \(2, 3\)"):
        worker.map(handle, [probe_task()], [0])
    worker.release(handle)


# --------------------------------------------------------------------- names and --plugin
def test_one_name_per_plugin(worker):
    with pytest.raises(MethodError, match="registered as 'contract-probe'"):
        worker.describe(MethodSpec("other-name", {}, f"{PROBES}:ContractProbe"))


def test_plugin_file_and_module_class(proto, shared_data, tmp_path, monkeypatch):
    plugin = tmp_path / "my_method.py"
    plugin.write_text(
        "from fewshot_bench.methods.simple import NearestPrototype\n\n"
        "class Mine(NearestPrototype):\n"
        '    """A copy of nearest-prototype, unregistered: --plugin FILE:Mine names it."""\n'
        '    name = "mine"\n'
    )
    monkeypatch.chdir(tmp_path)
    assert (
        run(proto, tmp_path / "w", shared_data, "mine", extra=("--plugin", "my_method.py:Mine"))
        == 0
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert (
        run(proto, tmp_path / "w2", shared_data, "mine", extra=("--plugin", "my_method:Mine")) == 0
    )
    for w in ("w", "w2"):
        with sqlite3.connect(tmp_path / w / "results.sqlite") as c:
            assert c.execute("SELECT DISTINCT method FROM results").fetchall() == [("mine",)]


def test_optional_fit_runs_without_base_classes(proto, shared_data, tmp_path, capsys):
    """The ``proto`` fixture names no fit_split: base-centred methods (``fit_optional``) then
    centre on the task's items instead of being refused; a method that must train is refused."""
    assert run(proto, tmp_path / "w", shared_data, "simpleshot", "bd-cspn") == 0
    with sqlite3.connect(tmp_path / "w" / "results.sqlite") as c:
        got = dict(c.execute("SELECT method, COUNT(*) FROM results GROUP BY method").fetchall())
    assert got == {"simpleshot": 4, "bd-cspn": 4}
    assert run(proto, tmp_path / "w2", shared_data, "protonet:steps=1") == 2
    assert "fit_split" in capsys.readouterr().err
