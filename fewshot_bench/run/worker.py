"""The method worker: a separate process that runs methods on Tasks and never sees an answer.

Started by :class:`fewshot_bench.run.executor.ProcessExecutor` as ``python -m
fewshot_bench.run.worker READ_FD WRITE_FD RUNNER_PID SOCKET_FD FOLDER`` (by
:func:`fewshot_bench.run.spawn.spawn_worker`). It receives pickled requests (method
specs, Tasks, seeds, fit data of base classes, cached states; large arrays beside them in a
sealed memory file, see :mod:`fewshot_bench.run.transport`) from the runner and answers with JSON headers and
raw array bytes only, so the runner never unpickles anything a method produced. Query labels,
unlabeled labels, manifests and the results store stay in the runner's process.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib
import importlib.util
import io
import json
import os
import pickle
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot_bench.errors import FsbenchError
from fewshot_bench.quick_exit import exit_now
from fewshot_bench.run.heap import keep_freed_memory
from fewshot_bench.run.transport import recv_request


@dataclass(frozen=True)
class MethodSpec:
    """How a worker finds and builds a method: its registry name and the parameters given.

    ``origin`` locates a class that is not found by name in a fresh process:
    ``"package.module:ClassName"`` or ``"/path/to/file.py:ClassName"``. ``tuning``: how the
    parameters were chosen (``fsbench tune``); it becomes part of every row's configuration.
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    origin: str = ""
    tuning: dict[str, Any] = field(default_factory=dict)


def _load_file_module(path: str) -> Any:
    file = Path(path).resolve()
    mod_name = "fsbench_plugin_" + hashlib.sha256(str(file).encode()).hexdigest()[:12]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, file)
    if spec is None or spec.loader is None:
        raise FsbenchError(f"plugin {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def load_plugin(ref: str) -> Any:
    """Import a plugin given as a module name or a ``.py`` file path (registers its methods);
    ``MODULE:Class`` or ``FILE.py:Class`` also registers that class under its ``name`` (or,
    when it has none, its class name in lower case)."""
    where, colon, qualname = ref.rpartition(":")
    if colon and where and qualname.isidentifier():
        return _register_plugin_class(ref, load_plugin(where), qualname)
    if ref.endswith(".py"):
        if not Path(ref).is_file():
            raise FsbenchError(f"--plugin {ref}: no such file")
        return _load_file_module(ref)
    try:
        return importlib.import_module(ref)
    except ImportError as exc:
        raise FsbenchError(f"--plugin {ref}: cannot import it ({exc})") from None


def _register_plugin_class(ref: str, module: Any, qualname: str) -> Any:
    from fewshot_bench.methods.base import Method
    from fewshot_bench.methods.registry import available_methods, register_method

    cls = getattr(module, qualname, None)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise FsbenchError(f"--plugin {ref}: {qualname} is not a Method subclass in that module")
    registered = next((n for n, c in available_methods().items() if c is cls), None)
    if registered is None:
        register_method(cls.name if cls.name != "unnamed" else qualname.lower())(cls)
    return module


def resolve_class(spec: MethodSpec) -> type:
    """The Method subclass a spec names."""
    from fewshot_bench.methods.base import Method
    from fewshot_bench.methods.registry import get_method

    if not spec.origin:
        return get_method(spec.name)
    where, _, qualname = spec.origin.rpartition(":")
    module = load_plugin(where)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise FsbenchError(f"{spec.origin} is not a Method subclass")
    return obj


def describe(method: Any, cls: type, spec: MethodSpec) -> dict[str, Any]:
    """What the runner needs to know about a built method (JSON-able)."""
    from fewshot_bench.methods.base import SETTINGS
    from fewshot_bench.run.provenance import code_fingerprint

    name = cls.name if cls.name != "unnamed" else spec.name
    if spec.name and spec.name != name:
        raise FsbenchError(
            f"method {spec.name!r} resolves to a class registered as {name!r}: rows would be "
            f"recorded under another name; use -m {name} (one name for the entry point and "
            "@register_method)"
        )
    params = json.loads(json.dumps(method.params, default=str))
    defaults = json.loads(json.dumps(dict(cls.defaults), default=str))
    config = {**method.config(), "method": name}
    if spec.tuning:
        config["tuning"] = spec.tuning
    config = json.loads(json.dumps(config, default=str))
    if method.setting not in SETTINGS:
        raise FsbenchError(
            f"method {name!r}: setting must be one of {SETTINGS}, not {method.setting!r}"
        )
    return {
        "name": name,
        "consumes": cls.consumes,
        "setting": method.setting,
        "trains": bool(method.trains),
        "fit_optional": bool(getattr(cls, "fit_optional", False)),
        "params": params,
        "changed": {k: v for k, v in params.items() if defaults.get(k, object()) != v},
        "config": config,
        "code_fingerprint": code_fingerprint(cls),
        "fit_fingerprint": code_fingerprint(cls, harness=False),
        "source": f"{cls.__module__}:{cls.__qualname__}",
    }


def small_tasks(tasks: list, device: str) -> bool:
    """Whether every task is small enough (items) to run single-threaded on the CPU: a method's
    many tiny torch calls on two threads cost more in OpenMP start-up than they compute."""
    from fewshot_bench.graph.threads import SMALL_PROBLEM_NODES

    return torch.device(device).type == "cpu" and all(
        t.n_items <= SMALL_PROBLEM_NODES for t in tasks
    )


#: The answer to ``score`` for a chunk this worker never adapted to (it was restarted since).
LOST_CHUNK = "the worker lost this chunk's adapted state (it was restarted); run the chunk again"


def score_blobs(outputs: list[Any]) -> tuple[dict[str, Any], list[bytes]]:
    """Score tensors as float32 bytes and their shapes (what the runner decodes)."""
    blobs, shapes = [], []
    for out in outputs:
        arr = torch.as_tensor(out).detach().float().cpu().numpy()
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        shapes.append(list(arr.shape))
        blobs.append(arr.tobytes())
    return {"shapes": shapes}, blobs


class Worker:
    """Holds built methods by handle and answers the runner's requests."""

    def __init__(self) -> None:
        self.methods: dict[int, Any] = {}
        self.scorers: dict[tuple[int, int], tuple[list[Any], str]] = {}

    def handle(self, request: tuple) -> tuple[dict[str, Any], list[bytes]]:
        op, *args = request
        return getattr(self, f"op_{op}")(*args)

    def answer(self, request: tuple) -> tuple[dict[str, Any], list[bytes]]:
        """``handle``, with an error as an answer (``{"error", "kind": "user" | "bug"}``, a bug
        with its traceback): a method's failure is reported and the worker lives on."""
        try:
            return self.handle(request)
        except FsbenchError as exc:
            return {"error": str(exc), "kind": "user"}, []
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
            return {"error": error, "kind": "bug", "traceback": traceback.format_exc()}, []

    def op_init(self, sys_path: list[str], plugins: list[str]) -> tuple[dict, list[bytes]]:
        sys.path[:] = list(dict.fromkeys([*sys_path, *sys.path]))
        for ref in plugins:
            load_plugin(ref)
        return {"ok": True, "sandbox": SANDBOX}, []

    def op_open(
        self,
        hid: int,
        spec: MethodSpec,
        device: str,
        fit: dict[str, Any] | None,
        state: bytes | None,
    ) -> tuple[dict, list[bytes]]:
        from fewshot_bench.methods.base import FitSource, TaskContext

        cls = resolve_class(spec)
        method = cls(**spec.params)
        info = describe(method, cls, spec)
        blobs: list[bytes] = []
        if state is not None:
            try:
                loaded = torch.load(io.BytesIO(state), map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - truncated, foreign or crafted: unusable
                why = (
                    "it holds objects other than tensors and plain values, refused unrun"
                    if isinstance(exc, pickle.UnpicklingError)
                    else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                )
                raise FsbenchError(
                    f"the trained state of {info['name']!r} is unreadable ({why})"
                ) from None
            method.load_state_dict(loaded)
        elif fit is not None and info["trains"]:
            source = FitSource(**fit["source"])
            method.fit(source, fit["budget"], TaskContext.create(fit["seed"], device))
            trained = method.state_dict()
            if trained is not None:
                buf = io.BytesIO()
                torch.save(trained, buf)
                blobs.append(buf.getvalue())
        self.methods[hid] = method
        return {"info": info, "state": bool(blobs)}, blobs

    def _run(self, hid: int, tasks: list, seeds: list[int], device: str, what: str) -> list:
        """``predict_batch`` or ``fit_tasks`` of method ``hid`` on ``tasks`` moved to ``device``,
        each with its own seeded context; one output per task."""
        from fewshot_bench.methods.base import TaskContext

        method = self.methods[hid]
        moved = [t.to(device) for t in tasks]
        ctxs = [TaskContext.create(s, device) for s in seeds]
        from fewshot_bench.graph.threads import few_threads

        with few_threads(small_tasks(tasks, device)):
            outputs = list(getattr(method, what)(moved, ctxs))
        if len(outputs) != len(tasks):
            raise FsbenchError(
                f"method {method.name!r}: {what} returned {len(outputs)} outputs for {len(tasks)} tasks"
            )
        return outputs

    def op_predict(
        self, hid: int, tasks: list, seeds: list[int], device: str
    ) -> tuple[dict, list[bytes]]:
        """Transductive methods: scores of whole tasks."""
        return score_blobs(self._run(hid, tasks, seeds, device, "predict_batch"))

    def op_fit(
        self, key: tuple[int, int], tasks: list, seeds: list[int], device: str
    ) -> tuple[dict, list]:
        """Inductive and semi-supervised methods: adapt method ``key[0]`` to tasks that carry no
        queries; the scorers wait under ``key`` for ``score`` requests."""
        scorers = self._run(key[0], tasks, seeds, device, "fit_tasks")
        self.scorers[tuple(key)] = (scorers, device, small_tasks(tasks, device))
        return {"ok": True}, []

    def op_score(
        self, key: tuple[int, int], rows: list[tuple[int, Any]]
    ) -> tuple[dict, list[bytes]]:
        """Scores of the queries listed per task (``(task slot, queries [m, ...])``: one query,
        or all of a task's queries for a row-wise built-in scorer)."""
        if tuple(key) not in self.scorers:
            raise FsbenchError(LOST_CHUNK)
        from fewshot_bench.graph.threads import few_threads

        scorers, device, small = self.scorers[tuple(key)]
        with few_threads(small):
            return score_blobs([scorers[slot](query.to(device)) for slot, query in rows])

    def op_drop(self, key: tuple[int, int]) -> tuple[dict, list[bytes]]:
        self.scorers.pop(tuple(key), None)
        return {"ok": True}, []

    def op_release(self, hid: int) -> tuple[dict, list[bytes]]:
        self.methods.pop(hid, None)
        for key in [k for k in self.scorers if k[0] == hid]:
            del self.scorers[key]
        return {"ok": True}, []


def serve(inbox: Connection, outbox: Connection, files: socket.socket | None = None) -> None:
    """Answer requests until the runner closes the pipe or sends ``("exit",)``; ``files``: the
    socket that carries the sealed memory files of large arrays."""
    worker = Worker()
    while True:
        try:
            request = recv_request(inbox, files)
        except EOFError:
            return
        if request[0] == "exit":
            return
        meta, blobs = worker.answer(request)
        meta["n_blobs"] = len(blobs)
        outbox.send_bytes(json.dumps(meta).encode())
        for blob in blobs:
            outbox.send_bytes(blob)


def exit_with_runner(runner_pid: int, every_s: float = 1.0) -> None:
    """End this process when the runner that started it is gone.

    A killed runner closes the pipe, but a worker busy in a long ``fit`` would only notice when it
    next reads; until then it would train for nobody. A daemon thread polls the parent pid."""
    if os.getppid() != runner_pid:
        os._exit(0)

    def watch() -> None:
        while True:
            time.sleep(every_s)
            if os.getppid() != runner_pid:
                os._exit(0)

    threading.Thread(target=watch, name="exit-with-runner", daemon=True).start()


#: How this process is confined (set by ``main``); ``None`` when it is not.
SANDBOX: str | None = None


def confine(private: str) -> str | None:
    """Make ``private`` this worker's temporary folder (its kNN-graph cache, when one is
    configured) and, where the kernel allows, confine its writes to it (``FSBENCH_SANDBOX=0``
    turns this off, e.g. to debug a method).

    ``private`` is the empty folder the runner made for it: the worker empties it at exit and
    the runner removes it once the worker has exited (a confined worker may empty the folder but
    not remove it from its parent)."""
    from fewshot_bench.run.sandbox import confine_writes

    atexit.register(_empty_folder, private)
    os.environ["TMPDIR"] = tempfile.tempdir = private
    if os.environ.get("FSBENCH_SANDBOX", "1") == "0":
        return None
    if os.environ.get("FSBENCH_GRAPH_CACHE") or os.environ.get("FSBENCH_CACHE"):
        # kNN graphs a method builds are kept for the tasks this worker serves, never in the
        # shared cache, where a plugin could plant lists that a later run would read
        os.environ["FSBENCH_GRAPH_CACHE"] = os.path.join(private, "graphs")
    init_cuda_driver()
    return confine_writes([private, "/dev"])


def _empty_folder(folder: str) -> None:
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def init_cuda_driver() -> None:
    """Start the CUDA driver before the sandbox closes, on a machine with an NVIDIA device: a
    confined process cannot start it (``cudaGetDeviceCount`` fails with error 304, "OS call
    failed"), while a started driver keeps working under the confinement. A no-op elsewhere."""
    if not os.path.exists("/dev/nvidiactl"):
        return
    try:
        torch.cuda.init()
    except Exception:  # noqa: BLE001 - no usable GPU: a CUDA run then fails with torch's message
        pass


def main(argv: list[str]) -> int:
    global SANDBOX
    inbox = Connection(int(argv[0]), writable=False)
    outbox = Connection(int(argv[1]), readable=False)
    exit_with_runner(int(argv[2]))
    files = socket.socket(fileno=int(argv[3]))
    keep_freed_memory()
    SANDBOX = confine(argv[4])
    # imported now, while the runner prepares its first request, instead of at the first open
    import fewshot_bench.methods.builtin  # noqa: F401

    serve(inbox, outbox, files)
    exit_now(0)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
