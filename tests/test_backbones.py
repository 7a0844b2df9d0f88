"""Backbones, pretraining objectives, checkpoints/resume and the checkpoint embedder."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from fewshot_bench.backbones import get_embedder
from fewshot_bench.backbones.augment import AUGMENTS, augment
from fewshot_bench.backbones.checkpoint import (
    CheckpointEmbedder,
    backbone_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fewshot_bench.backbones.nets import build_backbone
from fewshot_bench.backbones.objectives import weighted_knn_predict
from fewshot_bench.backbones.pretrain import PretrainConfig, knn_accuracy, pretrain
from fewshot_bench.data import load_dataset
from fewshot_bench.data.base import LabeledData
from fewshot_bench.errors import FsbenchError, InputDataError, ProtocolError

SHAPES = [(28, 1), (32, 3), (84, 3)]
EXPECTED_DIM = {
    ("conv4", 28): 64,
    ("conv4", 32): 256,
    ("conv4", 84): 1600,
    ("resnet12", 28): 640,
    ("resnet12", 32): 640,
    ("resnet12", 84): 640,
    ("wrn-28-2", 28): 128,
    ("wrn-28-2", 32): 128,
    ("wrn-28-2", 84): 128,
    ("wrn-28-10", 28): 640,
    ("wrn-28-10", 32): 640,
    ("wrn-28-10", 84): 640,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions: one thread is as fast, and spins far less on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def omniglot_small(shared_data) -> LabeledData:
    """200 real Omniglot background images: the first 10 characters × 20 drawers."""
    full = load_dataset("omniglot", "background", shared_data)
    keep = np.flatnonzero(full.labels < 10)
    return LabeledData(
        name="omniglot-small",
        split="background",
        labels=full.labels[keep],
        class_names=full.class_names[:10],
        images=full.images[keep].clone(),
    )


def _quick(objective: str, **kw) -> PretrainConfig:
    base = dict(objective=objective, steps=10, batch_size=32, log_every=1, checkpoint_every=100)
    return PretrainConfig(**{**base, **kw})


# ---------------------------------------------------------------- backbones


@pytest.mark.parametrize("arch", ["conv4", "resnet12", "wrn-28-2", "wrn-28-10"])
@pytest.mark.parametrize("size,channels", SHAPES)
def test_backbone_output_shapes(arch, size, channels):
    with torch.device("meta"):  # shape inference without the FLOPs
        net = build_backbone(arch, channels, size)
        out = net(torch.zeros(3, channels, size, size, dtype=torch.uint8))
    assert net.out_dim == EXPECTED_DIM[(arch, size)]
    assert tuple(out.shape) == (3, net.out_dim)


@pytest.mark.parametrize(
    "arch,size,channels",
    [("conv4", 28, 1), ("conv4", 84, 3), ("resnet12", 32, 3), ("wrn-28-2", 32, 3)],
)
def test_backbone_real_forward_uint8_equals_unit_float(arch, size, channels):
    torch.manual_seed(0)
    net = build_backbone(arch, channels, size).eval()
    x = torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8)
    with torch.no_grad():
        a, b = net(x), net(x.float() / 255)
    assert a.shape == (2, net.out_dim) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)


def test_unknown_arch_names_the_choices():
    with pytest.raises(ProtocolError, match="conv4"):
        build_backbone("vgg16", 3, 32)
    with pytest.raises(ProtocolError, match="6n"):
        build_backbone("wrn-27-2", 3, 32)


# ---------------------------------------------------------------- augmentation


def test_augment_is_seeded_and_keeps_range():
    x = torch.rand(6, 3, 32, 32)
    a = augment(x, torch.Generator().manual_seed(1), "strong")
    b = augment(x, torch.Generator().manual_seed(1), "strong")
    c = augment(x, torch.Generator().manual_seed(2), "strong")
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(augment(x, torch.Generator(), "none"), x)
    assert set(AUGMENTS) == {"none", "light", "strong"}


# ---------------------------------------------------------------- objectives


CHANCE = {  # loss of an untrained model: ln(classes), ln(items), -ln(share of same-class items)
    "ce": math.log(10),
    "instance": math.log(200),
    "nca": -math.log(19 / 199),
}


@pytest.mark.parametrize("objective", ["ce", "nca", "instance"])
def test_objective_learns_on_real_images(objective, omniglot_small, tmp_path):
    # instance discrimination is unstable for its first steps at its default lr 0.03 (the bank
    # lags the network); a smaller lr makes ten steps enough to see it learn
    cfg = _quick(objective, lr=0.01 if objective == "instance" else None, augment="none")
    res = pretrain(cfg, tmp_path / "m.pt", data=omniglot_small, device="cpu", progress=False)
    assert res.step == 10 and len(res.losses) == 10
    assert all(math.isfinite(v) for v in res.losses)
    tail = float(np.mean(res.losses[-4:]))
    assert tail < 0.8 * CHANCE[objective], res.losses


def test_instance_nce_runs_and_learns(omniglot_small, tmp_path):
    cfg = _quick("instance", nce_k=32, augment="none", lr=0.01)
    res = pretrain(cfg, tmp_path / "nce.pt", data=omniglot_small, device="cpu", progress=False)
    assert all(math.isfinite(v) for v in res.losses)
    k = 32  # NCE loss when every item is equally likely: -log h(pos) - K log(1 - h(noise))
    chance = math.log(1 + k) + k * math.log((1 + k) / k)
    assert np.mean(res.losses[-4:]) < 0.85 * chance, res.losses
    assert float(load_checkpoint(tmp_path / "nce.pt")["objective_state"]["nce_z"]) > 0


# ---------------------------------------------------------------- checkpoints and resume


def test_resume_reproduces_an_uninterrupted_run(omniglot_small, tmp_path):
    cfg = _quick("nca", steps=6, batch_size=32, augment="light", checkpoint_every=2)
    full = pretrain(cfg, tmp_path / "full.pt", data=omniglot_small, device="cpu", progress=False)
    part = pretrain(
        cfg, tmp_path / "part.pt", data=omniglot_small, device="cpu", progress=False, stop_at=3
    )
    assert part.step == 3 and load_checkpoint(tmp_path / "part.pt")["step"] == 3
    rest = pretrain(
        cfg, tmp_path / "part.pt", data=omniglot_small, device="cpu", progress=False, resume=True
    )
    assert rest.step == 6
    assert part.losses + rest.losses == full.losses
    a, b = load_checkpoint(tmp_path / "full.pt"), load_checkpoint(tmp_path / "part.pt")
    for key in ("state_dict", "objective_state"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), name
    assert a["weights_sha256"] == b["weights_sha256"]


def test_existing_checkpoint_needs_resume_and_same_settings(omniglot_small, tmp_path):
    out = tmp_path / "m.pt"
    cfg = _quick("ce", steps=2, batch_size=16)
    pretrain(cfg, out, data=omniglot_small, device="cpu", progress=False)
    with pytest.raises(FsbenchError, match="--resume"):
        pretrain(cfg, out, data=omniglot_small, device="cpu", progress=False)
    with pytest.raises(FsbenchError, match="lr"):
        pretrain(
            _quick("ce", steps=4, batch_size=16, lr=0.5),
            out,
            data=omniglot_small,
            device="cpu",
            progress=False,
            resume=True,
        )
    longer = pretrain(
        _quick("ce", steps=3, batch_size=16),
        out,
        data=omniglot_small,
        device="cpu",
        progress=False,
        resume=True,
    )
    assert longer.step == 3 and len(longer.losses) == 1


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputDataError, match="retrain"):
        get_embedder(f"checkpoint:{bad}")
    with pytest.raises(InputDataError, match="does not exist"):
        get_embedder(f"checkpoint:{tmp_path / 'missing.pt'}")


# ---------------------------------------------------------------- the checkpoint embedder


def test_checkpoint_embedder_matches_model_and_tracks_weights(omniglot_small, tmp_path):
    out = tmp_path / "nca.pt"
    pretrain(
        _quick("nca", steps=2, batch_size=16),
        out,
        data=omniglot_small,
        device="cpu",
        progress=False,
    )
    ckpt = load_checkpoint(out)
    images = omniglot_small.images[:50]

    emb = get_embedder(f"checkpoint:{out}")
    assert isinstance(emb, CheckpointEmbedder)
    feats = emb.embed(images, torch.device("cpu"), batch_size=16)
    with torch.no_grad():
        direct = backbone_from_checkpoint(ckpt)(images)
    assert feats.dtype == torch.float32 and feats.shape == (50, 64)
    torch.testing.assert_close(feats, direct)

    metric = get_embedder(f"checkpoint:{out}#embed")
    m = metric.embed(images, torch.device("cpu"))
    assert m.shape == (50, 128)
    torch.testing.assert_close(m.norm(dim=1), torch.ones(50))
    assert metric.identity != emb.identity

    # other sizes / channel counts are adapted to the checkpoint's 1×28×28
    rgb32 = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert emb.embed(rgb32, torch.device("cpu")).shape == (4, 64)

    # same weights → same identity; changed weights → new identity (new feature-cache key)
    assert get_embedder(f"checkpoint:{out}").identity == emb.identity
    ckpt["state_dict"]["encoder.0.0.weight"] += 1e-3
    save_checkpoint(ckpt, tmp_path / "changed.pt")
    assert get_embedder(f"checkpoint:{tmp_path / 'changed.pt'}").identity != emb.identity


def test_embed_layer_needs_a_metric_objective(omniglot_small, tmp_path):
    out = tmp_path / "ce.pt"
    pretrain(
        _quick("ce", steps=1, batch_size=16), out, data=omniglot_small, device="cpu", progress=False
    )
    with pytest.raises(InputDataError, match="no embedding head"):
        get_embedder(f"checkpoint:{out}#embed")


def test_feature_cache_is_keyed_by_checkpoint(omniglot_small, tmp_path):
    from fewshot_bench.run.features import feature_cache_path

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    pretrain(
        _quick("ce", steps=1, batch_size=16), a, data=omniglot_small, device="cpu", progress=False
    )
    pretrain(
        _quick("ce", steps=1, batch_size=16, seed=1),
        b,
        data=omniglot_small,
        device="cpu",
        progress=False,
    )
    pa = feature_cache_path(omniglot_small, get_embedder(f"checkpoint:{a}"))
    pb = feature_cache_path(omniglot_small, get_embedder(f"checkpoint:{b}"))
    assert pa != pb


# ---------------------------------------------------------------- evaluation helpers and CLI


def test_weighted_knn_and_knn_accuracy(omniglot_small, tmp_path):
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    pred = weighted_knn_predict(
        train, torch.tensor([0, 0, 1]), torch.tensor([[0.1, 1.0], [1.0, 0.2]]), 2, k=2
    )
    assert pred.tolist() == [1, 0]
    out = tmp_path / "m.pt"
    pretrain(
        _quick("ce", steps=1, batch_size=16), out, data=omniglot_small, device="cpu", progress=False
    )
    acc = knn_accuracy(CheckpointEmbedder(out), omniglot_small, omniglot_small, k=1)
    assert acc == 1.0  # every image is its own nearest neighbour


def test_cli_pretrain_writes_a_usable_checkpoint(shared_data, tmp_path, capsys):
    from fewshot_bench.pretrain_cli import add_pretrain_parser

    parser = argparse.ArgumentParser()
    add_pretrain_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli.pt"
    argv = ["pretrain", "--dataset", "omniglot", "--split", "background", "--arch", "conv4"]
    argv += ["--objective", "ce", "--steps", "2", "--batch-size", "16", "--out", str(out)]
    argv += ["--device", "cpu", "--data-root", str(shared_data), "--quiet"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 2 and ckpt["arch"] == "conv4" and ckpt["data"]["n_classes"] == 964
    assert "checkpoint:" in capsys.readouterr().out
    args = parser.parse_args([*argv, "--steps", "3", "--resume"])  # last --steps wins
    assert args.func(args) == 0 and load_checkpoint(out)["step"] == 3
