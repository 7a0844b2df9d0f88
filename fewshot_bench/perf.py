"""``fsbench perf propagation``: graph-build / propagation time, peak memory and accuracy of our
label propagation next to scikit-learn's ``LabelSpreading(kernel="knn")`` on the same data.

Data: Fashion-MNIST pixels (IDX files) PCA-reduced to ``--dim``; above 70,000 points the set is
tiled with Gaussian jitter (and the output says so), or ``--data synthetic`` Gaussian mixtures.
``--labels-per-class`` random points per class are labeled; accuracy is over all the others
(transductive, like LabelSpreading). Each contender runs in a fresh spawned process so its peak
RSS is its own (reported with the data-loaded baseline subtracted as well).
"""

from __future__ import annotations

import argparse
import gzip
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)


def add_perf_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``perf propagation`` (and ``perf executors``, see ``run/executor_bench.py``) to an
    ``argparse`` sub-parser set; returns the ``perf`` parser."""
    perf = subparsers.add_parser("perf", help="performance benchmarks")
    sub = perf.add_subparsers(dest="perf_command", required=True)
    p = sub.add_parser(
        "propagation",
        help="time graph build + propagation against sklearn LabelSpreading(kernel='knn')",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, default=100_000, help="number of points (default 100000)")
    p.add_argument("--dim", type=int, default=64, help="feature dimension after PCA (default 64)")
    p.add_argument(
        "--k",
        type=int,
        default=None,
        help="neighbours per node, for our graph and LabelSpreading's alike (default: 30 for "
        "diffusion, Douze et al.'s value; 10 for spectral, the spectral-propagation method's own)",
    )
    p.add_argument("--method", choices=("diffusion", "spectral", "nn"), default="diffusion")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default auto)")
    p.add_argument("--data", choices=("fashion-mnist", "synthetic"), default="fashion-mnist")
    p.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX .gz files")
    p.add_argument("--labels-per-class", type=int, default=10, help="labeled points per class")
    p.add_argument("--index", choices=("auto", "flat", "ivf", "hnsw"), default="auto")
    p.add_argument("--nprobe", type=int, default=8, help="IVF lists probed (default 8)")
    p.add_argument("--norm", choices=("col", "row", "sinkhorn", "none"), default="col")
    p.add_argument("--n-iter", default="auto", help="diffusion iterations or 'auto' (validation)")
    p.add_argument("--n-eig", type=int, default=200, help="spectral: eigenvectors η (default 200)")
    p.add_argument(
        "--sigma", type=float, default=None, help="voting inverse temperature (40 spectral, 20 nn)"
    )
    p.add_argument(
        "--jitter", type=float, default=0.1, help="tiling noise, in per-dimension std units"
    )
    p.add_argument("--sklearn-max-n", type=int, default=200_000, help="skip sklearn above this n")
    p.add_argument("--no-sklearn", action="store_true", help="do not run sklearn at all")
    p.add_argument(
        "--spectral-solvers",
        action="store_true",
        help="spectral only: our eigensolver vs the exact one (ARPACK) vs sklearn, one graph",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=main_propagation)
    from fewshot_bench.run.executor_bench import add_executors_parser

    add_executors_parser(sub)
    from fewshot_bench.perf_large import add_large_parser

    add_large_parser(sub)
    from fewshot_bench.perf_episodes import add_episodes_parser

    add_episodes_parser(sub)
    from fewshot_bench.perf_vote import add_vote_parser

    add_vote_parser(sub)
    return perf


# ------------------------------------------------------------------------------------ data
def _find_fashion(root: str | None) -> Path:
    cands = [Path(root)] if root else []
    if os.environ.get("FSBENCH_DATA"):
        cands += [
            Path(os.environ["FSBENCH_DATA"]) / "fashion-mnist",
            Path(os.environ["FSBENCH_DATA"]),
        ]
    cands += [Path(d) for d in FASHION_DIRS]
    for c in cands:
        if (c / FASHION_FILES["train_x"]).exists():
            return c
    from fewshot_bench.errors import DataNotFoundError

    raise DataNotFoundError(
        "Fashion-MNIST IDX files not found (looked in "
        + ", ".join(str(c) for c in cands)
        + "); pass --data-root, install dataset-fashion-mnist, or use --data synthetic"
    )


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load_fashion_mnist(root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 Fashion-MNIST images as float32 ``[n, 784]`` in [0, 1], and labels."""
    d = _find_fashion(root)
    x = np.concatenate([_read_idx(d / FASHION_FILES[f], 16) for f in ("train_x", "test_x")])
    y = np.concatenate([_read_idx(d / FASHION_FILES[f], 8) for f in ("train_y", "test_y")])
    return x.reshape(-1, 784).astype(np.float32) / 255.0, y.astype(np.int64)


def pca_axes(
    x: np.ndarray, dim: int, rng: np.random.Generator, fit_size: int = 20000
) -> tuple[np.ndarray, np.ndarray]:
    """The mean of ``x`` and its top ``dim`` principal axes ``[d, dim]`` (fitted on a random
    subset of ``fit_size`` rows)."""
    mean = x.mean(0)
    sub = x[rng.choice(len(x), min(len(x), fit_size), replace=False)] - mean
    _, _, vt = np.linalg.svd(sub, full_matrices=False)
    return mean, vt[:dim].T


def pca(x: np.ndarray, dim: int, rng: np.random.Generator, fit_size: int = 20000) -> np.ndarray:
    """Project on the top ``dim`` principal axes (fitted on a random subset)."""
    mean, axes = pca_axes(x, dim, rng, fit_size)
    return ((x - mean) @ axes).astype(np.float32)


def make_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    """Features ``[n, dim]``, labels and a one-line description of what was generated."""
    rng = np.random.default_rng(args.seed)
    if args.data == "synthetic":
        n_classes = 10
        centers = rng.standard_normal((n_classes, args.dim)).astype(np.float32) * 0.5
        y = rng.integers(0, n_classes, args.n)
        x = centers[y] + rng.standard_normal((args.n, args.dim), dtype=np.float32) * 0.5
        return x, y, f"synthetic Gaussian mixture, 10 classes, n={args.n}, dim={args.dim}"
    raw, labels = load_fashion_mnist(args.data_root)
    if args.dim > raw.shape[1]:
        raise SystemExit(f"--dim {args.dim} exceeds the 784 pixels of Fashion-MNIST")
    feats = pca(raw, args.dim, rng)
    if args.n <= len(feats):
        pick = rng.choice(len(feats), args.n, replace=False)
        return feats[pick], labels[pick], f"Fashion-MNIST {args.n} of 70000 images, PCA-{args.dim}"
    reps = int(np.ceil(args.n / len(feats)))
    src = np.arange(args.n) % len(feats)
    noise = rng.standard_normal((args.n, args.dim), dtype=np.float32) * (args.jitter * feats.std(0))
    noise[: len(feats)] = 0.0  # the first copy is the real data
    desc = (
        f"Fashion-MNIST 70000 images PCA-{args.dim}, TILED x{reps} to n={args.n} "
        f"(copies jittered by {args.jitter} std per dimension)"
    )
    return feats[src] + noise, labels[src], desc


def pick_seeds(y: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` random indices of each class."""
    out = [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in np.unique(y)]
    return np.concatenate(out)


# ------------------------------------------------------------------------------------ runners
def _status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _rss_mb() -> float:
    """Current resident set size (MB)."""
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    """Peak RSS of this process image (MB): ``VmHWM``, which, unlike ``ru_maxrss``, is not
    inherited from the parent across fork+exec; ``ru_maxrss`` where /proc is unavailable."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm == hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    """CPU seconds (user + system, all threads, plus waited-for children) of this process."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime


def _run_ours(path: str, seeds: np.ndarray, cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from fewshot_bench.graph.build import graph_from_neighbors
    from fewshot_bench.graph.diffusion import diffuse, diffuse_select, leave_some_out_folds
    from fewshot_bench.graph.knn import KnnIndex
    from fewshot_bench.graph.spectral import spectral_embedding, vote
    from fewshot_bench.graph.spmm import ReorderedCsr, gathers_miss_cache

    data = np.load(path)
    x, y = data["x"], data["y"]
    base_rss = _rss_mb()
    device = torch.device(cfg["device"])
    n, n_classes = len(x), int(y.max()) + 1
    seeds_t = torch.from_numpy(seeds).to(device)
    lab_t = torch.from_numpy(y[seeds]).to(device)
    info: dict[str, Any] = {}
    c0 = _cpu_s()
    t0 = time.perf_counter()
    if cfg["method"] == "nn":
        xt = torch.nn.functional.normalize(torch.from_numpy(x).to(device), dim=1)
        t1 = time.perf_counter()
        scores = vote(xt[seeds_t], lab_t, xt, n_classes, cfg["sigma"] or 20.0)
        pred = scores.argmax(1).cpu().numpy()
        t2 = time.perf_counter()
    else:
        idx = KnnIndex(
            x,
            metric="cosine",
            index=cfg["index"],
            nprobe=cfg["nprobe"],
            device=device,
            seed=cfg["seed"],
        )
        nb = idx.search_self(cfg["k"])
        order = idx.list_order
        del idx
        graph = graph_from_neighbors(nb, None)
        del nb
        info["graph_mb"] = graph.nbytes / 2**20
        info["graph_8nk_mb"] = 8 * n * cfg["k"] / 2**20
        if cfg["method"] == "diffusion":
            W = graph.transition(device)
            del graph
            if order is not None and device.type == "cpu" and gathers_miss_cache(n):
                W = ReorderedCsr(W, order)  # same bits, nearby memory
            t1 = time.perf_counter()
            gen = torch.Generator().manual_seed(cfg["seed"])
            folds = leave_some_out_folds(lab_t.cpu(), 3, gen) if cfg["n_iter"] == "auto" else []
            if folds:  # validation + final diffusion in one pass, as the diffusion method does
                n_iter, _, L = diffuse_select(
                    W, seeds_t, lab_t, n_classes, folds, max_iter=10, norm=cfg["norm"]
                )
            else:
                n_iter = 3 if cfg["n_iter"] == "auto" else int(cfg["n_iter"])
                L = diffuse(W, seeds_t, lab_t, n_classes, n_iter, norm=cfg["norm"])
            info["n_iter"] = n_iter
            pred = L.argmax(1).cpu().numpy()
            t2 = time.perf_counter()
        else:
            t1 = time.perf_counter()
            emb = spectral_embedding(
                graph.adjacency,
                cfg["n_eig"],
                device=device,
                generator=torch.Generator().manual_seed(cfg["seed"]),
            )
            info["eigen_s"] = time.perf_counter() - t1
            e = emb.embedding()
            scores = vote(e[seeds_t], lab_t, e, n_classes, cfg["sigma"] or 40.0)
            pred = scores.argmax(1).cpu().numpy()
            t2 = time.perf_counter()
    mask = np.ones(n, bool)
    mask[seeds] = False
    acc = float((pred[mask] == y[mask]).mean())
    return {
        "cpu_s": _cpu_s() - c0,
        "build_s": t1 - t0,
        "prop_s": t2 - t1,
        "peak_mb": _peak_mb(),
        "base_mb": base_rss,
        "acc": acc,
        **info,
    }


def _run_sklearn(path: str, seeds: np.ndarray, cfg: dict[str, Any]) -> dict[str, Any]:
    from sklearn.semi_supervised import LabelSpreading

    data = np.load(path)
    x, y = data["x"], data["y"]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # same cosine geometry
    base_rss = _rss_mb()
    target = np.full(len(y), -1)
    target[seeds] = y[seeds]
    c0 = _cpu_s()
    t0 = time.perf_counter()
    model = LabelSpreading(kernel="knn", n_neighbors=cfg["k"], n_jobs=-1).fit(x, target)
    t1 = time.perf_counter()
    cpu = _cpu_s() - c0
    mask = np.ones(len(y), bool)
    mask[seeds] = False
    acc = float((model.transduction_[mask] == y[mask]).mean())
    return {
        "cpu_s": cpu,
        "build_s": float("nan"),
        "prop_s": t1 - t0,
        "peak_mb": _peak_mb(),
        "base_mb": base_rss,
        "acc": acc,
        "n_iter": int(model.n_iter_),
    }


def _child(fn_name: str, path: str, seeds: np.ndarray, cfg: dict[str, Any], q: Any) -> None:
    try:
        q.put(("ok", globals()[fn_name](path, seeds, cfg)))
    except BaseException as e:  # report, never hang the parent
        q.put(("error", f"{type(e).__name__}: {e}"))


def _in_subprocess(
    fn_name: str, path: str, seeds: np.ndarray, cfg: dict[str, Any]
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn_name, path, seeds, cfg, q))
    proc.start()
    status, payload = q.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{fn_name} failed: {payload}")
    return payload


#: ``--k`` default for diffusion (Douze et al.'s k).
DIFFUSION_K = 30


def neighbour_count(args: argparse.Namespace) -> int:
    """``--k``, else the benchmarked method's own default: 30 for diffusion, the
    spectral-propagation method's ``k="auto"`` on a large pool (10) for spectral."""
    if args.k is not None:
        return int(args.k)
    from fewshot_bench.methods.propagation import K_AUTO_MAX

    return K_AUTO_MAX if args.spectral_solvers or args.method == "spectral" else DIFFUSION_K


def main_propagation(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` and print the comparison table."""
    args.k = neighbour_count(args)
    if args.spectral_solvers:
        return main_spectral_solvers(args)
    import torch

    from fewshot_bench.graph.knn import choose_index

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(args.seed + 1)
    t0 = time.perf_counter()
    x, y, desc = make_data(args)
    seeds = pick_seeds(y, args.labels_per_class, rng)
    index_used = choose_index(len(x), len(x)) if args.index == "auto" else args.index
    cfg = {
        "method": args.method,
        "k": args.k,
        "index": args.index,
        "index_used": index_used,
        "nprobe": args.nprobe,
        "device": device,
        "seed": args.seed,
        "norm": args.norm,
        "n_iter": args.n_iter,
        "n_eig": args.n_eig,
        "sigma": args.sigma,
    }
    print(f"data: {desc} ({time.perf_counter() - t0:.1f} s to prepare)")
    print(
        f"task: {len(seeds)} labeled ({args.labels_per_class}/class), accuracy over the other "
        f"{len(x) - len(seeds)} points; k={args.k}; device={device}; "
        f"cores={len(os.sched_getaffinity(0))}; load avg={os.getloadavg()[0]:.1f}"
    )
    rows: list[tuple[str, dict[str, Any] | None, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.npz")
        np.savez(path, x=np.ascontiguousarray(x, dtype=np.float32), y=y)
        del x
        label = {
            "diffusion": f"ours: diffusion ({index_used}, nprobe={args.nprobe}, norm={args.norm})",
            "spectral": f"ours: spectral η={args.n_eig} ({index_used})",
            "nn": "ours: nn-propagation (eq. 5, no graph)",
        }[args.method]
        rows.append((label, _in_subprocess("_run_ours", path, seeds, cfg), ""))
        if args.no_sklearn:
            rows.append(("sklearn LabelSpreading(knn)", None, "skipped (--no-sklearn)"))
        elif len(y) > args.sklearn_max_n:
            rows.append(
                (
                    "sklearn LabelSpreading(knn)",
                    None,
                    f"skipped: n > --sklearn-max-n={args.sklearn_max_n}",
                )
            )
        else:
            rows.append(
                (
                    "sklearn LabelSpreading(knn)",
                    _in_subprocess("_run_sklearn", path, seeds, cfg),
                    "",
                )
            )
    _print_table(rows)
    ours, sk = rows[0][1], rows[1][1]
    assert ours is not None
    extra = {
        k: v for k, v in ours.items() if k in ("n_iter", "eigen_s", "graph_mb", "graph_8nk_mb")
    }
    if extra:
        print(
            "ours: "
            + ", ".join(
                f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()
            )
        )
    if sk is not None:
        total_ours = ours["build_s"] + ours["prop_s"]
        print(
            f"speed-up vs sklearn: {sk['prop_s'] / max(total_ours, 1e-9):.1f}x; "
            f"accuracy {100 * ours['acc']:.2f}% vs {100 * sk['acc']:.2f}% (sklearn iterations: {sk['n_iter']})"
        )
    print(
        "columns: wall seconds (build = kNN graph, prop = propagation incl. choosing the iteration "
        "count); CPU s = user+system seconds of all threads; peak MB = peak RSS of the run's own "
        "process, +MB = peak minus RSS with the data loaded"
    )
    print(f"load avg after: {os.getloadavg()[0]:.1f}")
    sys.stdout.flush()
    return 0


def _print_table(rows: list[tuple[str, dict[str, Any] | None, str]]) -> None:
    head = (
        f"{'method':58s} {'build s':>8s} {'prop s':>8s} {'total s':>8s} {'CPU s':>7s} "
        f"{'peak MB':>8s} {'+MB':>7s} {'acc %':>7s}"
    )
    print(head)
    print("-" * len(head))
    for name, r, note in rows:
        if r is None:
            print(f"{name:58s} {note}")
            continue
        build = r["build_s"]
        total = r["prop_s"] + (0.0 if np.isnan(build) else build)
        b = "(in fit)" if np.isnan(build) else f"{build:8.2f}"
        print(
            f"{name:58s} {b:>8s} {r['prop_s']:8.2f} {total:8.2f} {r['cpu_s']:7.1f} {r['peak_mb']:8.0f} "
            f"{r['peak_mb'] - r['base_mb']:7.0f} {100 * r['acc']:7.2f}"
        )


# ------------------------------------------------------------------------- spectral solvers
def main_spectral_solvers(args: argparse.Namespace) -> int:
    """``--spectral-solvers``: spectral propagation (eq. 6 + eq. 5 vote) with our eigensolver
    and with the exact one (ARPACK to tol 1e-8) on the same kNN graph, then scikit-learn's
    LabelSpreading on the same data, all on CPU; wall and CPU seconds per stage, accuracy at
    ``--sigma`` (default 40)."""
    import torch

    from fewshot_bench.graph.build import graph_from_neighbors
    from fewshot_bench.graph.knn import KnnIndex
    from fewshot_bench.graph.spectral import spectral_embedding, vote

    x, y, desc = make_data(args)
    seeds = pick_seeds(y, args.labels_per_class, np.random.default_rng(args.seed + 1))
    n, n_classes, sigma = len(x), int(y.max()) + 1, args.sigma or 40.0
    mask = np.ones(n, bool)
    mask[seeds] = False
    seeds_t, lab_t = torch.from_numpy(seeds), torch.from_numpy(y[seeds])
    print(f"data: {desc}; {len(seeds)} labeled, accuracy over the other {n - len(seeds)}")
    print(
        f"k={args.k}, η={args.n_eig}, cores={len(os.sched_getaffinity(0))}, torch threads="
        f"{torch.get_num_threads()}, load avg={os.getloadavg()[0]:.1f}"
    )

    def clock() -> tuple[float, float]:
        return time.perf_counter(), _cpu_s()

    def since(t: tuple[float, float]) -> tuple[float, float]:
        return time.perf_counter() - t[0], _cpu_s() - t[1]

    t = clock()
    idx = KnnIndex(x, metric="cosine", index=args.index, nprobe=args.nprobe, seed=args.seed)
    graph = graph_from_neighbors(idx.search_self(args.k), None)
    del idx
    build = since(t)
    rows = []
    for name, kw in (
        ("ours: solver=auto (chebyshev), defaults", {}),
        ("exact: ARPACK eigsh, tol 1e-8", {"solver": "arpack", "tol": 1e-8}),
    ):
        t = clock()
        gen = torch.Generator().manual_seed(args.seed)
        emb = spectral_embedding(graph.adjacency, args.n_eig, generator=gen, **kw)
        eig = since(t)
        t = clock()
        e = emb.embedding()
        pred = vote(e[seeds_t], lab_t, e, n_classes, sigma).argmax(1).numpy()
        votes = since(t)
        rows.append((name, build, eig, votes, float((pred[mask] == y[mask]).mean())))
    sk = None
    if not args.no_sklearn:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "data.npz")
            np.savez(path, x=np.ascontiguousarray(x, dtype=np.float32), y=y)
            sk = _in_subprocess("_run_sklearn", path, seeds, {"k": args.k})
    head = (
        f"{'eigensolver':42s} {'graph s':>8s} {'eigen s':>8s} {'vote s':>7s} {'total s':>8s} "
        f"{'CPU s':>7s} {f'acc% σ={sigma:g}':>11s}"
    )
    print(head + "\n" + "-" * len(head))
    for name, b, eg, v, acc in rows:
        print(
            f"{name:42s} {b[0]:8.2f} {eg[0]:8.2f} {v[0]:7.2f} {b[0] + eg[0] + v[0]:8.2f} "
            f"{b[1] + eg[1] + v[1]:7.1f} {100 * acc:11.2f}"
        )
    if sk is not None:
        print(
            f"{'sklearn LabelSpreading(knn), no eigensolver':42s} {'':8s} {'':8s} {'':7s} "
            f"{sk['prop_s']:8.2f} {sk['cpu_s']:7.1f} {100 * sk['acc']:11.2f}"
        )
    gap = 100 * (rows[0][4] - rows[1][4])
    print(
        f"ours - exact: {gap:+.2f} points at σ={sigma:g}, eigensolver {rows[1][2][0] / rows[0][2][0]:.1f}x faster"
    )
    print(
        "columns: wall seconds, CPU s = user+system of all threads (graph + eigen + vote); "
        "sklearn: one fit, graph included"
    )
    print(f"load avg after: {os.getloadavg()[0]:.1f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m fewshot_bench.perf propagation ...``."""
    parser = argparse.ArgumentParser(prog="fsbench")
    sub = parser.add_subparsers(dest="command", required=True)
    add_perf_parser(sub)
    args = parser.parse_args(["perf", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
