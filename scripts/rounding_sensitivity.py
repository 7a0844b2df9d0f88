"""How far do a method's per-task accuracies move when its features move by rounding-sized noise?

    python scripts/rounding_sensitivity.py fashion-mnist-ssl -m diffusion --seeds 0 1 2
    python scripts/rounding_sensitivity.py fashion-mnist-ssl-500 -m propagation-classifier \
        --eps 1e-7 1e-6 --workdir /tmp/sens
    python scripts/rounding_sensitivity.py omniglot-5w1s -m diffusion -- --backbone pixels --max-tasks 50

Arguments after ``--`` go to ``fsbench run`` as they are.
Runs the protocol (``fsbench run``) with the method itself and with ``perturbed`` copies of it
whose tasks have every feature multiplied by ``1 + eps * N(0, 1)`` (one fixed noise draw per
task), then prints each task's accuracy beside the unperturbed one and the spread of the
differences. ``eps`` = 1e-7 is about one float32 rounding step; a CPU of another kind, a GPU or
another BLAS changes a method's arithmetic by about that much. The unperturbed copy
(``eps=0``) must reproduce the method's own rows exactly: the script checks that it does.

This file is also the plugin that defines ``perturbed`` (loaded with ``--plugin``). The wrapped
method gets what its own setting allows (an inductive one sees no unlabeled pool), but all
queries arrive in one call, since the wrapper declares itself transductive: use it to measure,
not to publish rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import torch

from fewshot_bench.methods import Method, available_methods, register_method
from fewshot_bench.methods.base import TaskContext
from fewshot_bench.methods.params import Param
from fewshot_bench.run.store import load_results
from fewshot_bench.tasks.task import Task

#: Fixed seed of the noise draw: the same task gets the same noise in every method and run.
NOISE_SEED = 12345


def _perturb(t: torch.Tensor, eps: float, gen: torch.Generator) -> torch.Tensor:
    if eps == 0 or t.numel() == 0 or not t.is_floating_point():
        return t
    noise = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.device)
    return (t.float() * (1 + eps * noise)).to(t.dtype)


@register_method("perturbed")
class Perturbed(Method):
    """A built-in feature method run on features scaled by ``1 + eps * N(0, 1)``."""

    consumes = "features"
    setting = "transductive"
    schema = {
        "base": Param("diffusion", "the built-in method to run"),
        "base_params": Param("{}", "the base method's parameters, as a JSON object"),
        "eps": Param(0.0, "relative noise on every feature", low=0),
    }

    def predict(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        cls = available_methods()[self.params["base"]]
        base = cls(**json.loads(self.params["base_params"]))
        gen = torch.Generator().manual_seed(NOISE_SEED)
        eps = float(self.params["eps"])
        unlabeled = task.unlabeled if cls.setting != "inductive" else task.unlabeled[:0]
        t = dataclasses.replace(
            task,
            support=_perturb(task.support, eps, gen),
            unlabeled=_perturb(unlabeled, eps, gen),
            query=_perturb(task.query, eps, gen),
        )
        if cls.setting == "transductive":
            return base.predict(t, ctx)
        return base.fit_task(t, ctx)(t.query)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("protocol")
    ap.add_argument("-m", "--method", default="diffusion", help="a built-in feature method")
    ap.add_argument("--params", default="{}", help="its parameters as a JSON object")
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-7, 1e-6])
    ap.add_argument("--seeds", nargs="+", default=None)
    ap.add_argument("--workdir", default="runs-sensitivity")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = ap.parse_args(argv)
    cls = available_methods().get(args.method)
    if cls is None and "--plugin" not in extra:
        ap.error(
            f"{args.method!r} is not a built-in method (pass its file after --: -- --plugin F)"
        )
    if cls is not None and cls.consumes != "features":
        ap.error(f"{args.method!r} consumes {cls.consumes}; only feature methods can be perturbed")
    try:
        own = json.loads(args.params)
    except json.JSONDecodeError as e:
        ap.error(f"--params must be a JSON object, e.g. '{{\"k\": 20}}' ({e})")
    if not isinstance(own, dict):
        ap.error("--params must be a JSON object, e.g. '{\"k\": 20}'")
    base = json.dumps(own, sort_keys=True)
    settings = ",".join(f"{k}={json.dumps(v)}" for k, v in own.items())  # JSON values are TOML
    methods = [f"{args.method}:{settings}" if own else args.method]
    for eps in [0.0, *args.eps]:
        methods.append(f'perturbed:base="{args.method}",base_params={json.dumps(base)},eps={eps!r}')
    cmd = [sys.executable, "-m", "fewshot_bench", "run", args.protocol, "--quiet"]
    cmd += ["--plugin", __file__, "--workdir", args.workdir]
    for m in methods:
        cmd += ["-m", m]
    if args.seeds:
        cmd += ["--seeds", *args.seeds]
    cmd += extra
    print("$", " ".join(cmd), flush=True)
    code = subprocess.run(cmd).returncode
    if code != 0:
        print(f"fsbench run failed (exit {code}); the rows it stored stay in {args.workdir}")
        return code

    acc: dict[tuple, dict[str, float]] = {}
    for row in load_results(Path(args.workdir) / "results.sqlite").itertuples():
        p = json.loads(row.params)
        if row.method == args.method and json.dumps(p, sort_keys=True) == base:
            column = "method"
        elif row.method == "perturbed":
            # stored params leave out the values equal to their defaults
            p = {name: p.get(name, param.default) for name, param in Perturbed.schema.items()}
            if (
                p["base"] != args.method
                or json.dumps(json.loads(p["base_params"]), sort_keys=True) != base
            ):
                continue
            column = f"eps={float(p['eps']):g}"
        else:
            continue
        acc.setdefault((row.protocol, row.seed, row.task_index), {})[column] = 100 * row.accuracy
    columns = ["method", "eps=0", *[f"eps={e:g}" for e in args.eps]]
    print(f"\n{'protocol':28s} {'seed':>4s} {'task':>4s} " + " ".join(f"{c:>10s}" for c in columns))
    for key in sorted(acc):
        row = acc[key]
        cells = " ".join(f"{row[c]:10.2f}" if c in row else f"{'-':>10s}" for c in columns)
        print(f"{key[0]:28s} {key[1]:4d} {key[2]:4d} {cells}")
    same = [r["method"] == r["eps=0"] for r in acc.values() if "method" in r and "eps=0" in r]
    print(f"\neps=0 reproduces the method's rows: {sum(same)}/{len(same)} tasks")
    for eps in args.eps:
        c = f"eps={eps:g}"
        d = sorted(abs(r[c] - r["eps=0"]) for r in acc.values() if c in r and "eps=0" in r)
        if d:
            print(
                f"{c}: |accuracy change| mean {sum(d) / len(d):.2f}, median {d[len(d) // 2]:.2f}, "
                f"max {d[-1]:.2f} points over {len(d)} tasks; > 0.5 points on {sum(x > 0.5 for x in d)}"
            )
    return 0 if same and all(same) else 1


if __name__ == "__main__":
    raise SystemExit(main())
