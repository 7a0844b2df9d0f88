"""ImageNet low-shot over all test classes (issue 16): the [ssl] options fully_labeled,
query_classes and background, on generated feature files and a generated label_idx.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from run_helpers import run_quietly

from fewshot_bench.cli import main
from fewshot_bench.data import load_dataset
from fewshot_bench.data.base import LabeledData
from fewshot_bench.errors import InputDataError, ProtocolError
from fewshot_bench.run.runner import MethodSpec
from fewshot_bench.run.store import load_results
from fewshot_bench.tasks.manifest import get_manifest
from fewshot_bench.tasks.protocol import (
    BACKGROUND,
    Pool,
    add_background,
    all_protocols,
    concat_splits,
    load_pool,
    load_protocol_file,
)
from fewshot_bench.tasks.sampler import class_members, ssl_split, task_rng
from fewshot_bench.tasks.task import task_truth

# Eight generated wnids: base_classes_2 = 3 (test base), novel_classes_2 = 3 (test novel),
# one class in each of the val lists; label_names deliberately not sorted.
NAMES = [f"n{100 + 111 * i:08d}" for i in (5, 2, 7, 0, 3, 6, 1, 4)]
LISTS = {
    "base_classes_1": [1],
    "base_classes_2": [2, 4, 6],
    "novel_classes_1": [3],
    "novel_classes_2": [5, 7, 8],
}
BASE = sorted(NAMES[i - 1] for i in LISTS["base_classes_2"])
NOVEL = sorted(NAMES[i - 1] for i in LISTS["novel_classes_2"])
TEST = sorted(BASE + NOVEL)
N_TRAIN, N_VAL, N_BG, DIM = 6, 2, 10, 8


def _write_features(folder: Path, per_split: dict[str, int], dim: int = DIM, seed: int = 0) -> None:
    """<folder>/<split>.npy, _labels.npy, _ids.txt and class_names.txt (sorted NAMES): one
    well-separated Gaussian per class."""
    folder.mkdir(parents=True, exist_ok=True)
    classes = sorted(NAMES)
    (folder / "class_names.txt").write_text("\n".join(classes) + "\n")
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(len(classes), dim)) * 4
    for split, per in per_split.items():
        labels = np.repeat(np.arange(len(classes)), per)
        feats = means[labels] + 0.1 * rng.normal(size=(len(labels), dim))
        np.save(folder / f"{split}.npy", feats.astype(np.float32))
        np.save(folder / f"{split}_labels.npy", labels)
        (folder / f"{split}_ids.txt").write_text(
            "\n".join(f"{split}/{i}.JPEG" for i in range(len(labels))) + "\n"
        )


def _write_background(folder: Path, n: int = N_BG, dim: int = DIM, dtype=np.float16) -> None:
    """<folder>/yfcc.npy: extra items of another source; its labels file is all zeros (unused)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(9)
    np.save(folder / "yfcc.npy", rng.normal(size=(n, dim)).astype(dtype))
    np.save(folder / "yfcc_labels.npy", np.zeros(n, dtype=np.int64))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A data root with imagenet-features/r50/{train,val,yfcc} and label_idx.json."""
    data = tmp_path / "data"
    _write_features(data / "imagenet-features" / "r50", {"train": N_TRAIN, "val": N_VAL})
    _write_background(data / "imagenet-features" / "r50")
    (data / "imagenet-features" / "label_idx.json").write_text(
        json.dumps({"label_names": NAMES, **LISTS})
    )
    return data


def _protocol_file(path: Path, n_labels: object = 3, subset: str = "lowshot-test", **ssl) -> Path:
    """A low-shot protocol file: [ssl] with ``ssl``'s extra keys (values in TOML syntax)."""
    lines = "\n".join(f"{k} = {v}" for k, v in ssl.items())
    path.write_text(
        f'name = "{path.stem}"\n'
        "[dataset]\n"
        'name = "imagenet-features"\n'
        'splits = ["train", "val"]\n'
        f'options = {{ subset = "{subset}", backbone = "r50" }}\n'
        "[ssl]\n"
        'labeled_split = "train"\n'
        'query_split = "val"\n'
        f"n_labels = {n_labels}\n"
        f"{lines}\n"
        "[run]\n"
        "seeds = [1, 2]\n"
        "top5 = true\n"
    )
    return path


def _one(path: Path):
    (proto,) = load_protocol_file(path)
    return proto


BG = '{ dataset = "imagenet-features", split = "yfcc", options = { backbone = "r50" } }'


def test_lowshot_test_subset_exposes_base_and_novel_groups(root: Path) -> None:
    train = load_dataset("imagenet-features", "train", root, subset="lowshot-test")
    assert train.class_names == TEST
    assert train.meta["class_groups"] == {"base": BASE, "novel": NOVEL}
    val = load_dataset("imagenet-features", "train", root, subset="lowshot-val")
    assert val.meta["class_groups"] == {"base": [NAMES[0]], "novel": [NAMES[2]]}
    novel = load_dataset("imagenet-features", "train", root, subset="lowshot-test-novel")
    assert "class_groups" not in novel.meta  # a single-list subset has no groups
    plain = load_dataset("imagenet-features", "train", root)
    assert "class_groups" not in plain.meta
    pool = concat_splits(
        [train, load_dataset("imagenet-features", "val", root, subset="lowshot-test")]
    )
    assert pool.class_groups == {"base": BASE, "novel": NOVEL} and pool.n_task_classes == 6


def test_builtin_lowshot_all_protocols() -> None:
    protos = all_protocols()
    for family, query in (
        ("imagenet-lowshot-all", None),
        ("imagenet-lowshot-novel-in-all", "novel"),
    ):
        members = [p for p in protos.values() if p.family == family]
        assert [p.params["n_labels"] for p in members] == [311 * n for n in (1, 2, 5, 10, 20)]
        for p in members:
            assert p.dataset["options"] == {"subset": "lowshot-test"}
            assert p.params["fully_labeled"] == "base" and p.params.get("query_classes") == query
            assert "background" not in p.params
            assert p.run == {"seeds": [1, 2, 3, 4, 5], "top5": True, "backbone": "pixels"}
    # protocols without the new keys keep their parameters (and so their hash and manifests)
    novel = protos["imagenet-lowshot-novel-311"]
    assert novel.params == {"labeled_split": "train", "query_split": "val", "n_labels": 311}
    for p in protos.values():
        if p.kind == "ssl" and "lowshot-all" not in p.family and "in-all" not in p.family:
            assert not {"fully_labeled", "query_classes", "background"} & set(p.params)


def _reference_ssl_split(pool: Pool, params: dict, seed: int):
    """The balanced draw as it was before the new options (support, unlabeled, query)."""
    labels = pool.data.labels
    lab_idx = pool.indices_of_split(params["labeled_split"])
    n_classes, n_labels = pool.data.n_classes, params["n_labels"]
    rng = task_rng(seed, 0)
    per_class = np.full(n_classes, n_labels // n_classes)
    per_class[rng.permutation(n_classes)[: n_labels % n_classes]] += 1
    members = class_members(labels[lab_idx], n_classes)
    chosen = np.concatenate(
        [rng.choice(members[c], size=per_class[c], replace=False) for c in range(n_classes)]
    )
    support = lab_idx[np.sort(chosen)]
    return support, np.setdiff1d(lab_idx, support), pool.indices_of_split(params["query_split"])


@pytest.mark.parametrize("n_labels", [6, 8, 13])
def test_plain_draw_is_unchanged(root: Path, tmp_path: Path, n_labels: int) -> None:
    proto = _one(_protocol_file(tmp_path / "plain.toml", n_labels=f"[{n_labels}]"))
    pool = load_pool(proto, root)
    for seed in (1, 2, 7):
        task = ssl_split(pool, proto.params, seed)
        support, unlabeled, query = _reference_ssl_split(pool, proto.params, seed)
        assert np.array_equal(task.support, support)
        assert np.array_equal(task.unlabeled, unlabeled)
        assert np.array_equal(task.query, query)


def test_all_classes_labeled_set_and_queries(root: Path, tmp_path: Path) -> None:
    every = _one(_protocol_file(tmp_path / "every.toml", n_labels=6, fully_labeled='"base"'))
    novel = _one(
        _protocol_file(
            tmp_path / "novel.toml", n_labels=6, fully_labeled='"base"', query_classes='"novel"'
        )
    )
    pool = load_pool(every, root)
    labels, names = pool.data.labels, pool.data.class_names
    base = [names.index(w) for w in BASE]
    nov = [names.index(w) for w in NOVEL]
    train, val = pool.indices_of_split("train"), pool.indices_of_split("val")
    a1, n1 = ssl_split(pool, every.params, 1), ssl_split(pool, novel.params, 1)
    for task in (a1, n1):
        assert task.classes.tolist() == list(range(6))  # scored among all 507 (here 6) classes
        # every base train item is labeled, and n = 2 per novel class
        counts = np.bincount(labels[task.support], minlength=6)
        assert counts[base].tolist() == [N_TRAIN] * 3 and counts[nov].tolist() == [2] * 3
        assert np.array_equal(task.support_labels, labels[task.support])
        # the rest of the novel train items are unlabeled; queries are val items only
        assert np.array_equal(np.sort(np.concatenate([task.support, task.unlabeled])), train)
        assert set(labels[task.unlabeled]) == set(nov)
        assert not set(task.query) & set(task.support) and set(task.query) <= set(val)
    assert np.array_equal(a1.query, val)  # all classes' val items
    assert np.array_equal(n1.query, val[np.isin(labels[val], nov)])  # novel val items only
    assert len(n1.query) == 3 * N_VAL
    # the two protocols share labeled and unlabeled sets; seeds draw differently
    assert np.array_equal(a1.support, n1.support) and np.array_equal(a1.unlabeled, n1.unlabeled)
    assert not np.array_equal(a1.support, ssl_split(pool, every.params, 2).support)
    assert np.array_equal(a1.support, ssl_split(pool, every.params, 1).support)
    # uneven n_labels: the novel classes share them, the base classes stay fully labeled
    odd = ssl_split(pool, {**every.params, "n_labels": 7}, 1)
    assert sorted(np.bincount(labels[odd.support], minlength=6)[nov].tolist()) == [2, 2, 3]
    # a list of class names works like a group; label_fraction counts the other classes' items
    listed = ssl_split(pool, {**every.params, "fully_labeled": BASE}, 1)
    assert np.array_equal(listed.support, a1.support)
    frac = {k: v for k, v in every.params.items() if k != "n_labels"} | {"label_fraction": 0.5}
    half = ssl_split(pool, frac, 1)
    assert np.bincount(labels[half.support], minlength=6)[nov].tolist() == [3] * 3


def test_background_items_are_unlabeled_only(root: Path, tmp_path: Path) -> None:
    proto = _one(
        _protocol_file(tmp_path / "bg.toml", n_labels=6, fully_labeled='"base"', background=BG)
    )
    assert proto.params["background"] == {
        "dataset": "imagenet-features",
        "split": "yfcc",
        "options": {"backbone": "r50"},
    }
    plain = load_pool(
        _one(_protocol_file(tmp_path / "p.toml", n_labels=6, fully_labeled='"base"')), root
    )
    pool = load_pool(proto, root)
    n = len(plain.data)
    assert len(pool.data) == n + N_BG and pool.split_names == ["train", "val", BACKGROUND]
    assert pool.background_class == 6 and pool.n_task_classes == 6
    assert pool.data.class_names == [*TEST, BACKGROUND]
    assert pool.fingerprint() != plain.fingerprint()
    bg = pool.indices_of_split(BACKGROUND)
    assert bg.tolist() == list(range(n, n + N_BG))
    # float16 background features take the pool's float32, values kept
    raw = np.load(root / "imagenet-features" / "r50" / "yfcc.npy")
    assert pool.data.features.dtype == torch.float32
    assert torch.equal(pool.data.features[n:], torch.from_numpy(raw).float())
    assert pool.data.item_ids[n] == f"{BACKGROUND}/imagenet-features[yfcc]/yfcc/0"
    task = ssl_split(pool, proto.params, 1)
    without = ssl_split(plain, {k: v for k, v in proto.params.items() if k != "background"}, 1)
    assert np.array_equal(task.support, without.support)
    assert np.array_equal(task.query, without.query)
    assert set(bg) <= set(task.unlabeled)
    assert not set(bg) & (set(task.support) | set(task.query))
    assert np.array_equal(np.setdiff1d(task.unlabeled, bg), without.unlabeled)
    assert np.array_equal(task.classes, np.arange(6))  # the background is no class of a task
    truth = task_truth(task, pool.data.labels)  # background items count as distractors
    assert (truth.unlabeled_labels[np.isin(task.unlabeled, bg)] == -1).all()
    assert (truth.unlabeled_labels[~np.isin(task.unlabeled, bg)] >= 0).all()
    # the pool of a background protocol must be loaded with its background
    with pytest.raises(ProtocolError, match="loaded without it"):
        ssl_split(plain, proto.params, 1)


@pytest.mark.parametrize(
    ("ssl", "needle"),
    [
        ({"fully_labeled": "3"}, "fully_labeled must be a class group"),
        ({"fully_labeled": "[]"}, "fully_labeled must be a class group"),
        ({"query_classes": '["a", "a"]'}, "query_classes must be a class group .*distinct"),
        ({"background": '"yfcc"'}, r"\[ssl\] background = \"yfcc\" must be a table"),
        ({"background": '{ dataset = "features" }'}, "background needs split"),
        ({"background": '{ dataset = "x", split = "y", path = "z" }'}, r"unknown key.*\['path'\]"),
        (
            {"background": '{ dataset = "x", split = "y", options = 3 }'},
            "options = 3 must be a table",
        ),
    ],
)
def test_bad_options_are_refused_when_parsed(tmp_path: Path, ssl: dict, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        load_protocol_file(_protocol_file(tmp_path / "bad.toml", **ssl))


@pytest.mark.parametrize(
    ("ssl", "subset", "error", "needle"),
    [
        (
            {"fully_labeled": '"rare"'},
            "lowshot-test",
            ProtocolError,
            r"no class group .*'base', 'novel'",
        ),
        (
            {"query_classes": '"novel"'},
            "lowshot-test-novel",
            ProtocolError,
            "exposes no class groups",
        ),
        (
            {"fully_labeled": '["n00000000", "cat"]'},
            "lowshot-test",
            ProtocolError,
            "2 class.*'cat'",
        ),
        (
            {"fully_labeled": f"{json.dumps(TEST)}"},
            "lowshot-test",
            ProtocolError,
            "covers all 6 classes",
        ),
        (
            {"fully_labeled": '"base"', "n_labels": 2},
            "lowshot-test",
            ProtocolError,
            "cannot cover 3 classes not in fully_labeled",
        ),
        (
            {"fully_labeled": '"base"', "n_labels": 18},
            "lowshot-test",
            ProtocolError,
            "leave no unlabeled data",
        ),
        (
            {"background": BG.replace('"r50" }', '"r18" }')},
            "lowshot-test",
            InputDataError,
            r"feature dimension \(4,\) but the pool .* \(8,\); compute the background",
        ),
        (
            {
                "background": '{ dataset = "imagenet-features", split = "val", options = { backbone = "r50" } }'
            },
            "lowshot-test",
            ProtocolError,
            "shares 12 items with the pool",
        ),
    ],
)
def test_bad_options_are_refused_on_data(
    root: Path, tmp_path: Path, ssl: dict, subset: str, error: type, needle: str
) -> None:
    _write_background(root / "imagenet-features" / "r18", dim=4)
    proto = _one(_protocol_file(tmp_path / "bad.toml", subset=subset, **ssl))
    with pytest.raises(error, match=needle):
        ssl_split(load_pool(proto, root), proto.params, 1)


def test_background_of_another_kind_is_refused(root: Path) -> None:
    pool = concat_splits([load_dataset("imagenet-features", "train", root, subset="lowshot-test")])
    images = LabeledData(
        name="imagefolder",
        split="extra",
        labels=np.zeros(2),
        class_names=["x"],
        images=torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
    )
    with pytest.raises(InputDataError, match="holds images but the pool .* holds features"):
        add_background(pool, images, "p")


def test_runs_store_top5_over_all_classes(root: Path, tmp_path: Path) -> None:
    """Both protocols (with a background pool) run end to end; rows record top-5."""
    work = tmp_path / "w"
    every = _one(
        _protocol_file(tmp_path / "all6.toml", n_labels=3, fully_labeled='"base"', background=BG)
    )
    novel = _one(
        _protocol_file(
            tmp_path / "novel6.toml",
            n_labels=3,
            fully_labeled='"base"',
            query_classes='"novel"',
            background=BG,
        )
    )
    for proto in (every, novel):
        specs = [MethodSpec("nearest-prototype"), MethodSpec("diffusion")]
        summaries = run_quietly(proto, specs, work, root=root)
        assert sum(s.ran for s in summaries) == 4
        m = get_manifest(proto, load_pool(proto, root), 1, work)
        assert m.header["n_way"] == 6 and m.header["pool_size"] == 6 * (N_TRAIN + N_VAL) + N_BG
    df = load_results(work / "results.sqlite")
    assert len(df) == 2 * 2 * 2
    assert df.top5.notna().all() and (df.top5 >= df.accuracy).all()
    assert (df[df.method == "nearest-prototype"].accuracy > 0.9).all()
    n_query = df.groupby("protocol").n_query.unique().to_dict()
    assert n_query == {"all6-3": [6 * N_VAL], "novel6-3": [3 * N_VAL]}


def test_builtin_protocol_runs_from_the_cli(tmp_path: Path) -> None:
    """imagenet-lowshot-novel-in-all-311 on generated 1000-class features and a generated
    published-size split: 196 + 311 classes, 507-way scores, top-5 stored."""
    from test_imagenet import WNIDS, _write_generated_split
    from test_imagenet import _write_features as write_full

    root, work = tmp_path / "data", tmp_path / "runs"
    write_full(root / "imagenet-features" / "r50", {"train": 3, "val": 1}, classes=WNIDS)
    _write_generated_split(root / "imagenet-features" / "label_idx.json", seed=5)
    base = ["--workdir", str(work), "--data-root", str(root), "--quiet", "--seeds", "1"]
    for name in ("imagenet-lowshot-all-311", "imagenet-lowshot-novel-in-all-311"):
        assert main(["run", name, "-m", "nearest-prototype", *base]) == 0
    df = load_results(work / "results.sqlite").set_index("protocol")
    assert df.loc["imagenet-lowshot-all-311", "n_query"] == 507
    assert df.loc["imagenet-lowshot-novel-in-all-311", "n_query"] == 311
    assert (df.top5 >= df.accuracy).all() and (df.accuracy > 0.9).all()
    m = get_manifest(
        all_protocols()["imagenet-lowshot-all-311"],
        load_pool(all_protocols()["imagenet-lowshot-all-311"], root),
        1,
        work,
    )
    assert m.header["n_way"] == 507 and len(m.task(0).support) == 196 * 3 + 311
