"""`fewshot_bench.report` reads only the store: it imports no method, dataset or task code (so a
published table does not move when a default or a protocol file changes), and its modules form
no import cycle."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import fewshot_bench

PACKAGE = "fewshot_bench.report"
REPORT = Path(fewshot_bench.__file__).resolve().parent / "report"
TESTS = Path(__file__).resolve().parent
FORBIDDEN = ("fewshot_bench.methods", "fewshot_bench.data", "fewshot_bench.tasks")


def _module_name(path: Path) -> str:
    return PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (functions included); for
    ``from X import name`` also ``X.name`` (it may be a submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = _module_name(path)
    package_of_file = here if path.stem == "__init__" else here.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_of_file.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _report_files() -> list[Path]:
    files = sorted(REPORT.glob("*.py"))
    assert {p.stem for p in files} >= {"__init__", "entries", "stats", "tables", "family"}
    return files


def _is_forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def test_report_sources_import_no_method_data_or_task_code():
    for path in _report_files():
        bad = sorted(n for n in _imports(path) if _is_forbidden(n))
        assert not bad, f"{path.name} imports {bad}: the report must read only the store"


def _graph() -> dict[str, set[str]]:
    """Module → the report modules it imports. ``from fewshot_bench.report import name`` of a
    name that is not a submodule is an edge to the package itself (its ``__init__``)."""
    files = _report_files()
    modules = {_module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        me = _module_name(path)
        edges = set()
        for name in _imports(path):
            if name in modules:
                edges.add(name)
            elif name.startswith(PACKAGE + ".") and name.rsplit(".", 1)[0] == PACKAGE:
                edges.add(PACKAGE)  # a name from the package's __init__
        graph[me] = edges - {me}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_report_modules_form_no_import_cycle():
    graph = _graph()
    cycle = _cycle(graph)
    assert cycle is None, "import cycle in fewshot_bench.report: " + " → ".join(cycle or [])
    # no module reaches back into the package's __init__ (which imports them all)
    assert not [m for m, edges in graph.items() if PACKAGE in edges]
    assert graph[f"{PACKAGE}.entries"] == set()  # the leaf every other module may import
    assert graph[PACKAGE] >= {f"{PACKAGE}.pages", f"{PACKAGE}.tables"}


def test_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def _run(script: str, tmp_path: Path) -> list[str]:
    env = {**os.environ, "FSBENCH_BASELINES": str(tmp_path / "cards"), "OMP_NUM_THREADS": "1"}
    (tmp_path / "cards").mkdir(exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("LOADED=")][-1]
    return json.loads(line.removeprefix("LOADED="))


PRELUDE = f"""
    import importlib, json, pkgutil, sys
    from pathlib import Path
    sys.path.insert(0, {str(TESTS)!r})
    import pandas as pd
    from report_rows import imported, v2_row

    rows = [
        v2_row(f"sweep-{{n}}", m, s, t, 0.5 + 0.01 * t + n / 1000, family="sweep",
               x_value=float(n), x_label="labels", params='{{"k": 3}}' if m == "a" else "{{}}",
               data_note="JPEG copy" if n == 10 else "",
               task_source=imported() if (n, m) == (100, "b") else "sampled",
               tasks="imp" if (n, m) == (100, "b") else "")
        for n in (10, 100) for m in ("a", "b") for s in range(2) for t in range(3)
    ]
    rows += [v2_row("sweep-10", "a", s, t, 0.2, protocol_hash="edited", tasks="old",
                    family="sweep", x_value=10.0, x_label="labels")
             for s in range(2) for t in range(3)]
    df = pd.DataFrame(rows)
    out = Path("out")
    FORBIDDEN = {FORBIDDEN!r}
"""
EPILOGUE = """
    print("LOADED=" + json.dumps(sorted(m for m in sys.modules if m.startswith(FORBIDDEN))))
"""


def test_report_package_loads_no_method_data_or_task_code(tmp_path):
    """Import every report module and write every kind of page in a fresh interpreter."""
    script = (
        PRELUDE
        + """
    import fewshot_bench.report as report
    for info in pkgutil.iter_modules(report.__path__):
        importlib.import_module(f"fewshot_bench.report.{info.name}")
    from fewshot_bench.report.cards import reported_by_protocol
    reported = {"sweep-100": {"a": (70.0, "Someone 2020")}}
    report.write_all(df, out, reported)
    report.write_group(df, ["sweep-10", "sweep-100"], "g", out / "g", reported)
    print(report.to_markdown(report.summarise(df)))
    print(report.comparison_matrix(df, "sweep-10"))
    print(report.paired_test(df, "a", "b", protocol="sweep-10", config_a="cfg_a"))
    reported_by_protocol(["sweep-10"])
    assert (out / "index.md").is_file() and (out / "sweep.png").is_file()
"""
        + EPILOGUE
    )
    assert _run(script, tmp_path) == []


def test_cli_report_and_leaderboard_load_no_method_data_or_task_code(tmp_path):
    """`fsbench report` and `fsbench leaderboard` (Markdown and the HTML site) read the store and
    nothing else."""
    script = (
        PRELUDE
        + """
    import argparse
    from fewshot_bench import cli
    from fewshot_bench.run.store import ResultRow, ResultsStore

    wd = Path("runs")
    with ResultsStore(wd / "results.sqlite") as store:
        store.append(ResultRow(**r) for r in rows)
    loaded_before = sorted(m for m in sys.modules if m.startswith(FORBIDDEN))
    assert not loaded_before, loaded_before
    assert cli.cmd_report(argparse.Namespace(workdir=wd, protocol=["sweep"], format="csv")) == 0
    common = dict(workdir=wd, name=None, data_root=None)
    assert cli.cmd_leaderboard(
        argparse.Namespace(protocol=[], all=True, out=out / "all", html=out / "site", **common)
    ) == 0
    assert cli.cmd_leaderboard(
        argparse.Namespace(protocol=["sweep"], all=False, out=out / "fam", **common)
    ) == 0
    assert cli.cmd_leaderboard(argparse.Namespace(
        protocol=["sweep"], all=False, out=out / "grp", workdir=wd, name="g", data_root=None
    )) == 0
    assert (out / "fam" / "sweep.md").is_file() and (out / "grp" / "g.md").is_file()
    assert (out / "site" / "index.html").is_file()
"""
        + EPILOGUE
    )
    assert _run(script, tmp_path) == []
