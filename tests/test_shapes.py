"""The episode-shape family (episodes/omniglot-shapes.toml) and imbalanced queries, on real
Omniglot."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fewshot_bench.errors import ProtocolError
from fewshot_bench.tasks.protocol import builtin_protocol_dir, load_pool, load_protocol_file
from fewshot_bench.tasks.sampler import EpisodeSampler, imbalanced_counts
from fewshot_bench.tasks.task import task_truth

FAMILY = builtin_protocol_dir() / "omniglot-shapes.toml"


def test_the_family_holds_every_shape_the_classes_can_hold():
    protos = {p.name: p for p in load_protocol_file(FAMILY)}
    # 2 ways x 2 shots x 3 query counts x 2 pools x 2 balances, less the 8 with 15 queries and
    # an unlabeled pool: 1 (or 5) + 15 + 5 > 20 drawings of a character
    assert len(protos) == 2 * 2 * 3 * 2 * 2 - 8
    assert "omniglot-shapes-5w1s-q15-u5d5" not in protos
    assert "omniglot-shapes-5w1s-q15-dir2" in protos
    p = protos["omniglot-shapes-20w1s-q5-u5d5-dir2"]
    assert p.family == "omniglot-shapes" and p.kind == "episodic"
    assert (p.params["n_way"], p.params["k_shot"], p.params["n_query"]) == (20, 1, 5)
    assert (p.params["n_unlabeled"], p.params["n_distractor"]) == (5, 5)
    assert p.params["query_imbalance"] == 2.0 and "Dirichlet 2" in p.summary()
    assert "query_imbalance" not in protos["omniglot-shapes-5w1s-q15"].params  # hash as before
    assert len({q.hash() for q in protos.values()}) == len(protos)


def test_bad_shape_tables_are_refused(tmp_path):
    bad = FAMILY.read_text().replace("pool = [[0, 0], [5, 5]]", "pool = [5]")
    (tmp_path / "bad.toml").write_text(bad)
    with pytest.raises(ProtocolError, match=r"pool entries are \[n_unlabeled, n_distractor\]"):
        load_protocol_file(tmp_path / "bad.toml")
    neg = FAMILY.read_text().replace("query_imbalance = [0, 2]", "query_imbalance = [-1]")
    (tmp_path / "neg.toml").write_text(neg)
    with pytest.raises(ProtocolError, match="query_imbalance must be a number >= 0"):
        load_protocol_file(tmp_path / "neg.toml")


def test_imbalanced_counts_keep_the_total_and_the_caps():
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = imbalanced_counts(rng, 75, [19] * 5, 2.0)
        assert sum(counts) == 75 and max(counts) <= 19
    spread = [max(imbalanced_counts(rng, 300, [19] * 20, 2.0)) for _ in range(50)]
    assert np.mean(spread) > 15 + 3  # far from the balanced 15 per class


def test_imbalanced_episodes_on_real_omniglot(shared_data):
    protos = {p.name: p for p in load_protocol_file(FAMILY)}
    proto = protos["omniglot-shapes-5w1s-q5-u5d5-dir2"]
    pool = load_pool(proto, shared_data)
    labels = np.asarray(pool.data.labels)
    sampler = EpisodeSampler(labels, pool.data.n_classes, proto.params)
    sizes = []
    for t in range(30):
        idx = sampler.sample(0, t)
        truth = task_truth(idx, labels)
        items = np.concatenate([idx.support, idx.query, idx.unlabeled])
        assert len(set(items.tolist())) == len(items)  # no item twice
        assert len(idx.query) == 25 and int(truth.distractor_mask.sum()) == 25
        sizes.append(sorted(Counter(truth.query_labels.tolist()).values()))
    assert any(s != [5] * 5 for s in sizes)
    again = EpisodeSampler(labels, pool.data.n_classes, proto.params).sample(0, 7)
    assert (again.query == sampler.sample(0, 7).query).all()  # seeded by (seed, task) alone
