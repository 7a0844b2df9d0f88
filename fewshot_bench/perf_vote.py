"""``fsbench perf vote``: eq. 5 voting at pool scale, both implementations on the same data.

The 60 000 Fashion-MNIST training images vote (with their true labels, weight 1) for the 10 000
test images, as nn-propagation's query vote does once the pool is pseudo-labelled: ``log z[u, c]
= log mean_{i in c} exp(σ cos(i, u))``. Features are PCA projections of the pixels fitted on the
training images (``--dim 784`` keeps the pixels). For each dimension the class-by-class path
(used on CPU from 16 voters per class on) and the scatter path (fewer voters per class, CUDA)
score the same targets; the table gives wall and CPU seconds of each, their ratio, the largest
difference between their log-scores and the accuracy of the vote, with the load average, since
these machines are shared.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np


def add_vote_parser(sub: Any) -> None:
    """Register ``perf vote`` on the ``perf`` sub-parser set."""
    p = sub.add_parser(
        "vote",
        help="eq. 5 voting, 60k voters x 10k targets (class-by-class vs scatter path)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--voters", type=int, default=60_000, help="training images that vote")
    p.add_argument("--targets", type=int, default=10_000, help="test images scored")
    p.add_argument(
        "--dim",
        type=int,
        action="append",
        default=None,
        help="feature dimension (PCA of the pixels; 784 = the pixels); repeat for several "
        "(default: 64, 128, 784)",
    )
    p.add_argument("--sigma", type=float, default=20.0, help="inverse temperature (default 20)")
    p.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX .gz files")
    p.add_argument("--seed", type=int, default=0, help="seeds the voter/target draw and the PCA")
    p.set_defaults(func=main_vote)


def _features(
    x_train: np.ndarray, x_test: np.ndarray, dim: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Both sets projected on the training set's principal axes (the pixels at ``dim >= 784``)."""
    if dim >= x_train.shape[1]:
        return x_train, x_test
    from fewshot_bench.perf import pca_axes

    mean, axes = pca_axes(x_train, dim, rng)
    return ((x_train - mean) @ axes).astype(np.float32), ((x_test - mean) @ axes).astype(np.float32)


def _timed(fn: Any, *args: Any) -> tuple[Any, float, float]:
    """``fn(*args)``, its wall seconds and its CPU seconds (as the other perf tables count them)."""
    from fewshot_bench.perf import _cpu_s

    c0, t0 = _cpu_s(), time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0, _cpu_s() - c0


def main_vote(args: argparse.Namespace) -> int:
    """Print the table described in the module docstring."""
    import torch

    from fewshot_bench.errors import FsbenchError
    from fewshot_bench.graph.spectral import Voters
    from fewshot_bench.perf import load_fashion_mnist

    dims = args.dim or [64, 128, 784]
    if min(args.voters, args.targets) < 1 or any(d < 1 for d in dims):
        raise FsbenchError("--voters, --targets and --dim must be positive")
    x, y = load_fashion_mnist(args.data_root)
    x_train, y_train, x_test, y_test = x[:60_000], y[:60_000], x[60_000:], y[60_000:]
    if args.voters > len(x_train) or args.targets > len(x_test):
        raise FsbenchError(
            f"at most {len(x_train)} voters and {len(x_test)} targets (the Fashion-MNIST splits)"
        )
    rng = np.random.default_rng(args.seed)
    vi = np.sort(rng.choice(len(x_train), args.voters, replace=False))
    ti = np.sort(rng.choice(len(x_test), args.targets, replace=False))
    print(
        f"eq. 5 vote: {args.voters} Fashion-MNIST training images vote for {args.targets} test "
        f"images, 10 classes, σ={args.sigma:g}; torch threads {torch.get_num_threads()}, "
        f"load avg {os.getloadavg()[0]:.2f}"
    )
    head = (
        f"{'dim':>5s} {'class path s':>13s} {'CPU s':>7s} {'scatter s':>10s} {'CPU s':>7s} "
        f"{'ratio':>6s} {'max |diff|':>11s} {'vote acc %':>11s}"
    )
    print(head + "\n" + "-" * len(head))
    for dim in dims:
        f_train, f_test = _features(x_train[vi], x_test[ti], dim, rng)
        voters = Voters(
            torch.from_numpy(f_train), torch.from_numpy(y_train[vi]).long(), 10, args.sigma
        )
        targets = torch.from_numpy(f_test)
        times = {}
        scores = {}
        for by_class in (True, False):
            voters.by_class = by_class
            scores[by_class], wall, cpu = _timed(voters, targets)
            times[by_class] = (wall, cpu)
        diff = float((scores[True] - scores[False]).abs().max())
        acc = 100 * float((scores[True].argmax(1).numpy() == y_test[ti]).mean())
        (cw, cc), (sw, sc) = times[True], times[False]
        print(
            f"{dim:5d} {cw:13.2f} {cc:7.2f} {sw:10.2f} {sc:7.2f} {sw / max(cw, 1e-9):5.1f}x "
            f"{diff:11.1e} {acc:11.2f}"
        )
    print(f"load avg at the end {os.getloadavg()[0]:.2f}")
    return 0
