"""``fsbench perf executors``: the same sweep of feature methods run serially, in local worker
processes and on a local Ray instance, with wall time, CPU time and the machine's load.

The tasks: Omniglot's evaluation alphabets, 5-way 1-shot semi-supervised episodes (5 queries
and 5 unlabeled items per class, 5 distractor classes), ``--tasks`` of them, pixels as features.
Every executor runs every method on every task into its own results store (the manifest is
materialised once, before timing), and the stores are compared row by row with the serial one.

Wall time is the run alone (``run s``); starting the executor (worker processes importing
torch, Ray starting its daemons and actors) is ``start s``. ``CPU s`` adds the driver's CPU
time and its workers' (worker processes or Ray actors, start-up included); Ray's own daemons
(raylet, GCS) are not counted. ``load`` is ``os.getloadavg()`` (1, 5, 15 min) before each run:
the machine's other work competes for the same cores, so rerun on a quiet machine to compare.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_METHODS = ("logistic-regression", "diffusion", "spectral-propagation", "nn-propagation")


def add_executors_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "executors",
        help="serial vs --executor processes vs ray on a sweep of feature methods (wall, CPU, load)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tasks", type=int, default=2000, help="episodes per method (default 2000)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help=f"feature methods (default: {' '.join(DEFAULT_METHODS)})",
    )
    p.add_argument(
        "--executors",
        nargs="+",
        choices=("serial", "processes", "ray"),
        default=["serial", "processes", "ray"],
        help="which executors to time (default: all three; ray is skipped when not installed)",
    )
    p.add_argument("--jobs", type=int, default=2, help="workers for processes and ray (default 2)")
    p.add_argument("--batch-size", type=int, default=64, help="tasks per chunk (default 64)")
    p.add_argument("--data-root", default=None, help="folder holding omniglot/ (as for `run`)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where manifests and the stores go (default: a temporary folder, removed after)",
    )
    p.set_defaults(func=main_executors)
    return p


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc (0 where unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _start(kind: str, jobs: int) -> tuple[Any, Any]:
    """The executor, and a function returning its workers' CPU seconds."""
    from fewshot_bench.run.executor import ParallelExecutor, ProcessExecutor

    if kind == "serial":
        ex = ProcessExecutor()
        return ex, lambda: _proc_cpu(ex.proc.pid)
    if kind == "processes":
        ex = ParallelExecutor(jobs=jobs)
        return ex, lambda: sum(_proc_cpu(lane.executor.proc.pid) for lane in ex.lanes)
    from fewshot_bench.run.ray_executor import RayExecutor

    ex = RayExecutor(jobs=jobs, verbose=False)
    return ex, ex.worker_cpu_seconds


def bench(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    from fewshot_bench.run.executor import MethodSpec
    from fewshot_bench.run.fixtures import comparable_rows, write_episodic_protocol
    from fewshot_bench.run.runner import run_protocol
    from fewshot_bench.run.store import ResultsStore, load_results
    from fewshot_bench.tasks.manifest import load_task_sets
    from fewshot_bench.tasks.protocol import load_pool, load_protocol_file

    proto_file = write_episodic_protocol(
        workdir,
        "perf-executors",
        description="Omniglot evaluation alphabets, 5-way 1-shot, 5 unlabeled/class, 5 distractors",
        n_unlabeled=5,
        n_distractor=5,
        labeled_fraction=0.4,
        n_tasks=args.tasks,
    )
    proto = load_protocol_file(proto_file)[0]
    pool = load_pool(proto, args.data_root)
    load_task_sets(proto, pool, workdir, None)  # materialised once, outside the timings
    specs = [MethodSpec(m) for m in args.methods]
    results = []
    for kind in args.executors:
        if kind == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                print("ray: not installed (pip install -e '.[ray]'), skipped", file=sys.stderr)
                continue
        load = os.getloadavg()
        cpu0, t0 = _self_cpu(), time.perf_counter()
        executor, worker_cpu = _start(kind, args.jobs)
        t1 = time.perf_counter()
        store_path = workdir / f"results-{kind}.sqlite"
        try:
            with ResultsStore(store_path) as store:
                run_protocol(
                    proto,
                    specs,
                    store,
                    workdir=workdir,
                    pool=pool,
                    device="cpu",
                    batch_size=args.batch_size,
                    progress=False,
                    executor=executor,
                )
            t2 = time.perf_counter()
            cpu = _self_cpu() - cpu0 + worker_cpu()
        finally:
            executor.close()
        df = comparable_rows(load_results(store_path))
        results.append(
            {
                "executor": kind if kind == "serial" else f"{kind} x{args.jobs}",
                "kind": kind,
                "start_s": t1 - t0,
                "run_s": t2 - t1,
                "cpu_s": cpu,
                "load": load,
                "load_after": os.getloadavg(),
                "rows": df,
            }
        )
        print(f"{kind}: {t2 - t1:.1f} s", file=sys.stderr, flush=True)
    return results


def main_executors(args: argparse.Namespace) -> int:
    from fewshot_bench.errors import FsbenchError
    from fewshot_bench.run.provenance import hardware

    if args.tasks < 1 or args.jobs < 1 or args.batch_size < 1:
        raise FsbenchError("--tasks, --jobs and --batch-size must be >= 1")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = bench(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="fsbench-perf-") as tmp:
            results = bench(args, Path(tmp))
    if not results:
        return 1
    base = next((r for r in results if r["kind"] == "serial"), None)
    n = args.tasks * len(args.methods)
    print(
        f"{len(args.methods)} feature methods ({', '.join(args.methods)}) x {args.tasks} tasks = "
        f"{n} tasks, batch {args.batch_size}; {hardware('cpu')}"
    )
    print()
    print(
        "| executor | run s | start s | tasks/s | speed-up | CPU s | load before (1/5/15 min) | rows = serial |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for r in results:
        speed = f"{base['run_s'] / r['run_s']:.2f}x" if base else "-"
        same = (
            "-"
            if base is None or r is base
            else ("yes" if base["rows"].equals(r["rows"]) else "NO")
        )
        load = "/".join(f"{x:.2f}" for x in r["load"])
        print(
            f"| {r['executor']} | {r['run_s']:.1f} | {r['start_s']:.1f} | {n / r['run_s']:.0f} | "
            f"{speed} | {r['cpu_s']:.1f} | {load} | {same} |"
        )
    print()
    print(f"load average after: {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0
