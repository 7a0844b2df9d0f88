"""The method worker: a separate process that runs methods on Tasks and never sees an answer.

Started by :class:`fewshot_bench.run.executor.ProcessExecutor` as ``python -m
fewshot_bench.run.worker READ_FD WRITE_FD RUNNER_PID``. It receives pickled requests (method specs, Tasks,
seeds, fit data of base classes, cached states) from the runner and answers with JSON headers and
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


@dataclass(frozen=True)
class MethodSpec:
    """How a worker finds and builds a method: its registry name and the parameters given.

    ``origin`` locates a class that is not found by name in a fresh process:
    ``"package.module:ClassName"`` or ``"/path/to/file.py:ClassName"``.
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    origin: str = ""


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
    """Import a plugin given as a module name or a ``.py`` file path (registers its methods)."""
    if ref.endswith(".py"):
        if not Path(ref).is_file():
            raise FsbenchError(f"--plugin {ref}: no such file")
        return _load_file_module(ref)
    try:
        return importlib.import_module(ref)
    except ImportError as exc:
        raise FsbenchError(f"--plugin {ref}: cannot import it ({exc})") from None


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
    from fewshot_bench.run.provenance import code_fingerprint

    name = cls.name if cls.name != "unnamed" else spec.name
    params = json.loads(json.dumps(method.params, default=str))
    defaults = json.loads(json.dumps(dict(cls.defaults), default=str))
    config = json.loads(json.dumps({**method.config(), "method": name}, default=str))
    return {
        "name": name,
        "consumes": cls.consumes,
        "setting": cls.setting,
        "trains": bool(method.trains),
        "params": params,
        "changed": {k: v for k, v in params.items() if defaults.get(k, object()) != v},
        "config": config,
        "code_fingerprint": code_fingerprint(cls),
        "fit_fingerprint": code_fingerprint(cls, harness=False),
        "source": f"{cls.__module__}:{cls.__qualname__}",
    }


class Worker:
    """Holds built methods by handle and answers the runner's requests."""

    def __init__(self) -> None:
        self.methods: dict[int, Any] = {}

    def handle(self, request: tuple) -> tuple[dict[str, Any], list[bytes]]:
        op, *args = request
        return getattr(self, f"op_{op}")(*args)

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
            loaded = torch.load(io.BytesIO(state), map_location="cpu", weights_only=True)
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

    def op_predict(
        self, hid: int, tasks: list, seeds: list[int], device: str
    ) -> tuple[dict, list[bytes]]:
        from fewshot_bench.methods.base import TaskContext

        method = self.methods[hid]
        moved = [t.to(device) for t in tasks]
        ctxs = [TaskContext.create(s, device) for s in seeds]
        outputs = method.predict_batch(moved, ctxs)
        if len(outputs) != len(tasks):
            raise FsbenchError(
                f"method {method.name!r} returned {len(outputs)} score tensors for {len(tasks)} tasks"
            )
        blobs, shapes = [], []
        for out in outputs:
            arr = torch.as_tensor(out).detach().float().cpu().numpy()
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            shapes.append(list(arr.shape))
            blobs.append(arr.tobytes())
        settings = [method.task_setting(t) for t in tasks]
        return {"shapes": shapes, "settings": settings}, blobs

    def op_release(self, hid: int) -> tuple[dict, list[bytes]]:
        self.methods.pop(hid, None)
        return {"ok": True}, []


def serve(inbox: Connection, outbox: Connection) -> None:
    """Answer requests until the runner closes the pipe or sends ``("exit",)``."""
    worker = Worker()
    while True:
        try:
            request = pickle.loads(inbox.recv_bytes())
        except EOFError:
            return
        if request[0] == "exit":
            return
        try:
            meta, blobs = worker.handle(request)
        except FsbenchError as exc:
            meta, blobs = {"error": str(exc), "kind": "user"}, []
        except Exception as exc:  # noqa: BLE001 - a method's bug is reported, the worker lives on
            meta = {
                "error": f"{type(exc).__name__}: {exc}",
                "kind": "bug",
                "traceback": traceback.format_exc(),
            }
            blobs = []
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


def confine() -> str | None:
    """Give this worker a private temporary folder and, where the kernel allows, confine its
    writes to it (``FSBENCH_SANDBOX=0`` turns this off, e.g. to debug a method)."""
    from fewshot_bench.run.sandbox import confine_writes

    private = tempfile.mkdtemp(prefix="fsbench-worker-")
    os.environ["TMPDIR"] = tempfile.tempdir = private
    atexit.register(shutil.rmtree, private, True)
    if os.environ.get("FSBENCH_SANDBOX", "1") == "0":
        return None
    return confine_writes([private, "/dev"])


def main(argv: list[str]) -> int:
    global SANDBOX
    inbox = Connection(int(argv[0]), writable=False)
    outbox = Connection(int(argv[1]), readable=False)
    exit_with_runner(int(argv[2]) if len(argv) > 2 else os.getppid())
    SANDBOX = confine()
    serve(inbox, outbox)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
