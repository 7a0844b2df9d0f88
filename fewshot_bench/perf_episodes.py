"""``fsbench perf episodes``: how many small episodes per second the whole runner delivers.

Writes an Omniglot N-way K-shot protocol with ``--tasks`` episodes into a scratch folder and
runs it end to end (manifest, assembly in the runner, the method in its worker process, scoring,
store), once per method, on features of ``--backbone`` (the Conv-4 checkpoint shipped in
``checkpoints/`` when present, else pixels). Features are computed and cached before the clock
starts. Prints wall seconds, the CPU seconds of the runner and of its worker, episodes per second
and the load average, since these machines are shared.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "conv4-ce-omniglot-bg.pt"


def add_episodes_parser(sub: Any) -> None:
    """Register ``perf episodes`` on the ``perf`` sub-parser set."""
    p = sub.add_parser(
        "episodes",
        help="episodes per second through the runner (Omniglot, cached features)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tasks", type=int, default=10_000, help="episodes (default 10000)")
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--queries", type=int, default=15, help="queries per class (default 15)")
    p.add_argument(
        "-m",
        "--method",
        action="append",
        default=None,
        help="method spec (repeat; default nearest-prototype and diffusion)",
    )
    p.add_argument("--backbone", default=None, help="default: the shipped Conv-4, else pixels")
    p.add_argument("--data-root", default=None, help="folder holding omniglot/")
    p.set_defaults(func=main_episodes)


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def write_protocol(folder: Path, args: argparse.Namespace, backbone: str) -> Path:
    """A throughput protocol TOML in ``folder``."""
    path = folder / "throughput.toml"
    path.write_text(
        f'name = "omniglot-{args.way}w{args.shot}s-throughput"\n'
        'description = "fsbench perf episodes"\n\n'
        '[dataset]\nname = "omniglot"\nsplits = ["test"]\nimage_size = 28\n\n'
        f"[episodes]\nn_way = {args.way}\nk_shot = {args.shot}\nn_query = {args.queries}\n"
        f"n_tasks = {args.tasks}\n\n"
        f'[run]\nseeds = [0]\nbackbone = "{backbone}"\n'
    )
    return path


def main_episodes(args: argparse.Namespace) -> int:
    from fewshot_bench.methods.params import parse_method_spec
    from fewshot_bench.run.executor import MethodSpec, ProcessExecutor
    from fewshot_bench.run.runner import run_protocol
    from fewshot_bench.run.store import ResultsStore
    from fewshot_bench.tasks.manifest import load_task_sets
    from fewshot_bench.tasks.protocol import load_pool, load_protocol_file

    backbone = args.backbone or (
        f"checkpoint:{REPO_CHECKPOINT}" if REPO_CHECKPOINT.is_file() else "pixels"
    )
    methods = args.method or ["nearest-prototype", "diffusion"]

    with tempfile.TemporaryDirectory(prefix="fsbench-perf-episodes-") as tmp:
        work = Path(tmp)
        proto = load_protocol_file(write_protocol(work, args, backbone))[0]
        pool = load_pool(proto, args.data_root)
        load_task_sets(proto, pool, work, None, progress=False)  # the manifest, before the clock
        print(
            f"{proto.name}: {args.tasks} episodes, backbone {backbone}, "
            f"cores {len(os.sched_getaffinity(0))}, load avg {os.getloadavg()[0]:.2f}"
        )
        print(
            f"{'method':28s} {'wall s':>8s} {'runner CPU s':>13s} {'worker CPU s':>13s} "
            f"{'episodes/s':>11s} {'mean acc':>9s}"
        )
        for i, spec in enumerate(methods):
            name, params = parse_method_spec(spec)
            executor = ProcessExecutor()
            try:
                with ResultsStore(work / f"results-{i}.sqlite") as store:
                    # features into the cache, outside the clock: one task of the method
                    run_protocol(
                        proto,
                        [MethodSpec(name, params)],
                        store,
                        workdir=work,
                        pool=pool,
                        max_tasks=1,
                        progress=False,
                        executor=executor,
                        root=args.data_root,
                    )
                    w0, c0, k0 = time.perf_counter(), _self_cpu_s(), _proc_cpu_s(executor.proc.pid)
                    summaries = run_protocol(
                        proto,
                        [MethodSpec(name, params)],
                        store,
                        workdir=work,
                        pool=pool,
                        progress=False,
                        executor=executor,
                        root=args.data_root,
                    )
                    wall = time.perf_counter() - w0
                    runner_cpu = _self_cpu_s() - c0
                    worker_cpu = _proc_cpu_s(executor.proc.pid) - k0
            finally:
                executor.close()
            ran = sum(s.ran for s in summaries)
            acc = sum(sum(s.accuracies) for s in summaries) / max(ran, 1)
            print(
                f"{spec:28s} {wall:8.2f} {runner_cpu:13.2f} {worker_cpu:13.2f} "
                f"{ran / wall:11.0f} {100 * acc:8.2f}%"
            )
        print(f"load avg at the end {os.getloadavg()[0]:.2f}")
    return 0
