"""`fsbench perf vote`: both vote paths on real Fashion-MNIST features, same scores."""

from __future__ import annotations

import pytest

from fewshot_bench.cli import main


def test_perf_vote_prints_both_paths_agreeing(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["perf", "vote", "--voters", "3000", "--targets", "400", "--dim", "16", "--dim", "784"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["16"], ["784"])]
    assert [r[0] for r in rows] == ["16", "784"], out
    for r in rows:
        wall_class, wall_scatter, diff, acc = float(r[1]), float(r[3]), float(r[6]), float(r[7])
        assert wall_class >= 0 and wall_scatter >= 0
        assert diff < 1e-4  # the two paths compute the same eq. 5 log-scores
        assert 50 < acc <= 100  # a 3000-image vote classifies Fashion-MNIST well above chance


def test_perf_vote_refuses_more_voters_than_images(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["perf", "vote", "--voters", "60001", "--dim", "8"]) == 2
    assert "at most 60000 voters" in capsys.readouterr().err
