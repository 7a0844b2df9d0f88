"""``fsbench perf large``: a 1M-10M-node proxy and the streaming IVF-PQ graph + diffusion on it.

The proxy is a Gaussian mixture built to stay meaningful at any ``n`` (unlike tiling a small
dataset, which at 3M fills every kNN list with jittered copies of one image): each class is a
*chain* of ``modes_per_class`` Gaussian sub-modes whose centres follow a smooth random walk, so a
class is a long curved manifold that a few labeled points cannot cover by proximity alone; the
chains wander in a shared 8-d latent ball (turning back at its edge), so the chains of different
classes cross and overlap, and small isotropic noise is added in all ``dim`` dimensions. Every point is a fresh draw (no duplicates),
and more points only make the same distribution denser. The data are generated block-wise
from the seed straight into a memory-mapped ``.npy`` (float16 by default), so ``n x dim``
never sits in RAM; a block's content depends only on ``(seed, block number)``.

The benchmark labels ``--labels-per-class`` random points per class and reports accuracy over all
the others (transductive), the kNN recall of the compressed index on a sample of points (against
exact search), wall and CPU seconds of build and propagation, and the peak RSS of the run's own
process (a spawned child; mapped feature pages it touched count in it).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fewshot_bench.errors import InputDataError

#: Rows per generation block; fixed so that the data never depend on how they were written.
GEN_BLOCK = 1 << 16


@dataclass(frozen=True)
class ProxySpec:
    """The mixture: ``n_classes`` chains of ``modes_per_class`` sub-modes.

    The chains live in a ``latent``-dimensional subspace (so chains of different classes cross),
    embedded in ``dim`` dimensions by a random orthonormal map. ``step``: distance between
    consecutive sub-mode centres; ``turn``: how fast a chain changes direction (0 = straight);
    ``spread``: std of the chains' starting points; ``radius``: the chains turn back at this
    distance from the origin (reflected), so they keep crossing whatever their length; ``noise``: per-dimension std of a point
    around its centre inside the subspace; ``ambient``: per-dimension std of the noise added in
    all ``dim`` dimensions.
    """

    dim: int = 64
    n_classes: int = 10
    modes_per_class: int = 100
    latent: int = 8
    step: float = 1.0
    turn: float = 0.5
    spread: float = 3.0
    radius: float = 6.0
    noise: float = 0.4
    ambient: float = 0.2
    seed: int = 0

    def model(self) -> tuple[np.ndarray, np.ndarray]:
        """Sub-mode centres ``[n_classes, modes_per_class, latent]`` and the ``[latent, dim]`` map."""
        if self.latent > self.dim:
            raise InputDataError(f"latent dimension {self.latent} exceeds --dim {self.dim}")
        rng = np.random.default_rng([self.seed, 0x5EED])
        c, m, r = self.n_classes, self.modes_per_class, self.latent
        out = np.empty((c, m, r))
        pos = rng.standard_normal((c, r)) * self.spread
        u = rng.standard_normal((c, r))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        for j in range(m):
            out[:, j] = pos
            u = u + self.turn * rng.standard_normal((c, r)) / np.sqrt(r)
            u /= np.linalg.norm(u, axis=1, keepdims=True)
            out_of_ball = np.linalg.norm(pos + self.step * u, axis=1) > self.radius
            p_hat = pos / np.maximum(np.linalg.norm(pos, axis=1, keepdims=True), 1e-12)
            radial = np.sum(u * p_hat, axis=1, keepdims=True)
            u = np.where(out_of_ball[:, None], u - 2 * np.maximum(radial, 0) * p_hat, u)
            pos = pos + self.step * u
        q, _ = np.linalg.qr(rng.standard_normal((self.dim, r)))
        return out, np.ascontiguousarray(q.T)


def proxy_block(
    spec: ProxySpec, model: tuple[np.ndarray, np.ndarray], block: int, rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of generation block ``block`` (``rows <= GEN_BLOCK``): features float32, labels int16."""
    centres, embed = model
    # one stream per array, so a row's values do not depend on how many rows the block has
    r = [np.random.default_rng([spec.seed, 1, block, j]) for j in range(4)]
    y = r[0].integers(0, spec.n_classes, rows)
    mode = r[1].integers(0, spec.modes_per_class, rows)
    z = centres[y, mode] + r[2].standard_normal((rows, spec.latent)) * spec.noise
    x = (z @ embed).astype(np.float32)
    x += r[3].standard_normal((rows, spec.dim), dtype=np.float32) * np.float32(spec.ambient)
    return x, y.astype(np.int16)


def generate_proxy(
    directory: Path | str,
    n: int,
    spec: ProxySpec,
    *,
    dtype: str = "float16",
    progress: bool = False,
) -> tuple[Path, Path]:
    """Write ``x.npy`` (``[n, dim]``, memory-mapped, ``dtype``) and ``y.npy`` (int16) into ``directory``."""
    if n < 1:
        raise InputDataError(f"--n must be >= 1, got {n}")
    if dtype not in ("float16", "float32"):
        raise InputDataError(f"dtype must be float16 or float32, not {dtype!r}")
    from tqdm import tqdm

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    xp, yp = d / "x.npy", d / "y.npy"
    x = np.lib.format.open_memmap(xp, mode="w+", dtype=dtype, shape=(n, spec.dim))
    y = np.lib.format.open_memmap(yp, mode="w+", dtype=np.int16, shape=(n,))
    model = spec.model()
    n_blocks = -(-n // GEN_BLOCK)
    for b in tqdm(
        range(n_blocks), desc="proxy", unit="block", disable=not progress, file=sys.stderr
    ):
        s = b * GEN_BLOCK
        rows = min(GEN_BLOCK, n - s)
        xb, yb = proxy_block(spec, model, b, rows)
        x[s : s + rows] = xb
        y[s : s + rows] = yb
    x.flush()
    y.flush()
    del x, y
    return xp, yp


# ------------------------------------------------------------------------------------ benchmark
def add_large_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``perf large`` to the ``perf`` sub-parser set."""
    p = subparsers.add_parser(
        "large",
        help="streaming IVF-PQ kNN graph + diffusion on a 1M-10M-point proxy (memory-mapped)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, default=1_000_000, help="number of points (default 1000000)")
    p.add_argument("--dim", type=int, default=64, help="feature dimension (default 64)")
    p.add_argument("--k", type=int, default=30, help="neighbours per node (default 30)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~1.3 sqrt(n))")
    p.add_argument("--nprobe", type=int, default=8, help="IVF lists probed (default 8)")
    p.add_argument("--pq-m", type=int, default=None, help="4-bit PQ sub-quantisers (default dim/2)")
    p.add_argument("--opq", action="store_true", help="learn an OPQ rotation before IVF-PQ")
    p.add_argument(
        "--rerank", type=int, default=2, help="exact re-rank of rerank*(k+1) candidates (0 = off)"
    )
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--classes", type=int, default=10, help="proxy classes (default 10)")
    p.add_argument("--modes", type=int, default=100, help="sub-modes per class (default 100)")
    p.add_argument("--labels-per-class", type=int, default=10, help="labeled points per class")
    p.add_argument("--n-iter", default="auto", help="diffusion iterations or 'auto' (validation)")
    p.add_argument("--norm", choices=("col", "row", "sinkhorn", "none"), default="col")
    p.add_argument(
        "--recall-sample", type=int, default=1000, help="points whose lists are checked exactly"
    )
    p.add_argument(
        "--workdir", default=None, help="folder for x.npy/y.npy and the graph (default: a temp dir)"
    )
    p.add_argument("--features", default=None, help="use this [n, dim] .npy instead of the proxy")
    p.add_argument("--labels", default=None, help="int labels .npy matching --features")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=main_large)
    return p


def _load_labels(path: str, n: int) -> np.ndarray:
    y = np.load(path, mmap_mode="r", allow_pickle=False)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (n and int(y.min()) < 0):
        raise InputDataError(
            f"labels {path} must be non-negative integers of shape ({n},), got {y.dtype} {y.shape}"
        )
    return np.asarray(y, dtype=np.int64)


def _run_large(xp: str, seeds: np.ndarray, cfg: dict[str, Any]) -> dict[str, Any]:
    """Build + diffuse in this (spawned) process; timings, peak RSS, accuracy, recall."""
    from fewshot_bench.graph.large import (
        LargeKnnParams,
        build_large_knn,
        diffuse_large,
        exact_knn_sample,
        knn_operator,
        open_features,
        recall_at_k,
    )
    from fewshot_bench.perf import _cpu_s, _peak_mb, _rss_mb

    y = np.load(cfg["labels"], mmap_mode="r")
    base_mb = _rss_mb()
    params = LargeKnnParams(
        k=cfg["k"],
        nlist=cfg["nlist"],
        nprobe=cfg["nprobe"],
        pq_m=cfg["pq_m"],
        opq=cfg["opq"],
        rerank=cfg["rerank"],
        seed=cfg["seed"],
    )
    c0, t0 = _cpu_s(), time.perf_counter()
    g = build_large_knn(xp, params, out_dir=cfg["graph_dir"], progress=cfg["progress"])
    c1, t1 = _cpu_s(), time.perf_counter()
    build_peak = _peak_mb()
    op = knn_operator(np.asarray(g.indices), order=g.order)
    n_classes = int(y.max()) + 1
    pred, n_iter = diffuse_large(
        op,
        seeds,
        np.asarray(y[seeds], dtype=np.int64),
        n_classes,
        n_iter=cfg["n_iter"],
        norm=cfg["norm"],
        seed=cfg["seed"],
    )
    c2, t2 = _cpu_s(), time.perf_counter()
    peak = _peak_mb()
    op_mb = op.nbytes / 2**20
    del op
    mask = np.ones(len(pred), bool)
    mask[seeds] = False
    acc = float((pred[mask] == np.asarray(y)[mask]).mean())
    recall = float("nan")
    if cfg["recall_sample"] > 0:
        rng = np.random.default_rng([cfg["seed"], 3])
        q = rng.choice(len(pred), min(cfg["recall_sample"], len(pred)), replace=False)
        exact = exact_knn_sample(open_features(xp), q, cfg["k"])
        recall = recall_at_k(np.asarray(g.indices[q]), exact)
    return {
        "index": g.index_desc,
        "timings": g.timings,
        "build_s": t1 - t0,
        "build_cpu": c1 - c0,
        "prop_s": t2 - t1,
        "prop_cpu": c2 - c1,
        "build_peak_mb": build_peak,
        "peak_mb": peak,
        "base_mb": base_mb,
        "op_mb": op_mb,
        "graph_mb": (g.indices.nbytes + g.sims.nbytes) / 2**20,
        "acc": acc,
        "n_iter": n_iter,
        "recall": recall,
        "n_classes": n_classes,
    }


def _child(xp: str, seeds: np.ndarray, cfg: dict[str, Any], q: Any) -> None:
    try:
        q.put(("ok", _run_large(xp, seeds, cfg)))
    except BaseException as e:  # report, never hang the parent
        q.put(("error", f"{type(e).__name__}: {e}"))


def main_large(args: argparse.Namespace) -> int:
    """Generate (or open) the data, run the build + diffusion in a spawned process, print figures."""
    from fewshot_bench.graph.large import open_features
    from fewshot_bench.perf import pick_seeds

    if args.n < 2 or args.k < 1:
        raise InputDataError("--n must be >= 2 and --k >= 1")
    if (args.features is None) != (args.labels is None):
        raise InputDataError("--features and --labels go together; pass both or neither")
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fsbench-large-")
        work = Path(tmp.name)
    else:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        if args.features is not None:
            xp, yp = Path(args.features), Path(args.labels)
            x = open_features(xp)
            _load_labels(str(yp), x.shape[0])
            desc = f"features {xp} {x.shape} {x.dtype}"
            n, dim = x.shape
            del x
        else:
            spec = ProxySpec(
                dim=args.dim,
                n_classes=args.classes,
                modes_per_class=args.modes,
                seed=args.seed,
            )
            xp, yp = generate_proxy(work, args.n, spec, dtype=args.dtype, progress=not args.quiet)
            n, dim = args.n, args.dim
            desc = (
                f"proxy: {args.classes} classes x {args.modes} chained sub-modes (latent "
                f"{spec.latent}-d, embedded in {dim}-d), n={n}, {args.dtype} memory-mapped"
            )
        gen_s = time.perf_counter() - t0
        y = _load_labels(str(yp), n)
        seeds = pick_seeds(y, args.labels_per_class, np.random.default_rng(args.seed + 1))
        del y
        print(
            f"data: {desc} ({gen_s:.1f} s to prepare, {os.path.getsize(xp) / 2**20:.0f} MB on disk)"
        )
        print(
            f"task: {len(seeds)} labeled ({args.labels_per_class}/class), accuracy over the other "
            f"{n - len(seeds)} points; n={n} dim={dim} k={args.k}; "
            f"cores={len(os.sched_getaffinity(0))}; OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; load avg={os.getloadavg()[0]:.2f}"
        )
        sys.stdout.flush()
        n_iter: int | str = args.n_iter if args.n_iter == "auto" else int(args.n_iter)
        cfg = {
            "k": args.k,
            "nlist": args.nlist,
            "nprobe": args.nprobe,
            "pq_m": args.pq_m,
            "opq": args.opq,
            "rerank": args.rerank,
            "seed": args.seed,
            "graph_dir": str(work / "graph"),
            "progress": not args.quiet,
            "labels": str(yp),
            "n_iter": n_iter,
            "norm": args.norm,
            "recall_sample": args.recall_sample,
        }
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        proc = ctx.Process(target=_child, args=(str(xp), seeds, cfg, q))
        proc.start()
        status, r = q.get()
        proc.join()
        if status != "ok":
            raise RuntimeError(f"large-scale run failed: {r}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    t = r["timings"]
    print(f"index: {r['index']}")
    print(
        f"build (kNN graph):  wall {r['build_s']:.1f} s, CPU {r['build_cpu']:.1f} s "
        f"(train {t['train_s']:.1f} s, add {t['add_s']:.1f} s, search+rerank {t['search_s']:.1f} s)"
    )
    print(
        f"propagate:          wall {r['prop_s']:.1f} s, CPU {r['prop_cpu']:.1f} s "
        f"(diffusion, norm={args.norm}, n_iter={r['n_iter']}{' chosen on held-out seeds' if n_iter == 'auto' else ''})"
    )
    print(
        f"peak RSS:           {r['peak_mb']:.0f} MB (after build {r['build_peak_mb']:.0f} MB; "
        f"{r['base_mb']:.0f} MB at start; kNN lists {r['graph_mb']:.0f} MB, "
        f"diffusion operator {r['op_mb']:.0f} MB)"
    )
    print(
        f"accuracy:           {100 * r['acc']:.2f}% with {len(seeds)} seeds "
        f"(chance {100 / r['n_classes']:.1f}%)"
    )
    if r["recall"] == r["recall"]:
        print(
            f"recall@{args.k}:          {r['recall']:.4f} on {args.recall_sample} points vs exact search"
        )
    print(f"load avg after:     {os.getloadavg()[0]:.2f}")
    sys.stdout.flush()
    return 0
