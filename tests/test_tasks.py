"""Episode sampler, SSL splits, protocols and manifests on real Omniglot and Fashion-MNIST."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fewshot_bench.errors import ManifestError, ProtocolError
from fewshot_bench.tasks import manifest as manifest_mod
from fewshot_bench.tasks.external import export_episodes, import_episodes, import_task_set
from fewshot_bench.tasks.manifest import (
    build_manifest,
    check_manifest,
    get_manifest,
    imported_manifest_path,
    load_task_sets,
    manifest_path,
    read_manifest,
    save_manifest,
)
from fewshot_bench.tasks.protocol import (
    all_protocols,
    load_pool,
    load_protocol_file,
    resolve_protocols,
)
from fewshot_bench.tasks.sampler import EpisodeSampler, ssl_split
from fewshot_bench.tasks.task import task_truth


@pytest.fixture(scope="module")
def omniglot_pool(shared_data):
    return load_pool(resolve_protocols("omniglot-5w1s")[0], shared_data)


@pytest.fixture(scope="module")
def fashion_pool():
    return load_pool(resolve_protocols("fashion-mnist-ssl-250")[0])


def semi_params(**over):
    p = resolve_protocols("omniglot-semi-5w1s")[0].params
    return {**p, **over}


def test_builtin_protocols_parse():
    protos = all_protocols()
    for name in [
        "omniglot-5w1s",
        "omniglot-5w5s",
        "omniglot-20w1s",
        "omniglot-20w5s",
        "omniglot-semi-5w1s",
        "mini-imagenet-5w1s",
        "mini-imagenet-5w5s",
        "mini-imagenet-semi-5w1s",
        "cifar10-ssl-250",
        "fashion-mnist-ssl-50",
        "fashion-mnist-ssl-pct-1pct",
    ]:
        assert name in protos, name
    assert len(resolve_protocols("cifar10-ssl")) == 8
    assert {p.params["n_labels"] for p in resolve_protocols("cifar10-ssl")} == {
        50,
        100,
        250,
        500,
        1000,
        2000,
        4000,
        8000,
    }


def test_sampler_invariants_semi_with_distractors(omniglot_pool):
    data = omniglot_pool.data
    params = semi_params()
    sampler = EpisodeSampler(data.labels, data.n_classes, params)
    labeled = set(np.concatenate(sampler.labeled).tolist())
    for i in range(300):
        t = sampler.sample(seed=3, task_index=i)
        assert len(t.support) == 5 and len(t.query) == 25 and len(t.unlabeled) == 50
        everything = t.all_items()
        assert len(np.unique(everything)) == len(everything), "an image is in two roles"
        # episode labels map to the episode classes
        assert (data.labels[t.support] == t.classes[t.support_labels]).all()
        truth = task_truth(t, data.labels)
        assert (data.labels[t.query] == t.classes[truth.query_labels]).all()
        inside = truth.unlabeled_labels >= 0
        assert (data.labels[t.unlabeled[inside]] == t.classes[truth.unlabeled_labels[inside]]).all()
        # distractors: 5 classes x 5 items, disjoint from episode classes
        assert (~inside).sum() == 25
        distractor_classes = set(data.labels[t.unlabeled[~inside]].tolist())
        assert len(distractor_classes) == 5 and not distractor_classes & set(t.classes.tolist())
        # support/query come from the labeled part, unlabeled from the unlabeled part
        assert set(t.support.tolist()) <= labeled and set(t.query.tolist()) <= labeled
        assert not set(t.unlabeled.tolist()) & labeled
        assert len(set(t.classes.tolist())) == 5


def test_metric_transfer_pool_is_every_class_unlabeled_part(omniglot_pool):
    """unlabeled_pool = "all": every task's pool is the unlabeled 60% of every test class, in a
    per-task order; support and queries come from the labeled 40%."""
    data = omniglot_pool.data
    proto = resolve_protocols("omniglot-metric-transfer-5w5s-q3")[0]
    assert proto.params["unlabeled_pool"] == "all" and proto.params["n_tasks"] == 300
    sampler = EpisodeSampler(data.labels, data.n_classes, proto.params)
    labeled = set(np.concatenate(sampler.labeled).tolist())
    everything_unlabeled = np.sort(np.concatenate(sampler.unlabeled))
    assert len(everything_unlabeled) == 1692 * 12  # Vinyals test: 423 characters x 4 rotations
    orders = set()
    for i in range(5):
        t = sampler.sample(seed=0, task_index=i)
        assert len(t.support) == 25 and len(t.query) == 15
        assert np.array_equal(np.sort(t.unlabeled), everything_unlabeled)
        assert set(t.support.tolist()) | set(t.query.tolist()) <= labeled
        orders.add(tuple(t.unlabeled[:20].tolist()))
        # not sorted by class: a position says nothing about a label
        assert not np.all(np.diff(data.labels[t.unlabeled]) >= 0)
    assert len(orders) == 5
    # protocols without the key keep their hash (the key is only stored when "all")
    assert "unlabeled_pool" not in resolve_protocols("omniglot-semi-5w1s")[0].params


@pytest.mark.parametrize(
    ("episodes", "needle"),
    [
        ('unlabeled_pool = "most"', "must be 'episode' or 'all'"),
        ('unlabeled_pool = "all"', "needs labeled_fraction < 1"),
        ('unlabeled_pool = "all"\nlabeled_fraction = 0.4\nn_unlabeled = 5', "drop n_unlabeled"),
    ],
)
def test_bad_unlabeled_pool_is_refused(tmp_path, episodes, needle):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        f'name = "x"\n[dataset]\nname = "omniglot"\nsplits = ["test"]\n[episodes]\n{episodes}\n'
    )
    with pytest.raises(ProtocolError, match=needle):
        load_protocol_file(bad)


def test_sampler_is_seeded_per_episode(omniglot_pool):
    data = omniglot_pool.data
    params = semi_params()
    a = EpisodeSampler(data.labels, data.n_classes, params)
    b = EpisodeSampler(data.labels, data.n_classes, params)
    # order-independent: episode 7 is the same whether drawn first or after others
    t7 = a.sample(0, 7)
    for i in range(7):
        b.sample(0, i)
    u7 = b.sample(0, 7)
    assert all((getattr(t7, f) == getattr(u7, f)).all() for f in ("support", "query", "unlabeled"))
    assert not np.array_equal(a.sample(0, 8).support, t7.support)
    assert not np.array_equal(a.sample(1, 7).support, t7.support)


def test_determinism_across_processes(omniglot_pool, shared_data, tmp_path):
    proto = resolve_protocols("omniglot-semi-5w1s")[0]
    here = build_manifest(
        replace(proto, params={**proto.params, "n_tasks": 50}), omniglot_pool, seed=5
    )
    script = textwrap.dedent(f"""
        from dataclasses import replace
        from fewshot_bench.tasks.protocol import load_pool, resolve_protocols
        from fewshot_bench.tasks.manifest import build_manifest
        proto = resolve_protocols("omniglot-semi-5w1s")[0]
        pool = load_pool(proto, {str(shared_data)!r})
        m = build_manifest(replace(proto, params={{**proto.params, "n_tasks": 50}}), pool, seed=5)
        print(m.header["content_sha256"])
    """)
    env_hash = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "PYTHONHASHSEED": "123"},
    )
    assert env_hash.stdout.strip() == here.header["content_sha256"]


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"n_way": 1700}, "classes but the pool has 1692"),
        ({"k_shot": 5, "n_query": 5}, "labeled part"),
        ({"n_unlabeled": 13}, "n_unlabeled = 13"),
    ],
)
def test_impossible_protocols_are_refused(omniglot_pool, over, needle):
    data = omniglot_pool.data
    with pytest.raises(ProtocolError, match=needle):
        EpisodeSampler(data.labels, data.n_classes, semi_params(**over))


def test_impossible_plain_protocol(omniglot_pool):
    data = omniglot_pool.data
    params = {**resolve_protocols("omniglot-5w5s")[0].params, "n_query": 16}
    with pytest.raises(ProtocolError, match="= 21 images per class, but the smallest class has 20"):
        EpisodeSampler(data.labels, data.n_classes, params)


def test_bad_protocol_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'name = "x"\n[dataset]\nname = "omniglot"\nsplits = ["test"]\n[episodes]\nn_wya = 5\n'
    )
    with pytest.raises(ProtocolError, match="unknown key"):
        load_protocol_file(bad)
    bad.write_text(
        'name = "x"\n[dataset]\nname = "omniglot"\nsplits = ["test"]\n[episodes]\nk_shot = 0\n'
    )
    with pytest.raises(ProtocolError, match="k_shot must be an integer >= 1"):
        load_protocol_file(bad)
    bad.write_text("name = [")
    with pytest.raises(ProtocolError, match="invalid TOML"):
        load_protocol_file(bad)
    with pytest.raises(ProtocolError, match="unknown protocol"):
        resolve_protocols("no-such-protocol")


def test_unknown_dataset_is_refused(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "x"\n[dataset]\nname = "imagenet-99k"\nsplits = ["test"]\n[episodes]\n')
    with pytest.raises(ProtocolError, match="imagenet-99k"):
        load_pool(load_protocol_file(path)[0])


def test_ssl_split_balanced(fashion_pool):
    proto = resolve_protocols("fashion-mnist-ssl-250")[0]
    t = ssl_split(fashion_pool, proto.params, seed=1)
    labels = fashion_pool.data.labels
    assert len(t.support) == 250 and len(t.unlabeled) == 60000 - 250 and len(t.query) == 10000
    counts = np.bincount(labels[t.support], minlength=10)
    assert counts.min() == 25 and counts.max() == 25
    assert not set(t.support.tolist()) & set(t.unlabeled.tolist())
    assert (fashion_pool.split_of[t.query] == 1).all() and (
        fashion_pool.split_of[t.support] == 0
    ).all()
    other = ssl_split(fashion_pool, proto.params, seed=2)
    assert not np.array_equal(other.support, t.support)
    with pytest.raises(ProtocolError, match="cannot cover 10 classes"):
        ssl_split(fashion_pool, {**proto.params, "n_labels": 7}, seed=0)
    pct = resolve_protocols("fashion-mnist-ssl-pct-2pct")[0]
    assert len(ssl_split(fashion_pool, pct.params, seed=0).support) == 1200


def _rewrite(path: Path, *, header=None, arrays=None, rehash: bool) -> None:
    """Edit a stored manifest (header fields and/or arrays), optionally recomputing its hash."""
    with np.load(path) as z:
        head = json.loads(str(z["header"]))
        arrs = {k: z[k].copy() for k in z.files if k != "header"}
    head.update(header or {})
    arrs.update(arrays or {})
    if rehash:
        head["content_sha256"] = manifest_mod._content_hash(head, arrs)
    np.savez(path, header=np.array(json.dumps(head)), **arrs)


def _small(name: str, n_tasks: int, **run):
    proto = resolve_protocols(name)[0]
    return replace(proto, params={**proto.params, "n_tasks": n_tasks}, run={**proto.run, **run})


def test_manifest_round_trip_and_tamper(omniglot_pool, tmp_path):
    proto = _small("omniglot-5w1s", 40)
    m = get_manifest(proto, omniglot_pool, 0, tmp_path)
    path = manifest_path(tmp_path, proto, 0)
    again = get_manifest(proto, omniglot_pool, 0, tmp_path)
    assert again.header == m.header and again.content_hash == m.content_hash
    for i in (0, 17, 39):
        for f in ("support", "support_labels", "unlabeled", "query", "classes"):
            assert np.array_equal(getattr(again.task(i), f), getattr(m.task(i), f))

    # protocol changed under the same name -> refused
    changed = replace(proto, params={**proto.params, "n_query": 10})
    with pytest.raises(ManifestError, match="protocol file changed"):
        get_manifest(changed, omniglot_pool, 0, tmp_path)

    # tampered indices -> refused
    _rewrite(path, arrays={"support": m.arrays["support"] + 1}, rehash=False)
    with pytest.raises(ManifestError, match="modified after it was written"):
        read_manifest(path)

    # truncated file -> refused with the fix
    path.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ManifestError, match="corrupt"):
        read_manifest(path)


def test_manifest_holds_no_query_or_unlabeled_labels(omniglot_pool, tmp_path):
    proto = _small("omniglot-semi-5w1s", 5)
    get_manifest(proto, omniglot_pool, 0, tmp_path)
    with np.load(manifest_path(tmp_path, proto, 0)) as z:
        keys = set(z.files)
        header = json.loads(str(z["header"]))
    assert keys == {"header", *manifest_mod.ARRAY_KEYS}
    assert not any("query_labels" in k or "unlabeled_labels" in k for k in keys)
    assert not any("label" in k for k in header if k != "support_labels")
    for key in manifest_mod.HEADER_KEYS:
        assert key in header, key
    assert header["format"] == manifest_mod.FORMAT and header["n_query"] == 25
    assert header["n_way"] == 5 and header["source"] == "sampled"


def test_edited_header_n_tasks_is_refused(omniglot_pool, tmp_path):
    proto = _small("omniglot-5w1s", 12)
    m = get_manifest(proto, omniglot_pool, 0, tmp_path)
    path = manifest_path(tmp_path, proto, 0)
    _rewrite(path, header={"n_tasks": 7}, rehash=False)
    with pytest.raises(ManifestError, match=f"{path}.*modified after it was written.*delete"):
        read_manifest(path)
    # with the hash recomputed, the offsets still give it away
    _rewrite(path, header={"n_tasks": 7}, rehash=True)
    with pytest.raises(ManifestError, match="n_tasks = 7 but the support offsets describe 12"):
        read_manifest(path)
    # `created` is not covered: editing it changes nothing
    save_manifest(m, path)
    _rewrite(path, header={"created": "1999-01-01T00:00:00+00:00"}, rehash=False)
    assert read_manifest(path).content_hash == m.content_hash


def test_changed_arrays_with_recomputed_hash_are_rederived(omniglot_pool, tmp_path):
    proto = _small("omniglot-5w1s", 40)
    m = get_manifest(proto, omniglot_pool, 0, tmp_path)
    path = manifest_path(tmp_path, proto, 0)
    # task 12's first support item replaced by another image of the same class: still a valid
    # task, with the content hash recomputed, but not what the protocol samples
    t12 = m.task(12)
    same_class = np.flatnonzero(omniglot_pool.data.labels == t12.classes[0])
    unused = np.setdiff1d(same_class, t12.all_items())[0]
    support = m.arrays["support"].copy()
    support[m.arrays["support_offsets"][12]] = unused
    _rewrite(path, arrays={"support": support}, rehash=True)
    assert read_manifest(path).content_hash != m.content_hash  # the hash itself checks out
    with pytest.raises(ManifestError, match=r"task 12 support differs.*Delete it"):
        get_manifest(proto, omniglot_pool, 0, tmp_path)
    # fewer tasks, header and offsets made consistent, hash recomputed
    keep = {}
    for name in manifest_mod.FIELDS:
        off = m.arrays[f"{name}_offsets"][:8]
        keep[name] = m.arrays[name][: off[-1]]
        keep[f"{name}_offsets"] = off
    _rewrite(path, header={"n_tasks": 7}, arrays=keep, rehash=True)
    with pytest.raises(ManifestError, match="n_tasks 7 vs 40"):
        get_manifest(proto, omniglot_pool, 0, tmp_path)
    # a sampled manifest relabelled as imported (to dodge re-derivation) is refused too
    save_manifest(m, path)
    _rewrite(path, header={"source": "imported:x.jsonl:sha256=0"}, rehash=True)
    with pytest.raises(ManifestError, match="seed-\\*.npz files hold sampled tasks"):
        get_manifest(proto, omniglot_pool, 0, tmp_path)
    # the seed in the header must be the file's seed
    save_manifest(build_manifest(proto, omniglot_pool, 3), path)
    with pytest.raises(ManifestError, match="holds seed 3, not seed 0"):
        get_manifest(proto, omniglot_pool, 0, tmp_path)


def test_old_format_is_refused_with_the_fix(omniglot_pool, tmp_path):
    proto = _small("omniglot-5w1s", 3)
    get_manifest(proto, omniglot_pool, 0, tmp_path)
    path = manifest_path(tmp_path, proto, 0)
    _rewrite(path, header={"format": "fewshot-bench-manifest/1"}, rehash=True)
    with pytest.raises(ManifestError, match=r"old format.*Delete it.*re-materialised"):
        get_manifest(proto, omniglot_pool, 0, tmp_path)
    path.unlink()
    assert get_manifest(proto, omniglot_pool, 0, tmp_path).n_tasks == 3


def test_rederivation_is_fast(omniglot_pool, tmp_path):
    proto = _small("omniglot-5w1s", 600)
    m = get_manifest(proto, omniglot_pool, 0, tmp_path)
    start = time.perf_counter()
    again = get_manifest(proto, omniglot_pool, 0, tmp_path)  # read + hash + re-derive
    elapsed = time.perf_counter() - start
    assert again.content_hash == m.content_hash
    assert elapsed < 2.0, f"re-deriving 600 Omniglot episodes took {elapsed:.2f} s"


def test_task_truth_matches_the_sampler(omniglot_pool):
    data = omniglot_pool.data
    params = semi_params()
    sampler = EpisodeSampler(data.labels, data.n_classes, params)
    for i in range(50):
        t = sampler.sample(seed=1, task_index=i)
        truth = task_truth(t, data.labels)
        # the sampler draws query items class by class, in episode-label order
        assert np.array_equal(truth.query_labels, np.repeat(np.arange(5), params["n_query"]))
        assert (t.classes[truth.query_labels] == data.labels[t.query]).all()
        inside = ~truth.distractor_mask
        assert (t.classes[truth.unlabeled_labels[inside]] == data.labels[t.unlabeled[inside]]).all()
        assert truth.distractor_mask.sum() == params["n_distractor"] * params["n_unlabeled"]
        assert not np.isin(data.labels[t.unlabeled[~inside]], t.classes).any()
        assert np.bincount(truth.unlabeled_labels[inside], minlength=5).tolist() == [5] * 5
    # a query item outside the task's classes cannot be scored
    bad = replace(t, query=np.concatenate([t.query, t.unlabeled[~inside][:1]]))
    with pytest.raises(ManifestError, match="belongs to none of the task's classes"):
        task_truth(bad, data.labels)


def test_task_truth_ssl_is_pool_labels(fashion_pool):
    proto = resolve_protocols("fashion-mnist-ssl-250")[0]
    t = ssl_split(fashion_pool, proto.params, seed=0)
    truth = task_truth(t, fashion_pool.data.labels)
    assert np.array_equal(truth.query_labels, fashion_pool.data.labels[t.query])
    assert np.array_equal(truth.unlabeled_labels, fashion_pool.data.labels[t.unlabeled])
    assert not truth.distractor_mask.any()


def test_manifest_refuses_other_data(omniglot_pool, fashion_pool, tmp_path):
    proto = _small("omniglot-5w1s", 5)
    m = build_manifest(proto, omniglot_pool, 0)
    with pytest.raises(ManifestError, match="different omniglot data"):
        check_manifest(m, proto, fashion_pool)


def test_import_export_episodes(omniglot_pool, tmp_path):
    proto = _small("omniglot-5w1s", 10)
    m = build_manifest(proto, omniglot_pool, 0)
    jsonl = export_episodes(m, tmp_path / "eps.jsonl", omniglot_pool, item_ids=True)
    first = json.loads(jsonl.read_text().splitlines()[0])
    assert isinstance(first["support"][0], str)
    assert first["query_labels"] == np.repeat(np.arange(5), 15).tolist()
    imported = import_episodes(jsonl, proto, omniglot_pool)
    digest = hashlib.sha256(jsonl.read_bytes()).hexdigest()[:16]
    assert imported.header["source"] == f"imported:eps.jsonl:sha256={digest}"
    assert imported.header["seed"] == 0 and imported.header["n_tasks"] == 10
    assert imported.header["n_query"] == 75
    for f in manifest_mod.ARRAY_KEYS:
        assert np.array_equal(imported.arrays[f], m.arrays[f])
    save_manifest(imported, tmp_path / "m.npz")
    check_manifest(read_manifest(tmp_path / "m.npz"), proto, omniglot_pool)

    def refused(record, needle):
        (tmp_path / "bad.jsonl").write_text(json.dumps(record) + "\n")
        with pytest.raises(ManifestError, match=needle):
            import_episodes(tmp_path / "bad.jsonl", proto, omniglot_pool)

    # support ∩ query
    refused(dict(first, query=first["support"][:1] + first["query"][1:]), "appears twice")
    refused(dict(first, support_labels=[1, 0, 2, 3, 4]), "mixes dataset classes")
    refused(dict(first, support_labels=[0, 1, 2, 3, 5]), r"support labels must be in 0..4")
    refused(dict(first, query_labels=[0] * 74 + [7]), r"query labels must be in 0..4")
    refused(dict(first, suport=[]), "unknown key")
    refused(dict(first, support_labels=[0, 1, 2, 3, 3.0]), "list of integers")
    (tmp_path / "bad.jsonl").write_text('{"support": [1]\n')
    with pytest.raises(ManifestError, match="not valid JSON"):
        import_episodes(tmp_path / "bad.jsonl", proto, omniglot_pool)


def _episode(pool, classes, k=1, q=3, distractors=(), m=0):
    """An episode (indices) over given pool classes, labels in the order given."""
    members = [np.flatnonzero(pool.data.labels == c) for c in classes]
    rec = {"support": [], "support_labels": [], "query": [], "query_labels": []}
    for j, items in enumerate(members):
        rec["support"] += items[:k].tolist()
        rec["support_labels"] += [j] * k
        rec["query"] += items[k : k + q].tolist()
        rec["query_labels"] += [j] * q
    if m:
        rec["unlabeled"] = [int(i) for items in members for i in items[k + q : k + q + m]]
        rec["unlabeled_labels"] = [j for j in range(len(members)) for _ in range(m)]
        for c in distractors:
            rec["unlabeled"] += np.flatnonzero(pool.data.labels == c)[:m].tolist()
            rec["unlabeled_labels"] += [-1] * m
    return rec


def test_import_refuses_bad_episodes(omniglot_pool, tmp_path):
    proto = _small("omniglot-5w1s", 10)
    path = tmp_path / "bad.jsonl"

    def refused(record, needle):
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(ManifestError, match=needle):
            import_episodes(path, proto, omniglot_pool)

    # 3-way episodes into a 5-way protocol
    refused(_episode(omniglot_pool, [3, 9, 27]), r"a 3-way task .* protocol is 5-way")
    # two episode labels on one dataset class
    rec = _episode(omniglot_pool, [3, 9, 27, 40, 41])
    class3 = np.flatnonzero(omniglot_pool.data.labels == 3)[4:8].tolist()
    rec["support"][1], rec["query"][3:6] = class3[0], class3[1:]
    refused(rec, r"episode labels 0 and 1 both map to dataset class")
    # a support that lacks label 4 (label 3 twice)
    rec = _episode(omniglot_pool, [3, 9, 27, 40, 41])
    rec["support_labels"][4] = 3
    refused(rec, r"mixes dataset classes|support lacks episode label")
    rec = _episode(omniglot_pool, [3, 9, 27, 40, 41])
    rec["support"], rec["support_labels"] = rec["support"][:4], rec["support_labels"][:4]
    refused(rec, r"support lacks episode label\(s\) \[4\]")
    # support ∩ query
    rec = _episode(omniglot_pool, [3, 9, 27, 40, 41])
    rec["query"][0] = rec["support"][0]
    refused(rec, "appears twice.*support and query")
    # unlabeled labels that contradict the pool
    rec = _episode(omniglot_pool, [3, 9, 27, 40, 41], m=2, distractors=[50])
    rec["unlabeled_labels"][0] = -1
    refused(rec, r"marked as a distractor \(-1\) but belongs to episode class")
    rec = _episode(omniglot_pool, [3, 9, 27, 40, 41], m=2, distractors=[50])
    rec["unlabeled_labels"][-1] = 2
    refused(rec, "is labeled 2 but belongs to dataset class")
    # a well-formed one with distractors is accepted; its truth comes from the pool
    rec = _episode(omniglot_pool, [3, 9, 27, 40, 41], m=2, distractors=[50])
    path.write_text(json.dumps(rec) + "\n")
    t = import_episodes(path, proto, omniglot_pool).task(0)
    truth = task_truth(t, omniglot_pool.data.labels)
    assert truth.unlabeled_labels.tolist() == rec["unlabeled_labels"]
    assert truth.query_labels.tolist() == rec["query_labels"]


def test_imported_episodes_are_one_task_set(omniglot_pool, tmp_path):
    proto = _small("omniglot-5w1s", 6, seeds=[0, 1, 2])
    jsonl = export_episodes(
        build_manifest(proto, omniglot_pool, 4), tmp_path / "e.jsonl", omniglot_pool
    )
    work = tmp_path / "work"
    target = import_task_set(jsonl, proto, omniglot_pool, work)
    assert target == imported_manifest_path(work, proto) and target.name == "imported.npz"
    for seeds in (None, [], [0]):
        sets = load_task_sets(proto, omniglot_pool, work, seeds)
        assert list(sets) == [0] and sets[0].n_tasks == 6 and sets[0].imported
    with pytest.raises(ManifestError, match=r"uses imported episodes .*--seeds does not apply"):
        load_task_sets(proto, omniglot_pool, work, [1, 2])
    assert not manifest_path(work, proto, 0).exists()  # nothing sampled
    with pytest.raises(ManifestError, match="exists; pass --force"):
        import_task_set(jsonl, proto, omniglot_pool, work)
    # an imported manifest is not re-derived, but its tasks are checked against the pool
    m = read_manifest(target)
    query = m.arrays["query"].copy()
    query[0] = m.arrays["support"][m.arrays["support_offsets"][1]]  # task 1's support item
    _rewrite(target, arrays={"query": query}, rehash=True)
    with pytest.raises(ManifestError, match="imported task 0: a query item belongs to none"):
        load_task_sets(proto, omniglot_pool, work, None)
    # without an imported file: one sampled manifest per protocol seed
    other = tmp_path / "sampled"
    sets = load_task_sets(proto, omniglot_pool, other, None)
    assert list(sets) == [0, 1, 2] and all(m.source == "sampled" for m in sets.values())
    assert list(load_task_sets(proto, omniglot_pool, other, [2, 2, 5])) == [2, 5]
    with pytest.raises(ManifestError, match="holds sampled manifests"):
        import_task_set(jsonl, proto, omniglot_pool, other)


def test_repeated_splits_and_ssl_query_split_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'name = "x"\n[dataset]\nname = "omniglot"\nsplits = ["test", "test"]\n[episodes]\n'
    )
    with pytest.raises(ProtocolError, match=r"bad.toml: .*lists 'test' more than once.*list each"):
        load_protocol_file(bad)
    bad.write_text(
        'name = "x"\n[dataset]\nname = "fashion-mnist"\nsplits = ["train", "test"]\n'
        '[ssl]\nlabeled_split = "train"\nquery_split = "train"\nn_labels = [50]\n'
    )
    with pytest.raises(ProtocolError, match=r"bad.toml: .*both 'train'.*set query_split"):
        load_protocol_file(bad)


def test_cli_episodes_summary(shared_data, tmp_path):
    from fewshot_bench.cli import main

    rc = main(
        [
            "episodes",
            "omniglot-semi-5w1s",
            "--data-root",
            str(shared_data),
            "--workdir",
            str(tmp_path),
            "--show",
            "1",
        ]
    )
    assert rc == 0
    assert (tmp_path / "manifests" / "omniglot-semi-5w1s" / "seed-0.npz").exists()


def test_cli_missing_data_root(tmp_path, capsys):
    from fewshot_bench.cli import main

    rc = main(
        [
            "episodes",
            "omniglot-5w1s",
            "--data-root",
            str(tmp_path / "nowhere"),
            "--workdir",
            str(tmp_path),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "omniglot" in err
    assert not Path(tmp_path / "manifests").exists()
