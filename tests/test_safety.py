"""Hostile or broken inputs, on real Omniglot: unsafe protocol names and values, temporary files
of killed writers, features that overflow float32, and crafted pickles fed to every loader of a
user- or cache-provided file (none may run code; each gives a clear error)."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from multiprocessing import Pipe
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot_bench.atomic import owner_tag, remove_stale_temps
from fewshot_bench.backbones.checkpoint import load_checkpoint
from fewshot_bench.backbones.embedders import Embedder, PixelEmbedder, get_embedder
from fewshot_bench.data import load_dataset
from fewshot_bench.data.base import LabeledData
from fewshot_bench.errors import FsbenchError, InputDataError, ManifestError, ProtocolError
from fewshot_bench.methods.base import FitSource, TaskContext
from fewshot_bench.methods.registry import get_method
from fewshot_bench.run.features import feature_cache_path, pool_features
from fewshot_bench.run.transport import send_request
from fewshot_bench.run.worker import MethodSpec, Worker, serve
from fewshot_bench.tasks.external import import_episodes, import_task_set
from fewshot_bench.tasks.manifest import (
    get_manifest,
    imported_manifest_path,
    load_task_sets,
    manifest_dir,
    manifest_path,
)
from fewshot_bench.tasks.protocol import load_pool, load_protocol_file, resolve_protocols

REPO = Path(__file__).resolve().parents[1]
EPISODES = 'name = "{name}"\n[dataset]\nname = "omniglot"\nsplits = ["test"]\n[episodes]\n'


@pytest.fixture(scope="module")
def proto():
    """omniglot-5w1s with 20 tasks per seed (quick to sample and re-derive)."""
    p = resolve_protocols("omniglot-5w1s")[0]
    return replace(p, params={**p.params, "n_tasks": 20})


@pytest.fixture(scope="module")
def pool(proto, shared_data):
    return load_pool(proto, shared_data)


@pytest.fixture(scope="module")
def small(pool) -> LabeledData:
    """The first 100 images of the pool (5 classes), as their own data set."""
    d = pool.data
    return LabeledData(
        name="omniglot",
        split="test[:100]",
        labels=d.labels[:100],
        class_names=d.class_names,
        images=d.images[:100].clone(),
    )


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


# ----------------------------------------------------------------------- 1. protocol names


@pytest.mark.parametrize(
    "name",
    ["../../../x", "a/b", "/abs", ".hidden", "a..b", "..", "", "x" * 200, "sp ace", "tab\tx"],
)
def test_unsafe_protocol_names_are_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(EPISODES.format(name=name.replace("\t", "\\t")))
    with pytest.raises(ProtocolError) as err:
        load_protocol_file(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: protocol name {name!r} is not allowed: use 1-128 characters")
    assert "not starting with '.'" in msg and "without '..'" in msg


def test_non_string_and_generated_names(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(EPISODES.replace('"{name}"', "5"))
    with pytest.raises(ProtocolError, match="protocol name 5 is not allowed"):
        load_protocol_file(path)
    for ok in ("omniglot-5w1s", "a.b_c-1", "X9"):
        path.write_text(EPISODES.format(name=ok))
        assert load_protocol_file(path)[0].name == ok
    # an SSL sweep appends its budgets: still safe names
    path.write_text(
        'name = "fm"\n[dataset]\nname = "fashion-mnist"\nsplits = ["train", "test"]\n'
        '[ssl]\nlabeled_split = "train"\nquery_split = "test"\nlabel_fraction = [0.01, 0.125]\n'
    )
    assert [p.name for p in load_protocol_file(path)] == ["fm-1pct", "fm-12.5pct"]


def test_no_manifest_path_escapes_the_workdir(proto, pool, tmp_path: Path) -> None:
    """A Protocol built in code (not parsed) with a hostile name, a symlink leading out of the
    workdir, a hostile seed: refused before anything is written, also by the import."""
    work, outside = tmp_path / "work", tmp_path / "outside"
    outside.mkdir()
    evil = replace(proto, name="../../outside/x")
    for call in (
        lambda: manifest_path(work, evil, 0),
        lambda: imported_manifest_path(work, evil),
        lambda: get_manifest(evil, pool, 0, work),
        lambda: load_task_sets(evil, pool, work, None),
        lambda: import_task_set(tmp_path / "none.jsonl", evil, pool, work),
    ):
        with pytest.raises(
            ProtocolError, match=r"protocol name '\.\./\.\./outside/x' is not allowed"
        ):
            call()
    (work / "manifests").mkdir(parents=True)
    (work / "manifests" / "linked").symlink_to(outside, target_is_directory=True)
    linked = replace(proto, name="linked")
    with pytest.raises(ProtocolError, match=re.escape(f"resolves to {outside}, outside")):
        get_manifest(linked, pool, 0, work)
    for seed in (-1, "../x", True):
        with pytest.raises(ProtocolError, match="a seed must be an integer >= 0"):
            manifest_path(work, proto, seed)  # type: ignore[arg-type]
    assert _files_under(outside) == set()
    assert _files_under(work) == {work / "manifests", work / "manifests" / "linked"}
    # the normal case still works and stays inside
    assert manifest_dir(work, proto) == work / "manifests" / proto.name
    assert get_manifest(proto, pool, 0, work).n_tasks == 20
    assert (work / "manifests" / proto.name / "seed-0.npz").is_file()


def test_imagefolder_split_names_stay_in_their_folder(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "train" / "a").mkdir(parents=True)
    for split in ("../imgs", "train/a", ".."):
        with pytest.raises(ProtocolError, match="is not a folder name"):
            load_dataset("imagefolder", split, path=tmp_path / "imgs")


# ----------------------------------------------------------------------- 2. protocol values

X = EPISODES.format(name="x")
VALUE_ERRORS = [
    (
        'name = "x"\ndataset = "mnist"\n[episodes]\n',
        'dataset = "mnist" must be a table, not a string: write [dataset] on its own line, '
        'then name = "mnist" and splits = ["test"] below it',
    ),
    (
        'name = "x"\ndataset = ["mnist"]\n[episodes]\n',
        'dataset = ["mnist"] must be a table, not a list',
    ),
    (X + 'n_way = "5"\n', "n_way must be an integer >= 1, got '5' (a string: write"),
    (X + "n_way = 5.0\n", "n_way must be an integer >= 1, got 5.0 (write 5, without"),
    (X + "n_query = -1\n", "n_query must be an integer >= 0, got -1"),
    (X + "n_tasks = 0\n", "n_tasks must be an integer >= 1, got 0"),
    (X + "k_shot = true\n", "k_shot must be an integer >= 1, got True"),
    (X + "labeled_fraction = true\n", "labeled_fraction must be in (0, 1], got True"),
    (X + "n_wya = 5\n", "unknown key(s) ['n_wya'] in [episodes]"),
    (X + "[run]\nseeds = 3\n", "[run] seeds must be a non-empty list of integers >= 0"),
    (X + "[run]\nseeds = [true]\n", "[run] seeds must be a non-empty list"),
    (X + '[run]\ntop5 = "yes"\n', "[run] top5 must be true or false"),
    (X + "[run]\nbackbone = 3\n", "[run] backbone must be a string (in quotes)"),
    (
        'name = "x"\nrun = "fast"\n[dataset]\nname = "omniglot"\nsplits = ["test"]\n[episodes]\n',
        'run = "fast" must be a table, not a string',
    ),
    (
        'name = "x"\nepisodes = 5\n[dataset]\nname = "omniglot"\nsplits = ["test"]\n',
        "episodes = 5 must be a table, not an integer",
    ),
    (
        'name = "x"\n[dataset]\nname = 7\nsplits = ["test"]\n[episodes]\n',
        "[dataset] name must be a string (in quotes), got integer 7",
    ),
    (
        'name = "x"\n[dataset]\nname = "omniglot"\nsplits = ["test"]\nimage_size = "28"\n'
        "[episodes]\n",
        "[dataset] image_size must be an integer >= 1",
    ),
    (
        'name = "x"\n[dataset]\nname = "omniglot"\nsplits = ["test"]\noptions = "p"\n[episodes]\n',
        '[dataset] options = "p" must be a table, not a string',
    ),
    (
        'name = "x"\n[dataset]\nname = "fashion-mnist"\nsplits = ["train", "test"]\n[ssl]\n'
        'labeled_split = "train"\nquery_split = "test"\nn_labels = "250"\n',
        "[ssl] n_labels must be a non-empty list of numbers, e.g. n_labels = [250, 4000]",
    ),
    (
        'name = "x"\n[dataset]\nname = "fashion-mnist"\nsplits = ["train", "test"]\n[ssl]\n'
        'labeled_split = "train"\nquery_split = "test"\nn_labels = [-5]\n',
        "[ssl] n_labels entries must be an integer >= 1, got -5",
    ),
    ('name = "x"\ndescription = 3\n' + X.split("\n", 1)[1], "description must be a string"),
    ('name = "x"\nextra = 1\n' + X.split("\n", 1)[1], "unknown key(s) ['extra'] in [top level]"),
]


@pytest.mark.parametrize(("text", "needle"), VALUE_ERRORS, ids=[n[:40] for _, n in VALUE_ERRORS])
def test_wrongly_typed_values_give_one_line_errors(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ProtocolError) as err:
        load_protocol_file(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    assert needle in msg


def test_a_scalar_n_labels_is_one_budget(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        'name = "fm"\n[dataset]\nname = "fashion-mnist"\nsplits = ["train", "test"]\n[ssl]\n'
        'labeled_split = "train"\nquery_split = "test"\nn_labels = 250\n'
    )
    assert [p.name for p in load_protocol_file(path)] == ["fm-250"]


def test_unreadable_protocol_files(tmp_path: Path) -> None:
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00name")
    with pytest.raises(ProtocolError, match="not UTF-8 text"):
        load_protocol_file(tmp_path / "bin.toml")
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ProtocolError, match="cannot be read"):
        load_protocol_file(tmp_path / "dir.toml")


# ----------------------------------------------------------------------- 3. stale temp files

WRITER = textwrap.dedent("""
    import sys, time
    from fewshot_bench.atomic import atomic_path
    with atomic_path(sys.argv[1], suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"x" * 2_000_000)
        print(tmp, flush=True)
        time.sleep(120)
""")


def test_temp_file_of_a_killed_writer_is_removed_on_the_next_write(
    proto, pool, tmp_path: Path
) -> None:
    """A real writer process holds a 2 MB temporary manifest: left alone while it lives; after
    kill -9 the next ``get_manifest`` in that folder removes it (and writes the manifest)."""
    target = manifest_path(tmp_path, proto, 0)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        tmp = Path(writer.stdout.readline().strip())
        assert tmp.parent == target.parent and tmp.stat().st_size == 2_000_000
        assert f".w{writer.pid}-" in tmp.name
        assert remove_stale_temps(tmp.parent) == [] and tmp.exists()  # a live writer's file
        assert remove_stale_temps(tmp.parent, max_age=0) == [] and tmp.exists()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
    assert tmp.exists() and not target.exists()  # what kill -9 leaves behind
    manifest = get_manifest(proto, pool, 0, tmp_path)
    assert not tmp.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["seed-0.npz"]
    assert manifest.n_tasks == 20


def test_stale_feature_cache_temp_is_removed(small, tmp_path, monkeypatch) -> None:
    """A 2 MB temporary file of a dead process (pid of a finished child) in the feature cache is
    removed when features are next computed there; one of a live process is kept."""
    monkeypatch.setenv("FSBENCH_CACHE", str(tmp_path))
    embedder = PixelEmbedder()
    folder = feature_cache_path(small, embedder).parent
    folder.mkdir(parents=True)
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    dead = folder / f".omniglot-abc.pt.{owner_tag(done.pid)}.k2j4h5g6.tmp"
    live = folder / f".omniglot-def.pt.{owner_tag(os.getppid())}.a1b2c3d4.tmp"
    for p in (dead, live):
        p.write_bytes(b"\0" * 2_000_000)
    feats = pool_features(small, embedder, torch.device("cpu"))
    assert feats.shape == (100, 28 * 28)
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        feature_cache_path(small, embedder).name
    ]


def test_unowned_temp_files_go_only_when_old_and_closed(tmp_path: Path) -> None:
    """Temporary files without an owner in their name (written by older versions, or on
    another machine): removed once unmodified for max_age and open in no process; other files
    are never touched."""
    old, fresh, held = (
        tmp_path / f".{stem}.npz.ab12cd_9.tmp.npz" for stem in ("old", "new", "held")
    )
    others = [tmp_path / n for n in (".hidden", "x.tmp", "seed-0.npz", ".x.tmp.npz", ".a.b.tmp")]
    for p in (old, fresh, held, *others):
        p.write_bytes(b"data")
    long_ago = time.time() - 3600
    for p in (old, held, *others):
        os.utime(p, (long_ago, long_ago))
    with open(held, "rb"):
        removed = remove_stale_temps(tmp_path)
    assert removed == [old]
    assert fresh.exists() and held.exists() and all(p.exists() for p in others)
    assert remove_stale_temps(tmp_path) == [held]


# ----------------------------------------------------------------------- 4. overflowing features


def test_features_near_float32_max_are_refused(tmp_path: Path) -> None:
    feats = np.full((6, 4), 3e38, dtype=np.float32)
    with np.errstate(over="ignore"):
        assert np.isfinite(feats).all() and not np.isfinite((feats**2).sum(1)).any()
    np.savez(tmp_path / "big.npz", features=feats, labels=np.arange(6) % 2)
    with pytest.raises(InputDataError) as err:
        load_dataset("features", "all", path=tmp_path / "big.npz")
    msg = str(err.value)
    assert str(tmp_path / "big.npz") in msg
    assert "too large for float32 arithmetic: row 0 has squared L2 norm 3.6e+77" in msg
    assert "normalise or rescale the features" in msg
    # large but harmless values pass
    ok = np.full((6, 4), 1e18, dtype=np.float32)
    np.savez(tmp_path / "ok.npz", features=ok, labels=np.arange(6) % 2)
    assert load_dataset("features", "all", path=tmp_path / "ok.npz").features.shape == (6, 4)
    # NaN still errors, naming the rows
    ok[4, 1] = np.nan
    np.savez(tmp_path / "nan.npz", features=ok, labels=np.arange(6) % 2)
    with pytest.raises(InputDataError, match=r"NaN or inf \(first bad rows \[4\]\)"):
        load_dataset("features", "all", path=tmp_path / "nan.npz")


class ScaledPixels(Embedder):
    """Pixels times ``scale``: what a diverged backbone may return."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.identity = f"scaled-pixels/{scale:g}"

    def embed(self, images, device, batch_size=512):
        return images.reshape(len(images), -1).float().mul_(self.scale)


def test_backbone_features_that_overflow_are_refused(small, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FSBENCH_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    with pytest.raises(InputDataError) as err:
        pool_features(small, ScaledPixels(1e36), cpu)  # 255e36 per pixel: finite in float32
    msg = str(err.value)
    assert msg.startswith("backbone scaled-pixels/1e+36 features on omniglot: they are too large")
    assert "normalise or rescale the features" in msg
    with pytest.raises(InputDataError, match="produced NaN/inf features"):
        pool_features(small, ScaledPixels(float("inf")), cpu)
    assert not (tmp_path / "features").exists() or not any((tmp_path / "features").iterdir())
    assert pool_features(small, ScaledPixels(1e10), cpu).shape == (100, 784)  # fine


def test_overflowing_cache_entry_is_recomputed(small, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FSBENCH_CACHE", str(tmp_path))
    embedder = PixelEmbedder()
    path = feature_cache_path(small, embedder)
    path.parent.mkdir(parents=True)
    torch.save(torch.full((100, 784), 3e38), path)
    with pytest.warns(UserWarning, match="are too large for float32"):
        feats = pool_features(small, embedder, torch.device("cpu"))
    assert torch.equal(feats, embedder.embed(small.images, torch.device("cpu")))


# ----------------------------------------------------------------------- 5. crafted pickles


class Payload:
    """Unpickling this runs ``touch MARKER`` (or, with ``how="open"``, creates it with open)."""

    def __init__(self, marker: Path, how: str = "system") -> None:
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "open":
            return (open, (self.marker, "w"))
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture(params=["system", "open"])
def evil(request, tmp_path: Path):
    """(marker path, payload object); the marker must never exist after a load."""
    marker = tmp_path / f"PWNED-{request.param}"
    yield marker, Payload(marker, request.param)
    assert not marker.exists(), "a crafted pickle ran code"


def _pt(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def test_the_payload_is_live(evil, tmp_path: Path) -> None:
    """Loaded unsafely, each crafted file does run its code (so the tests below mean something)."""
    marker, payload = evil
    for load in (
        lambda: torch.load(_pt(tmp_path / "e.pt", payload), weights_only=False),
        lambda: pickle.loads(pickle.dumps(payload)),
        lambda: np.load(_npy(tmp_path / "e.npy", payload), allow_pickle=True),
    ):
        load()
        assert marker.exists()
        marker.unlink()


def _npy(path: Path, payload: object) -> Path:
    arr = np.empty(2, dtype=object)
    arr[0] = arr[1] = payload
    np.save(path, arr, allow_pickle=True)
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_checkpoint_loader_refuses_pickles(evil, tmp_path: Path) -> None:
    marker, payload = evil
    for obj in (payload, {"format": "fewshot-bench/pretrain-v1", "state_dict": payload}):
        path = _pt(tmp_path / "ckpt.pt", obj)
        with pytest.raises(InputDataError, match=f"checkpoint {path} cannot be read"):
            load_checkpoint(path)
        with pytest.raises(InputDataError, match="cannot be read"):
            get_embedder(f"checkpoint:{path}")
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(payload))
    with pytest.raises(InputDataError, match="cannot be read"):
        load_checkpoint(tmp_path / "raw.pt")


@pytest.mark.parametrize("method", ["protonet", "soft-kmeans", "maml"])
def test_init_file_refuses_pickles(evil, tmp_path: Path, small, method: str) -> None:
    """``-m METHOD:init=FILE`` loads FILE when the method fits; a crafted FILE is refused."""
    marker, payload = evil
    path = _pt(tmp_path / "state.pt", {"arch": "conv4", "geometry": payload})
    source = FitSource(small.images, small.labels, "images", small.class_names)
    m = get_method(method)(init=str(path))
    with pytest.raises(FsbenchError, match=f"init state {path} cannot be read as a saved state"):
        m.fit(source, 0, TaskContext.create(0))


def test_finetune_init_checkpoint_refuses_pickles(evil, tmp_path: Path) -> None:
    marker, payload = evil
    path = _pt(tmp_path / "ckpt.pt", payload)
    with pytest.raises(InputDataError, match="cannot be read"):
        get_method("finetune")(init=str(path)).build_network(1, 28, 5, 0)


def test_feature_cache_refuses_pickles(evil, small, tmp_path: Path, monkeypatch) -> None:
    """A crafted cache entry is never run: it is reported and replaced by real features."""
    marker, payload = evil
    monkeypatch.setenv("FSBENCH_CACHE", str(tmp_path / "cache"))
    embedder = PixelEmbedder()
    path = feature_cache_path(small, embedder)
    path.parent.mkdir(parents=True)
    _pt(path, payload)
    with pytest.warns(UserWarning, match=f"feature cache entry {path} is unusable") as warned:
        feats = pool_features(small, embedder, torch.device("cpu"))
    assert torch.equal(feats, embedder.embed(small.images, torch.device("cpu")))
    assert torch.equal(torch.load(path, weights_only=True), feats)  # replaced
    why = "it holds objects other than tensors, which weights-only loading refused unrun"
    assert any(why in str(w.message) for w in warned)


def test_feature_files_refuse_pickles(evil, tmp_path: Path) -> None:
    marker, payload = evil
    obj = np.empty(2, dtype=object)
    obj[0] = obj[1] = payload
    np.savez(tmp_path / "f.npz", features=obj, labels=np.zeros(2, dtype=int))
    with pytest.raises(InputDataError, match="no pickled objects"):
        load_dataset("features", "all", path=tmp_path / "f.npz")
    np.savez(tmp_path / "g.npz", features=np.ones((2, 2)), labels=obj)
    with pytest.raises(InputDataError, match="no pickled objects"):
        load_dataset("features", "all", path=tmp_path / "g.npz")
    _npy(tmp_path / "features.npy", payload)
    np.save(tmp_path / "labels.npy", np.zeros(2, dtype=int))
    with pytest.raises(InputDataError, match="no pickled objects"):
        load_dataset("features", "all", path=tmp_path / "features.npy")


def test_task_set_import_and_manifests_refuse_pickles(evil, proto, pool, tmp_path: Path) -> None:
    marker, payload = evil
    (tmp_path / "e.jsonl").write_bytes(pickle.dumps(payload))
    with pytest.raises(ManifestError, match="not UTF-8 text"):
        import_task_set(tmp_path / "e.jsonl", proto, pool, tmp_path / "w")
    (tmp_path / "e0.jsonl").write_bytes(pickle.dumps(payload, protocol=0))  # ASCII
    with pytest.raises(ManifestError, match="not valid JSON"):
        import_episodes(tmp_path / "e0.jsonl", proto, pool)
    _pt(tmp_path / "e.pt", payload)
    with pytest.raises(ManifestError, match="not UTF-8 text"):
        import_episodes(tmp_path / "e.pt", proto, pool)
    # a planted manifest (imported or sampled) holding pickled objects
    header = np.empty(1, dtype=object)
    header[0] = payload
    for target in (imported_manifest_path(tmp_path, proto), manifest_path(tmp_path, proto, 0)):
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as fh:
            np.savez(fh, header=header, support=header)
        with pytest.raises(ManifestError, match="is corrupt or not a manifest"):
            load_task_sets(proto, pool, tmp_path, None)
        target.unlink()


def test_cifar_batches_refuse_pickles(evil, tmp_path: Path) -> None:
    marker, payload = evil
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({"data": payload, "labels": [0]}))
    with pytest.raises(InputDataError, match=r"test_batch is not a readable CIFAR python batch"):
        load_dataset("cifar10", "test", tmp_path)


def test_worker_refuses_pickled_state_bytes(evil) -> None:
    """The trained-state bytes the runner hands a worker (from its state cache) are loaded with
    weights_only: a crafted state is an error reply (the runner then trains again)."""
    marker, payload = evil
    buf = io.BytesIO()
    torch.save({"arch": "conv4", "geometry": payload}, buf)
    with pytest.raises(FsbenchError, match="refused unrun"):
        Worker().op_open(1, MethodSpec("protonet"), "cpu", None, buf.getvalue())
    # the same through the worker's request loop, as the runner sees it
    runner_end, worker_end = Pipe()
    thread = threading.Thread(target=serve, args=(worker_end, worker_end), daemon=True)
    thread.start()
    send_request(runner_end, None, ("open", 1, MethodSpec("protonet"), "cpu", None, buf.getvalue()))
    reply = json.loads(runner_end.recv_bytes())
    send_request(runner_end, None, ("exit",))
    thread.join(10)
    assert reply["kind"] == "user" and "is unreadable" in reply["error"]
    assert reply["n_blobs"] == 0
