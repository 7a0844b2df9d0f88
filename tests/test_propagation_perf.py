"""`fsbench perf propagation`: argument parsing, data preparation and the in-process runner."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from fewshot_bench import perf


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    perf.add_perf_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["perf", "propagation", *argv])


def test_parser_defaults() -> None:
    args = _args("--n", "5000", "--method", "spectral")
    assert (args.n, args.dim, args.method, args.sklearn_max_n) == (5000, 64, "spectral", 200000)
    assert args.func is perf.main_propagation


def test_each_method_is_benchmarked_at_its_own_neighbour_count() -> None:
    assert perf.neighbour_count(_args()) == 30  # diffusion: Douze et al.'s k
    assert perf.neighbour_count(_args("--method", "spectral")) == 10  # the method's k="auto"
    assert perf.neighbour_count(_args("--spectral-solvers")) == 10
    assert perf.neighbour_count(_args("--method", "spectral", "--k", "30")) == 30


def test_synthetic_data_and_seeds() -> None:
    x, y, desc = perf.make_data(_args("--data", "synthetic", "--n", "3000", "--dim", "8"))
    assert x.shape == (3000, 8) and x.dtype == np.float32 and "synthetic" in desc
    seeds = perf.pick_seeds(y, 5, np.random.default_rng(0))
    assert len(seeds) == 50 and (np.bincount(y[seeds]) == 5).all()


@pytest.mark.parametrize("method", ["diffusion", "spectral", "nn"])
def test_runner_in_process(tmp_path, method: str) -> None:
    x, y, _ = perf.make_data(_args("--data", "synthetic", "--n", "1500", "--dim", "8"))
    path = str(tmp_path / "d.npz")
    np.savez(path, x=x, y=y)
    seeds = perf.pick_seeds(y, 5, np.random.default_rng(0))
    cfg = {
        "method": method,
        "k": 10,
        "index": "auto",
        "nprobe": 8,
        "device": "cpu",
        "seed": 0,
        "norm": "col",
        "n_iter": "auto",
        "n_eig": 20,
        "sigma": None,
    }
    out = perf._run_ours(path, seeds, cfg)
    assert out["acc"] > 0.5 and out["build_s"] >= 0 and out["peak_mb"] > 0
