"""What a result row is bound to besides its tasks: code fingerprints, file hashes, the machine.

The code fingerprint of a method covers the package version and the source of every module the
method's class reaches through imports inside its own top-level package and ``fewshot_bench``
(found by reading the files, not by importing them), plus the harness that builds, shuffles and
scores tasks. Editing any of it makes stored rows of that method stale for resume, without a
manual version number. The git commit is recorded beside it (informative: a commit that does not
touch a method's code does not invalidate its rows).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import fewshot_bench

#: Modules not followed: they only import every built-in method so that it registers.
NOT_FOLLOWED = frozenset({"fewshot_bench.methods.builtin"})
#: Modules whose code decides what a method sees and how its scores are judged.
HARNESS_MODULES = (
    "fewshot_bench.methods.base",
    "fewshot_bench.run.assemble",
    "fewshot_bench.run.worker",
)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _module_file(name: str) -> Path | None:
    loaded = getattr(sys.modules.get(name), "__file__", None)
    if loaded and loaded.endswith(".py"):
        return Path(loaded)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _imports(path: Path, module: str) -> frozenset[str]:
    """Absolute names of the modules ``path`` imports (at any nesting level)."""
    stat = path.stat()
    return _parsed_imports(str(path), module, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1024)
def _parsed_imports(path_name: str, module: str, mtime_ns: int, size: int) -> frozenset[str]:
    # keyed on the file's stat: every method a worker opens shares the harness's files, and
    # parsing them once per method took seconds per run
    path = Path(path_name)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(found)


def source_closure(module: str, extra_roots: tuple[str, ...] = ("fewshot_bench",)) -> list[Path]:
    """Files of ``module`` and every module it imports within its top-level package or
    ``extra_roots``, transitively."""
    roots = {module.partition(".")[0], *extra_roots}
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        for dep in _imports(path, name):
            if dep.partition(".")[0] in roots and dep not in seen and dep not in NOT_FOLLOWED:
                todo.append(dep)
    return [seen[n] for n in sorted(seen)]


@functools.cache
def code_fingerprint(cls: type, *, harness: bool = True) -> str:
    """Package version + the source closure of ``cls``'s module and (``harness=True``) of the
    harness that assembles and scores tasks. Trained states are keyed without the harness:
    ``fit`` does not go through it, so a change there does not force retraining.

    Read once per class and process: the code a process runs is what it imported, so a file
    edited during a run changes the rows of the next run, not those of this one."""
    if cls.__module__ in ("__main__", "__mp_main__"):
        raise ValueError("a method defined in __main__ has no importable source to fingerprint")
    h = hashlib.sha256(f"fewshot-bench {fewshot_bench.__version__}".encode())
    files: dict[Path, None] = {}
    for mod in (cls.__module__, *(HARNESS_MODULES if harness else ())):
        for path in source_closure(mod):
            files.setdefault(path)
    for path in sorted(files):
        h.update(str(path.name).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the checkout this package runs from (``+dirty`` when edited), or ''."""
    repo = Path(fewshot_bench.__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        return ""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    if head.returncode != 0:
        return ""
    return head.stdout.strip()[:12] + ("+dirty" if dirty.stdout.strip() else "")


@functools.lru_cache(maxsize=4)
def hardware(device: str = "cpu", threads: int | None = None) -> str:
    """A short description of the machine: CPU model and core count, the CPU threads the method
    was given when that was set and differs from the cores (BLAS sums, hence the last digits of
    some results, depend on it), and the GPU when used."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count()
    text = f"{cpu} ({cores} cores)"
    if threads is not None and threads != cores:
        text = f"{cpu} ({cores} cores, {threads} thread{'' if threads == 1 else 's'})"
    if device.startswith("cuda"):
        import torch

        text += f", {torch.cuda.get_device_name(torch.device(device))}"
    return text


def referenced_files(params: dict) -> dict[str, str]:
    """``{parameter: sha256}`` for every parameter whose value names an existing file."""
    out = {}
    for key, value in sorted(params.items()):
        if isinstance(value, str) and value and os.path.isfile(value):
            out[key] = file_sha256(value)
    return out


def backbone_hash(spec: str) -> str:
    """Content hash of the file behind a ``checkpoint:PATH[#layer]`` backbone ('' otherwise)."""
    prefix, _, arg = spec.partition(":")
    path = arg.partition("#")[0]
    if prefix == "pixels" or not path or not os.path.isfile(path):
        return ""
    return file_sha256(path)[:16]
