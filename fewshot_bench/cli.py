"""The ``fsbench`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fewshot_bench.errors import FsbenchError

DEFAULT_WORKDIR = Path("runs")


def _add_common(p: argparse.ArgumentParser, *, data: bool = True) -> None:
    if data:
        p.add_argument(
            "--data-root",
            default=None,
            help="folder holding the datasets (default: $FSBENCH_DATA or ~/.cache/fewshot-bench/data)",
        )
        p.add_argument(
            "--download",
            action="store_true",
            help="download missing datasets (checksum-verified) into the data root",
        )
    p.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="where manifests and the results store live (default: ./runs)",
    )


def _add_plugin(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="import methods from a module or a .py file (in the method worker) before running; "
        "repeat for several",
    )


def _add_method_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method-config",
        action="append",
        default=[],
        metavar="FILE",
        help='TOML file of [[method]] tables (name = "..." and parameters), e.g. one written '
        "by `fsbench tune`; repeat for several",
    )


def _add_method_args(p: argparse.ArgumentParser, method_help: str) -> None:
    """-m / --method-config plus the options that decide what a method runs on."""
    p.add_argument("--method", "-m", action="append", help=method_help)
    _add_method_config(p)
    p.add_argument("--backbone", default=None, help="as for `run`")
    p.add_argument("--budget", type=int, default=None, help="as for `run`")
    p.add_argument("--device", default="auto", help="as for `run`")


def _add_executor(p: argparse.ArgumentParser, default: str | None = "serial") -> None:
    from fewshot_bench.choices import EXECUTORS

    p.add_argument(
        "--executor",
        choices=EXECUTORS,
        default=default,
        help="where methods run: serial (one worker process, the default), processes (--jobs "
        "local worker processes) or ray (Ray actors; pip install -e '.[ray]')",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="processes: worker processes (default: one per core); ray: workers per method "
        "(default: as many as the cluster's CPUs/GPUs allow)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="ray: the cluster to join, auto or HOST:PORT of the head node (default: start a "
        "local Ray instance)",
    )


def parse_method_spec(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value,...`` (see :func:`fewshot_bench.methods.params.parse_method_spec`)."""
    from fewshot_bench.methods.params import parse_method_spec as parse

    return parse(spec)


def cmd_datasets(args: argparse.Namespace) -> int:
    from fewshot_bench.data import available_datasets

    for name, info in available_datasets().items():
        print(f"{name:16s} splits: {', '.join(info.splits):32s} {info.description}")
    return 0


def _downloadable() -> list[str]:
    """Names of the datasets whose files `fsbench download` can fetch."""
    from fewshot_bench.data import available_datasets

    return [n for n, info in available_datasets().items() if info.downloader is not None]


def cmd_download(args: argparse.Namespace) -> int:
    import difflib

    from fewshot_bench.data import data_root, download_dataset
    from fewshot_bench.data.registry import get_info
    from fewshot_bench.errors import ProtocolError

    names = _downloadable()
    infos = []
    for name in args.dataset:  # every name is checked before anything is fetched
        try:
            info = get_info(name)
        except ProtocolError:
            close = difflib.get_close_matches(name.lower(), names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise FsbenchError(
                f"unknown dataset {name!r}; {hint}downloadable datasets: {', '.join(names)}"
            ) from None
        if info.downloader is None:
            raise FsbenchError(
                f"{info.name} has nothing to download ({info.how_to_get}); downloadable "
                f"datasets: {', '.join(names)}"
            )
        infos.append(info)
    _output_folder("--data-root" if args.data_root else "data root", data_root(args.data_root))
    for info in dict.fromkeys(infos):
        try:
            root = download_dataset(info.name, args.data_root)
        except OSError as exc:
            raise _cannot_write("--data-root folder", exc) from None
        print(f"{info.name}: ready under {root}")
    return 0


def cmd_protocols(args: argparse.Namespace) -> int:
    from fewshot_bench.tasks.protocol import all_protocols

    protos = all_protocols()
    width = max((len(n) for n in protos), default=10)
    for name, proto in protos.items():
        print(f"{name:{width}s}  {proto.kind:8s}  {proto.summary()}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from fewshot_bench.methods import available_methods
    from fewshot_bench.methods.params import describe_schema
    from fewshot_bench.run.worker import load_plugin

    for ref in args.plugin:
        load_plugin(ref)
    methods = available_methods()
    if args.name is None:
        for name, cls in methods.items():
            print(
                f"{name:24s} {cls.consumes:8s} {cls.setting:15s} {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}"
            )
        print("\n`fsbench methods NAME` shows a method's parameters.")
        return 0
    if args.name not in methods:
        raise FsbenchError(f"unknown method {args.name!r}; available: {', '.join(methods)}")
    cls = methods[args.name]
    print(f"{args.name}: consumes {cls.consumes}, setting {cls.setting}")
    if cls.__doc__:
        print("  " + " ".join(cls.__doc__.strip().split("\n\n")[0].split()))
    print("parameters (-m NAME:key=value,... or [[method]] tables in --method-config FILE):")
    print("\n".join(describe_schema(cls.schema)))
    return 0


def cmd_episodes(args: argparse.Namespace) -> int:
    import numpy as np

    from fewshot_bench.tasks.external import export_episodes, import_task_set
    from fewshot_bench.tasks.manifest import imported_manifest_path, load_task_sets
    from fewshot_bench.tasks.protocol import load_pool, resolve_protocols
    from fewshot_bench.tasks.task import task_truth

    _at_least("--show", args.show, 0)
    for seed in args.seeds or []:
        _at_least("--seeds", seed, 0)
    if args.import_file and not Path(args.import_file).is_file():
        raise FsbenchError(
            f"--import {args.import_file}: no such file; give the path of a JSON Lines "
            "episodes file"
        )
    protos = resolve_protocols(args.protocol)
    exports: dict[Path, list[str]] = {}  # every --export file, checked before any work
    for proto in protos if args.export else []:
        imported = args.import_file or imported_manifest_path(args.workdir, proto).exists()
        for seed in [0] if imported else args.seeds or proto.run["seeds"]:
            out = _output_file("--export", _export_path(args.export, proto.name, seed))
            exports.setdefault(out, []).append(f"{proto.name} seed {seed}")
    for out, sets in exports.items():
        if len(sets) > 1:
            print(
                f"fsbench: note: --export {out} is written for {len(sets)} task sets in turn, "
                f"so it ends up holding only the last ({sets[-1]}); put {{protocol}} and "
                "{seed} in the name to keep each, e.g. {protocol}-{seed}.jsonl",
                file=sys.stderr,
            )
    for proto in protos:
        pool = load_pool(proto, args.data_root, download=args.download)
        if args.import_file:
            path = import_task_set(args.import_file, proto, pool, args.workdir, force=args.force)
            print(f"{proto.name}: imported {args.import_file} -> {path}")
        for seed, manifest in load_task_sets(proto, pool, args.workdir, args.seeds).items():
            h = manifest.header
            first = manifest.task(0)
            if manifest.imported:
                print(f"{proto.name}: {h['n_tasks']} imported tasks ({h['source']})")
                print(f"  from the file: n_way {h['n_way']}, queries per task {h['n_query']}")
            else:
                print(f"{proto.name} seed {seed}: {h['n_tasks']} tasks")
                print(f"  {proto.summary()}")
            print(
                f"  pool {h['pool_size']} items, dataset fingerprint {h['dataset_fingerprint'][:16]}, "
                f"protocol hash {h['protocol_hash']}, manifest hash {manifest.content_hash[:16]}"
            )
            sizes = (len(first.support), len(first.unlabeled), len(first.query))
            n_dis = int(task_truth(first, pool.data.labels).distractor_mask.sum())
            print(
                f"  task 0: {first.n_way}-way, support/unlabeled/query = {sizes}, distractor items {n_dis}"
            )
            for notes in pool.data.meta.get("notes", []):
                print(f"  note: {notes}")
            for i in range(min(args.show, manifest.n_tasks)):
                t = manifest.task(i)
                names = [pool.data.class_names[c] for c in t.classes[:8]]
                print(
                    f"  task {i}: classes {names}{' ...' if t.n_way > 8 else ''} "
                    f"support[:5]={np.asarray(t.support[:5]).tolist()}"
                )
            if args.export:
                out = _output_file("--export", _export_path(args.export, proto.name, seed))
                try:
                    export_episodes(manifest, out, pool, item_ids=args.item_ids)
                except OSError as exc:
                    raise _cannot_write("--export file", exc) from None
                print(f"  exported to {out}")
    return 0


def _export_path(template: str, protocol: str, seed: int) -> Path:
    """The ``--export`` file of one task set: ``template`` with {protocol} and {seed} filled in."""
    try:
        return Path(str(template).format(protocol=protocol, seed=seed))
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise FsbenchError(
            f"--export {template}: cannot fill in the name ({type(exc).__name__}: {exc}); only "
            "{protocol} and {seed} expand (write {{ and }} for literal braces)"
        ) from None


def _method_specs(args: argparse.Namespace) -> list:
    from fewshot_bench.methods.params import load_method_config
    from fewshot_bench.run.executor import MethodSpec

    specs = [MethodSpec(*parse_method_spec(spec)) for spec in args.method or []]
    for path in getattr(args, "method_config", None) or []:
        specs += [MethodSpec(n, p, tuning=t) for n, p, t in load_method_config(path)]
    if not specs:
        raise FsbenchError(
            "name at least one method: -m NAME[:key=value,...] or --method-config FILE"
        )
    return specs


def cmd_run(args: argparse.Namespace) -> int:
    from fewshot_bench.run.executor import make_executor
    from fewshot_bench.run.runner import check_counts, resolve_device

    device = resolve_device(args.device)
    if args.seeds is not None and any(s < 0 for s in args.seeds):
        raise FsbenchError(f"--seeds must be integers >= 0, got {args.seeds}")
    check_counts(args.batch_size, args.max_tasks)  # before anything is created on disk
    _at_least("--jobs", args.jobs, 1)
    _at_least("--budget", args.budget, 0)
    if args.save_state is not None:  # checked now, not after the training it would keep
        _output_file("--save-state", args.save_state)
    specs = _method_specs(args)
    # serial: the shared worker process; processes / ray: closed when the run ends
    executor = make_executor(
        args.executor, tuple(args.plugin), jobs=args.jobs, address=args.address, device=device
    )
    if getattr(executor, "sandbox", "") is None:
        print(
            "fsbench: note: the method worker runs unconfined (no Landlock on this kernel, or "
            "FSBENCH_SANDBOX=0): a method could write into the workdir and caches",
            file=sys.stderr,
        )
    try:
        return _run_on(args, specs, executor, device)
    finally:
        if args.executor != "serial":
            executor.close()


def _run_on(args: argparse.Namespace, specs: list, executor, device) -> int:
    from fewshot_bench.run.runner import run_protocol
    from fewshot_bench.run.store import ResultsStore
    from fewshot_bench.tasks.protocol import load_pool, resolve_protocols

    for spec in specs:  # unknown methods and bad parameters fail before anything runs
        executor.describe(spec)
    protos = resolve_protocols(args.protocol)
    store_path = args.workdir / "results.sqlite"
    with ResultsStore(store_path) as store:
        pool, pool_key = None, None
        for proto in protos:
            # everything load_pool reads: the dataset table (options too) and a background pool
            key = json.dumps([proto.dataset, proto.params.get("background")], sort_keys=True)
            if key != pool_key:
                pool, pool_key = load_pool(proto, args.data_root, download=args.download), key
            summaries = run_protocol(
                proto,
                specs,
                store,
                seeds=args.seeds,
                workdir=args.workdir,
                root=args.data_root,
                device=device,
                backbone=args.backbone,
                max_tasks=args.max_tasks,
                batch_size=args.batch_size,
                budget=args.budget,
                pool=pool,
                progress=not args.quiet,
                save_state=args.save_state,
                executor=executor,
            )
            for s in summaries:
                done = f"{s.ran} run, {s.skipped} already stored"
                mean = f"{100 * s.mean:.2f}%" if s.accuracies else "-"
                print(
                    f"{s.protocol:28s} {s.method:24s} seed {s.seed}: mean acc of new tasks {mean} ({done})"
                )
    print(f"results: {store_path}  (see `fsbench report --workdir {args.workdir}`)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from fewshot_bench.run.sweep import load_sweep, run_sweep, sweep_status

    _at_least("--jobs", args.jobs, 1)
    overrides = {"workdir": args.workdir, "data_root": args.data_root}
    if args.status:
        if args.executor or args.jobs or args.address:
            raise FsbenchError("--status reads the store only; drop --executor/--jobs/--address")
        sweep_status(load_sweep(args.sweep, **overrides))
        return 0
    overrides.update(executor=args.executor, jobs=args.jobs, address=args.address)
    sweep = load_sweep(args.sweep, **overrides)
    cells = run_sweep(sweep, progress=not args.quiet)
    print(f"results: {sweep.store_path}  (progress: `fsbench sweep --status {args.sweep}`)")
    return 0 if all(c.done >= c.total for c in cells) else 1


def cmd_audit(args: argparse.Namespace) -> int:
    from fewshot_bench.run.audit import audit_method
    from fewshot_bench.run.executor import shared_executor
    from fewshot_bench.tasks.protocol import resolve_protocols

    if args.tasks < 1:
        raise FsbenchError(f"--tasks must be >= 1, got {args.tasks}")
    _at_least("--budget", args.budget, 0)
    _at_least("--seed", args.seed, 0)
    executor = shared_executor(tuple(args.plugin))
    flagged = False
    for proto in resolve_protocols(args.protocol):
        for spec in _method_specs(args):
            result = audit_method(
                proto,
                spec,
                workdir=args.workdir,
                root=args.data_root,
                device=args.device,
                backbone=args.backbone,
                budget=args.budget,
                seed=args.seed,
                n_tasks=args.tasks,
                executor=executor,
            )
            print("\n".join(result.lines()))
            flagged |= not result.ok
    return 1 if flagged else 0


def cmd_tune(args: argparse.Namespace) -> int:
    from fewshot_bench.run.executor import shared_executor
    from fewshot_bench.run.tune import parse_grid, tune, write_tuned
    from fewshot_bench.runtime import resolve_device
    from fewshot_bench.tasks.protocol import resolve_protocols

    grid = parse_grid(args.grid)
    _at_least("--budget", args.budget, 0)
    specs = _method_specs(args)
    protos = resolve_protocols(args.protocol)
    if len(specs) != 1 or len(protos) != 1:
        raise FsbenchError("fsbench tune takes one protocol and one method (-m NAME[:fixed=...])")
    out = args.out or Path(f"{protos[0].name}.{specs[0].name}.tuned.toml")
    if not out.parent.is_dir():
        raise FsbenchError(f"--out {out}: folder {out.parent} does not exist; create it first")
    executor = shared_executor(tuple(args.plugin))
    result = tune(
        protos[0],
        specs[0],
        grid,
        executor=executor,
        workdir=args.workdir,
        split=args.split,
        n_tasks=args.tasks,
        root=args.data_root,
        backbone=args.backbone,
        device=resolve_device(args.device),
        budget=args.budget,
        progress=not args.quiet,
    )
    print(f"{result.record['validation']}: {args.tasks} episodes of split {result.record['split']}")
    for i, (point, mean, half) in enumerate(
        zip(result.points, result.means, result.half_widths, strict=True)
    ):
        mark = "  <- chosen" if i == result.best else ""
        shown = ", ".join(f"{k}={v}" for k, v in point.items())
        print(f"  {shown:40s} {100 * mean:6.2f} ± {100 * half:.2f}{mark}")
    write_tuned(out, specs[0], result)
    print(f"wrote {out}; run it with: fsbench run {args.protocol} --method-config {out}")
    return 0


def _known_families(df) -> dict[str, str]:
    """Protocol name → family, from the results store's rows (its ``family`` column)."""
    from fewshot_bench.report import families

    return dict(zip(df["protocol"], families(df), strict=True))


def _stored_results(store: Path, names: list[str] | None):
    """The store's rows for these protocol or family names (every row without names), read-only:
    a missing, empty or foreign file is an error, never a new store, and so is a selection
    without rows (the error lists the protocols and families the store holds)."""
    from fewshot_bench.run.store import load_results

    df = load_results(store, list(names or []) or None)
    if df.empty:
        if not names:
            raise FsbenchError(f"no results in {store}; run something first")
        known = _known_families(load_results(store))
        raise FsbenchError(
            f"no results for {', '.join(names)} in {store} (as protocol or family names); "
            f"protocols with results: {sorted(known) or 'none'}, "
            f"families: {sorted(set(known.values())) or 'none'}"
        )
    return df


def _merged_results(stores: list[Path], names: list[str] | None):
    """The rows of several stores for these names (see :func:`_stored_results`); a protocol found
    in two stores is an error, since its tasks would count twice."""
    import pandas as pd

    from fewshot_bench.run.store import load_results

    frames, owner = [], {}
    for store in stores:
        df = load_results(store, list(names or []) or None)
        for proto in sorted(set(df["protocol"])):
            if proto in owner:
                raise FsbenchError(
                    f"protocol {proto!r} has results in both {owner[proto]} and {store}: its tasks "
                    "would count twice; give only one of these stores"
                )
            owner[proto] = store
        frames.append(df)
    merged = pd.concat(frames, ignore_index=True)
    if merged.empty:
        wanted = f" for {', '.join(names)}" if names else ""
        raise FsbenchError(f"no results{wanted} in {', '.join(map(str, stores))}")
    return merged


def cmd_report(args: argparse.Namespace) -> int:
    from fewshot_bench.report import summarise, to_csv, to_latex, to_markdown

    df = _stored_results(args.workdir / "results.sqlite", args.protocol)
    # rows by the store's family, then label count / shots, then accuracy (see summarise)
    table = summarise(df)
    render = {"markdown": to_markdown, "csv": to_csv, "latex": to_latex}[args.format]
    print(render(table))
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    store = args.workdir / "results.sqlite"
    if args.all == bool(args.protocol):
        raise FsbenchError("give a protocol or family name, or --all (not both)")
    if args.name is not None and not args.name.strip():
        raise FsbenchError("--name must not be empty")
    if args.name is not None and (
        "/" in args.name or "\\" in args.name or args.name.strip() in (".", "..")
    ):
        raise FsbenchError(
            f"--name {args.name!r} must be a plain file name (no folders); use --out for the folder"
        )
    if args.all and args.name:
        raise FsbenchError("--name names a group page of the protocols given; not with --all")
    if len(args.protocol) > 1 and not args.name:
        raise FsbenchError(
            f"{len(args.protocol)} protocols given: name their group page with --name, e.g. "
            f"`fsbench leaderboard {' '.join(args.protocol)} --name NAME` (writes NAME.md/.csv/.tex)"
        )
    args.html = getattr(args, "html", None)  # callers that build the Namespace may omit it
    if args.out is None and args.html is None:
        args.out = Path("leaderboards")  # --html alone writes only the site
    if args.out is not None:
        _output_folder("--out", args.out)
    if args.html is not None:
        _output_folder("--html", args.html)
    # Everything comes from the store (read-only): names are the protocols and families its
    # rows record, never looked up in protocol files.
    extra = [w / "results.sqlite" for w in getattr(args, "also_workdir", None) or []]
    df = (
        _stored_results(store, args.protocol)
        if not extra
        else _merged_results([store, *extra], args.protocol)
    )
    fam_of = _known_families(df)
    paths: list[Path] = []
    if args.out is not None:
        try:
            paths += _write_pages(args, df, fam_of)
        except OSError as exc:
            raise _cannot_write("--out folder", exc) from None
    if args.html is not None:
        try:
            paths += _write_site(args, df, fam_of)
        except OSError as exc:
            raise _cannot_write("--html folder", exc) from None
    for path in paths:
        print(f"wrote {path}")
    return 0


def _group_names(args: argparse.Namespace, df, fam_of: dict[str, str]) -> list[str]:
    """The columns of a --name group page: the names given in order, families expanded in
    place by budget; a name without results stays (an empty column, "No results yet")."""
    from fewshot_bench.report import family_protocols

    names: list[str] = []
    for spec in args.protocol:
        if spec in fam_of:
            names.append(spec)
        elif spec in set(fam_of.values()):
            names += family_protocols(df, spec)
        else:
            names.append(spec)
    return list(dict.fromkeys(names))


def _write_site(args: argparse.Namespace, df, fam_of: dict[str, str]) -> list[Path]:
    """The static HTML site of the selected rows, written under ``args.html``: the boards
    `fsbench leaderboard` would write as Markdown, an index.html and the assets."""
    from fewshot_bench.report.cards import reported_by_protocol
    from fewshot_bench.report.site import board_for, boards_for_all, group_board, write_site

    if args.name:
        boards = [group_board(_group_names(args, df, fam_of), args.name)]
    elif args.all:
        boards = boards_for_all(df)
    else:
        spec = args.protocol[0]
        if spec in fam_of:  # a protocol name first, then a family name (as `fsbench run`)
            df = df[df["protocol"] == spec]
        boards = [board_for(df, spec)]
    protocols = sorted({p for b in boards for p in b.protocols})
    reported = reported_by_protocol(protocols, with_ci=True)
    return write_site(df, args.html, boards, reported)


def _write_pages(args: argparse.Namespace, df, fam_of: dict[str, str]) -> list[Path]:
    """The leaderboard pages `fsbench leaderboard` asked for, written under ``args.out``."""
    from fewshot_bench.report import (
        family_protocols,
        write_all,
        write_family,
        write_group,
        write_leaderboards,
    )
    from fewshot_bench.report.cards import reported_by_protocol

    if args.name:
        # a group page: one column per protocol in the order given (families expand in place,
        # by budget); a name without results is an empty column ("No results yet")
        names = _group_names(args, df, fam_of)
        reported = reported_by_protocol(names, with_ci=True)
        paths = write_group(df, names, args.name, args.out, reported)
    elif args.all:
        # paper numbers from the run cards in baselines/, for the protocols with results
        reported = reported_by_protocol(sorted(fam_of))
        paths = write_all(df, args.out, reported)
    else:
        spec = args.protocol[0]
        if spec in fam_of:  # a protocol name first, then a family name (as `fsbench run`)
            df = df[df["protocol"] == spec]
            names = [spec]
        else:
            names = family_protocols(df, spec)
        reported = reported_by_protocol(names)
        if len(names) > 1:
            paths = write_family(df, spec, args.out, reported)
        else:
            paths = write_leaderboards(df, args.out, names, reported=reported)
    return paths


def _at_least(flag: str, value: int | None, low: int) -> None:
    """An error unless ``value`` is None (not given) or an integer >= ``low``."""
    if value is not None and value < low:
        raise FsbenchError(f"{flag} must be an integer >= {low}, got {value}")


def _output_file(flag: str, path: Path) -> Path:
    """``path``, when a file can be written there: it is no folder and its folder exists."""
    if path.is_dir():
        raise FsbenchError(
            f"{flag} {path} is a folder; give a file name inside it, e.g. {path / 'NAME'}"
        )
    if not path.parent.is_dir():
        raise FsbenchError(
            f"{flag} {path}: folder {path.parent} does not exist; create it first "
            f"(mkdir -p {path.parent}) or name a file in an existing folder"
        )
    return path


def _output_folder(flag: str, path: Path) -> Path:
    """``path``, when it is a folder or can be made one (with its parents): no file is in the way."""
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        what = f"{flag} {path}" + ("" if blocker == path else f": {blocker}")
        raise FsbenchError(f"{what} is a file, not a folder; give a folder to write into")
    return path


def _cannot_write(flag: str, exc: OSError) -> FsbenchError:
    """The error for an output that could not be written (permissions, full disk, ...)."""
    return FsbenchError(
        f"cannot write {exc.filename or 'the output'} ({exc.strerror or exc}); pass a {flag} "
        "you can write to"
    )


def build_parser() -> argparse.ArgumentParser:
    from fewshot_bench.data.download import RESOURCES

    parser = argparse.ArgumentParser(
        prog="fsbench",
        description="Episodic few-shot and semi-supervised benchmarks with honest confidence intervals.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("datasets", help="list dataset loaders and their splits")
    p.set_defaults(func=cmd_datasets)

    downloadable = ", ".join(sorted(RESOURCES))  # the registry's would import every loader
    p = sub.add_parser(
        "download",
        help=f"fetch and checksum-verify datasets into the data root ({downloadable})",
        description=f"Fetch datasets and verify their checksums. Downloadable: {downloadable}. "
        "Others (imagefolder, features) read files you already have: see `fsbench datasets`.",
    )
    p.add_argument("dataset", nargs="+", metavar="DATASET", help=f"one or more of: {downloadable}")
    p.add_argument(
        "--data-root",
        default=None,
        help="folder to download into (default: $FSBENCH_DATA or ~/.cache/fewshot-bench/data)",
    )
    p.set_defaults(func=cmd_download)

    p = sub.add_parser(
        "protocols", help="list benchmark protocols (episodes/*.toml and $FSBENCH_PROTOCOLS)"
    )
    p.set_defaults(func=cmd_protocols)

    p = sub.add_parser(
        "methods", help="list registered methods (built-in and plugins), or one method's parameters"
    )
    p.add_argument("name", nargs="?", default=None, help="show this method's typed parameters")
    _add_plugin(p)
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser(
        "episodes", help="materialise a protocol's frozen manifest and show a summary"
    )
    p.add_argument("protocol", help="protocol name, family name or path to a .toml file")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the protocol's)")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print the first N tasks")
    p.add_argument(
        "--import",
        dest="import_file",
        metavar="FILE",
        help="import externally given episodes (JSON Lines, see fewshot_bench/tasks/external.py)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing manifest on --import")
    p.add_argument(
        "--export",
        metavar="FILE",
        help="write the episodes as JSON Lines ({protocol}, {seed} expand)",
    )
    p.add_argument(
        "--item-ids", action="store_true", help="export item ids (file paths) instead of indices"
    )
    _add_common(p)
    p.set_defaults(func=cmd_episodes)

    p = sub.add_parser(
        "run", help="run methods on a protocol; resumes where a previous run stopped"
    )
    p.add_argument(
        "protocol", help="protocol name, family name (all variants) or path to a .toml file"
    )
    p.add_argument(
        "--method",
        "-m",
        action="append",
        help="method name, optionally name:key=value,... with TOML values, e.g. "
        "diffusion:k=20,prior=[0.2,0.8] (repeat for several; `fsbench methods NAME` lists them)",
    )
    _add_method_config(p)
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the protocol's)")
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ..."
    )
    p.add_argument(
        "--backbone",
        default=None,
        help="feature extractor for feature methods (default: protocol's)",
    )
    p.add_argument(
        "--max-tasks", type=int, default=None, help="run only the first N tasks of each seed"
    )
    p.add_argument("--batch-size", type=int, default=64, help="tasks per predict_batch call")
    p.add_argument("--budget", type=int, default=None, help="training steps for methods that fit")
    p.add_argument(
        "--save-state",
        type=Path,
        default=None,
        help="copy the trained state of the (one) training method to this file, for init=",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_executor(p)
    _add_plugin(p)
    _add_common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "sweep",
        help="run a grid of protocols x methods x seeds x backbones (SWEEP.toml) serially, in "
        "local processes or on a Ray cluster; --status shows per-cell progress",
    )
    p.add_argument("sweep", type=Path, help="the sweep file (TOML; see sweeps/)")
    p.add_argument(
        "--status",
        action="store_true",
        help="print per-cell done/total of the sweep from the results store (read-only; safe "
        "from another shell while the sweep runs)",
    )
    _add_executor(p, default=None)
    p.add_argument("--workdir", type=Path, default=None, help="override the sweep's [run] workdir")
    p.add_argument("--data-root", default=None, help="override the sweep's [run] data_root")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "audit",
        help="rerun a sample of an entry's tasks in another item order: flags methods whose "
        "predictions depend on order, and stored rows that do not reproduce",
    )
    p.add_argument("protocol", help="protocol name, family name or path to a .toml file")
    _add_method_args(p, "as for `run`")
    p.add_argument("--seed", type=int, default=None, help="which seed's tasks (default: first)")
    p.add_argument("--tasks", type=int, default=20, help="how many tasks to rerun (default 20)")
    _add_plugin(p)
    _add_common(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser(
        "tune",
        help="choose hyper-parameters on episodes of a validation split (never the test "
        "classes); writes a --method-config file for `run`",
    )
    p.add_argument("protocol", help="the protocol whose episode shape to tune for")
    _add_method_args(p, "the method, with fixed parameters")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="NAME=V1,V2,...",
        help="values to try for one parameter (repeat for several: every combination runs)",
    )
    p.add_argument("--split", default=None, help="validation split (default: val)")
    p.add_argument("--tasks", type=int, default=200, help="validation episodes (default 200)")
    p.add_argument("--out", type=Path, default=None, help="the tuned configuration file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_plugin(p)
    _add_common(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "report", help="mean ± 95%% CI per protocol and method from the results store"
    )
    p.add_argument(
        "--protocol",
        nargs="*",
        help="only these protocols or families (names as recorded in the results store)",
    )
    p.add_argument("--format", choices=["markdown", "csv", "latex"], default="markdown")
    _add_common(p, data=False)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "leaderboard", help="write Markdown/CSV/LaTeX tables and plots for a protocol"
    )
    p.add_argument(
        "protocol",
        nargs="*",
        help="protocol or family name as recorded in the results store (a family of several "
        "protocols also gets a family page); several names with --name: a group page with one "
        "column per protocol",
    )
    p.add_argument(
        "--name",
        default=None,
        help="write a group page NAME.md/.csv/.tex over the protocols given, one column each in "
        "the order given (required with several protocols), e.g. `fsbench leaderboard "
        "omniglot-5w1s omniglot-5w5s omniglot-20w1s omniglot-20w5s --name omniglot`",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="pages for every protocol family in the results store, and index.md linking them",
    )
    p.add_argument(
        "--data-root",
        default=None,
        help="ignored, kept so older scripts still run: pages say which copy of a dataset was "
        "read (e.g. CIFAR-10's JPEG copy) from the results store's data note, as the run recorded",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder of the Markdown/CSV/LaTeX pages, created if missing (default: "
        "leaderboards/, unless --html is given)",
    )
    p.add_argument(
        "--html",
        type=Path,
        default=None,
        metavar="DIR",
        help="write a static HTML site of the same boards into DIR instead of the Markdown "
        "pages (give --out as well for both): index.html, one page per board with sortable "
        "columns, a setting filter, CI bars, plots and per-entry provenance; plain files that "
        "open from disk, no network",
    )
    p.add_argument(
        "--also-workdir",
        type=Path,
        action="append",
        default=[],
        metavar="WORKDIR",
        help="read this workdir's results store too (repeatable), e.g. a large protocol kept "
        "in a store of its own; a protocol may have results in one store only",
    )
    _add_common(p, data=False)
    p.set_defaults(func=cmd_leaderboard)

    from fewshot_bench.pretrain_cli import add_pretrain_parser

    add_pretrain_parser(sub)
    from fewshot_bench.perf import add_perf_parser

    add_perf_parser(sub)
    return parser


def _starts_serial_run(argv: list[str]) -> bool:
    """Whether ``argv`` runs methods in the shared worker (``run`` with the serial executor) in a
    process that has not started one yet."""
    if argv[:1] != ["run"] or "-h" in argv or "--help" in argv:
        return False
    if "fewshot_bench.run.executor" in sys.modules:  # this process has run before: it has a worker
        return False
    for i, arg in enumerate(argv):
        if arg == "--executor":
            return argv[i + 1 : i + 2] == ["serial"]
        if arg.startswith("--executor="):
            return arg == "--executor=serial"
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if _starts_serial_run(argv):
        from fewshot_bench.run.spawn import start_early

        start_early()  # the worker imports torch while this process does (run/spawn.py)
    from fewshot_bench.run.heap import keep_freed_memory

    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()  # this process assembles task after task of the same size
    try:
        return int(args.func(args) or 0)
    except FsbenchError as exc:
        print(f"fsbench: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and friends
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(
            "fsbench: interrupted; finished tasks are stored, rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


def entry() -> None:
    """The ``fsbench`` command: :func:`main`, then an exit without the interpreter's teardown."""
    from fewshot_bench.quick_exit import exit_now

    exit_now(main())


if __name__ == "__main__":
    entry()
