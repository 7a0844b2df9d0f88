"""Episode sampler, SSL splits, protocols and manifests on real Omniglot and Fashion-MNIST."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fewshot_bench.errors import ManifestError, ProtocolError
from fewshot_bench.tasks.external import export_episodes, import_episodes
from fewshot_bench.tasks.manifest import (
    build_manifest,
    check_manifest,
    get_manifest,
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
        assert (data.labels[t.query] == t.classes[t.query_labels]).all()
        inside = t.unlabeled_labels >= 0
        assert (data.labels[t.unlabeled[inside]] == t.classes[t.unlabeled_labels[inside]]).all()
        # distractors: 5 classes x 5 items, disjoint from episode classes
        assert (~inside).sum() == 25
        distractor_classes = set(data.labels[t.unlabeled[~inside]].tolist())
        assert len(distractor_classes) == 5 and not distractor_classes & set(t.classes.tolist())
        # support/query come from the labeled part, unlabeled from the unlabeled part
        assert set(t.support.tolist()) <= labeled and set(t.query.tolist()) <= labeled
        assert not set(t.unlabeled.tolist()) & labeled
        assert len(set(t.classes.tolist())) == 5


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


def test_manifest_round_trip_and_tamper(omniglot_pool, tmp_path):
    proto = resolve_protocols("omniglot-5w1s")[0]
    proto = replace(proto, params={**proto.params, "n_tasks": 40})
    m = get_manifest(proto, omniglot_pool, 0, tmp_path)
    path = manifest_path(tmp_path, proto, 0)
    again = get_manifest(proto, omniglot_pool, 0, tmp_path)
    assert again.header == m.header
    for i in (0, 17, 39):
        assert np.array_equal(again.task(i).support, m.task(i).support)
        assert np.array_equal(again.task(i).query_labels, m.task(i).query_labels)

    # protocol changed under the same name -> refused
    changed = replace(proto, params={**proto.params, "n_query": 10})
    with pytest.raises(ManifestError, match="protocol file changed"):
        get_manifest(changed, omniglot_pool, 0, tmp_path)

    # tampered indices -> refused
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["support"] = arrays["support"].copy()
    arrays["support"][0] += 1
    np.savez(path, **arrays)
    with pytest.raises(ManifestError, match="modified after it was written"):
        read_manifest(path)

    # truncated file -> refused with the fix
    path.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ManifestError, match="corrupt"):
        read_manifest(path)


def test_manifest_refuses_other_data(omniglot_pool, fashion_pool, tmp_path):
    proto = resolve_protocols("omniglot-5w1s")[0]
    proto = replace(proto, params={**proto.params, "n_tasks": 5})
    m = build_manifest(proto, omniglot_pool, 0)
    with pytest.raises(ManifestError, match="different omniglot data"):
        check_manifest(m, proto, fashion_pool)


def test_import_export_episodes(omniglot_pool, tmp_path):
    proto = resolve_protocols("omniglot-5w1s")[0]
    proto = replace(proto, params={**proto.params, "n_tasks": 10})
    m = build_manifest(proto, omniglot_pool, 0)
    jsonl = export_episodes(m, tmp_path / "eps.jsonl", omniglot_pool.data.item_ids)
    first = json.loads(jsonl.read_text().splitlines()[0])
    assert isinstance(first["support"][0], str)
    imported = import_episodes(jsonl, proto, omniglot_pool, seed=0)
    assert imported.header["source"].startswith("imported:eps.jsonl")
    assert imported.header["content_sha256"] == m.header["content_sha256"]
    save_manifest(imported, tmp_path / "m.npz")
    check_manifest(read_manifest(tmp_path / "m.npz"), proto, omniglot_pool)

    bad = dict(first)
    bad["query"] = list(first["support"][:1]) + first["query"][1:]
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(ManifestError, match="appears twice"):
        import_episodes(tmp_path / "bad.jsonl", proto, omniglot_pool, seed=0)
    bad = dict(first, support_labels=[1, 0, 2, 3, 4])
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(ManifestError, match="mixes dataset classes"):
        import_episodes(tmp_path / "bad.jsonl", proto, omniglot_pool, seed=0)
    (tmp_path / "bad.jsonl").write_text('{"support": [1]\n')
    with pytest.raises(ManifestError, match="not valid JSON"):
        import_episodes(tmp_path / "bad.jsonl", proto, omniglot_pool, seed=0)


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
