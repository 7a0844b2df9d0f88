"""Building the command line's parser imports no torch (``fsbench --help`` and argument errors
answer at once), and the dataset table it no longer imports stays whole and overridable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fewshot_bench.cli import build_parser
from fewshot_bench.data import available_datasets
from fewshot_bench.data.download import RESOURCES


def _fresh(code: str) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter (this one has torch and every loader imported already)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_parser_and_help_import_no_torch() -> None:
    out = _fresh(
        """
        import contextlib, io, sys
        from fewshot_bench.cli import main
        for argv in (["--help"], ["run", "--help"], ["pretrain", "--help"], ["perf", "--help"]):
            with contextlib.redirect_stdout(io.StringIO()) as text:
                try:
                    main(argv)
                except SystemExit as exc:
                    assert exc.code == 0, (argv, exc.code)
            assert "usage: fsbench" in text.getvalue(), argv
        heavy = sorted(m for m in ("torch", "faiss", "scipy", "pandas") if m in sys.modules)
        print("HEAVY", heavy)
        """
    )
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def test_download_help_lists_what_the_registry_can_download() -> None:
    registry = sorted(n for n, info in available_datasets().items() if info.downloadable)
    assert sorted(RESOURCES) == registry
    download = build_parser()._subparsers._group_actions[0].choices["download"]
    assert all(name in download.format_help() for name in registry)


def test_built_in_datasets_load_on_first_lookup() -> None:
    out = _fresh(
        """
        import sys
        from fewshot_bench.data import available_datasets
        assert "torch" not in sys.modules
        names = sorted(available_datasets())
        print("NAMES", names)
        """
    )
    assert out.returncode == 0, out.stderr
    assert f"NAMES {sorted(available_datasets())}" in out.stdout


@pytest.mark.parametrize("lookup", ["get_info('mnist')", "available_datasets()['mnist']"])
def test_a_dataset_registered_before_the_built_ins_keeps_its_name(lookup: str) -> None:
    out = _fresh(
        f"""
        from fewshot_bench.data import available_datasets
        from fewshot_bench.data.registry import DatasetInfo, get_info, register
        mine = register(DatasetInfo("mnist", ("train",), "my own", None, "mine"))
        assert {lookup} is mine
        assert get_info("cifar10").name == "cifar10"  # the other built-ins are there
        print("OK")
        """
    )
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout
