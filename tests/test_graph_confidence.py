"""Confidence α (eqs. 8-9), pseudo-label selection and the eq. 10 weighted classifier."""

from __future__ import annotations

import torch

from fewshot_bench.graph.classifier import fit_weighted_logreg
from fewshot_bench.graph.confidence import confidence, confident_pseudo_labels


def test_alpha_is_top1_minus_top2() -> None:
    p = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    probs, alpha = confidence(p.log())
    torch.testing.assert_close(probs, p)
    torch.testing.assert_close(alpha, torch.tensor([0.5, 0.05, 0.0]))
    _, a_sharp = confidence(p.log(), tau=0.5)  # p² renormalised
    assert float(a_sharp[0]) > 0.5
    _, single = confidence(torch.zeros(4, 1))
    torch.testing.assert_close(single, torch.ones(4))


def test_selection_threshold_topk_and_per_class() -> None:
    p = torch.tensor([[0.9, 0.1], [0.51, 0.49], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    pl = confident_pseudo_labels(p.log())  # α = .8, .02, .6, .2, .4
    assert pl.indices.tolist() == [0, 2, 4, 3, 1]
    pl = confident_pseudo_labels(p.log(), min_alpha=0.05)
    assert 1 not in pl.indices.tolist()
    assert confident_pseudo_labels(p.log(), k=2).indices.tolist() == [0, 2]
    per = confident_pseudo_labels(p.log(), k_per_class=1)
    assert per.indices.tolist() == [0, 2] and per.labels.tolist() == [0, 1]
    torch.testing.assert_close(per.alpha, torch.tensor([0.8, 0.6]))


def test_zero_weight_samples_do_not_count() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=gen)
    y = (x[:, 0] > 0).long()
    clean = fit_weighted_logreg(x, y, 2)
    noisy_x = torch.cat([x, torch.randn(10, 5, generator=gen)])
    noisy_y = torch.cat([y, torch.randint(0, 2, (10,), generator=gen)])
    w = torch.cat([torch.ones(40), torch.zeros(10)])
    weighted = fit_weighted_logreg(noisy_x, noisy_y, 2, w * 50 / 40)  # eq. 10 divides by N
    torch.testing.assert_close(clean.weight, weighted.weight, atol=1e-3, rtol=1e-3)
