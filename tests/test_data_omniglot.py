"""Omniglot on the real copy in ../shared/data: Lake's split, the Vinyals split, rotations, cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_bench.data import load_dataset
from fewshot_bench.errors import DataNotFoundError, InputDataError


@pytest.fixture(scope="module")
def lake(shared_data: Path) -> dict:
    return {s: load_dataset("omniglot", s, shared_data) for s in ("background", "evaluation")}


@pytest.fixture(scope="module")
def vinyals(shared_data: Path) -> dict:
    return {s: load_dataset("omniglot", s, shared_data) for s in ("train", "val", "test")}


def test_lake_split_counts(lake: dict) -> None:
    bg, ev = lake["background"], lake["evaluation"]
    assert (bg.n_classes, len(bg)) == (964, 964 * 20)
    assert (ev.n_classes, len(ev)) == (659, 659 * 20)
    assert (bg.class_counts() == 20).all() and (ev.class_counts() == 20).all()
    assert not set(bg.class_names) & set(ev.class_names)
    assert bg.images.shape == (964 * 20, 1, 28, 28) and bg.images.dtype == torch.uint8
    assert bg.class_names[0] == "Alphabet_of_the_Magi/character01"
    assert bg.item_ids[0] == "images_background/Alphabet_of_the_Magi/character01/0709_01.png"
    assert ev.item_ids[0].startswith("images_evaluation/Angelic/character01/")


def test_polarity_and_resize_match_pil(shared_data: Path, lake: dict) -> None:
    bg = lake["background"]
    # white background, dark strokes, as in the PNGs
    assert bg.images.float().mean() > 200
    i = 12345
    path = shared_data / "omniglot" / bg.item_ids[i]
    with Image.open(path) as im:
        ref = np.asarray(im.convert("L").resize((28, 28), Image.LANCZOS))
    assert np.array_equal(bg.images[i, 0].numpy(), ref)
    assert path.parent.name in bg.class_names[bg.labels[i]]


def test_vinyals_split_covers_all_characters_and_rotations(vinyals: dict, lake: dict) -> None:
    counts = {s: vinyals[s].n_classes for s in vinyals}
    assert counts == {"train": 4112, "val": 688, "test": 1692}
    names = [set(vinyals[s].class_names) for s in ("train", "val", "test")]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    chars = set(lake["background"].class_names) | set(lake["evaluation"].class_names)
    assert len(chars) == 1623
    expected = {f"{c}/rot{a:03d}" for c in chars for a in (0, 90, 180, 270)}
    assert set().union(*names) == expected
    for s in vinyals:
        assert (vinyals[s].class_counts() == 20).all()
        assert len(vinyals[s]) == 20 * counts[s]


def test_vinyals_rotation_is_rot90_of_the_original(vinyals: dict, lake: dict) -> None:
    tr = vinyals["train"]
    base = tr.class_names.index("Angelic/character01/rot000")
    ev = lake["evaluation"]
    src = torch.from_numpy(tr.labels == base)
    # rot000 items are the Lake images, with the same item ids
    lake_idx = [ev.item_ids.index(i) for i in np.array(tr.item_ids)[tr.labels == base]]
    assert torch.equal(tr.images[src], ev.images[lake_idx])
    for k, rot in ((1, "rot090"), (2, "rot180"), (3, "rot270")):
        c = tr.class_names.index(f"Angelic/character01/{rot}")
        mask = torch.from_numpy(tr.labels == c)
        assert torch.equal(tr.images[mask], torch.rot90(tr.images[src], k, dims=(-2, -1)))
        assert tr.item_ids[int(np.flatnonzero(tr.labels == c)[0])].endswith(f".png#{rot}")


def test_trainval_is_train_plus_val(shared_data: Path, vinyals: dict) -> None:
    tv = load_dataset("omniglot", "trainval", shared_data)
    assert set(tv.class_names) == set(vinyals["train"].class_names) | set(
        vinyals["val"].class_names
    )
    assert len(tv) == 4800 * 20


def _mini_omniglot(root: Path, n_chars: int = 2) -> None:
    rng = np.random.default_rng(0)
    for a in ("Alpha", "Beta"):
        for c in range(1, n_chars + 1):
            d = root / "omniglot" / "images_background" / a / f"character{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for k in range(1, 3):
                px = rng.random((105, 105)) > 0.1
                Image.fromarray(px).save(d / f"{c:04d}_{k:02d}.png")


def test_cache_is_invalidated_when_files_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FSBENCH_CACHE", str(tmp_path / "cache"))
    _mini_omniglot(tmp_path / "data")
    first = load_dataset("omniglot", "background", tmp_path / "data", image_size=20)
    assert (first.n_classes, len(first), tuple(first.images.shape[1:])) == (4, 8, (1, 20, 20))
    assert len(list((tmp_path / "cache" / "decoded").glob("omniglot-*.npy"))) == 1
    again = load_dataset("omniglot", "background", tmp_path / "data", image_size=20)
    assert torch.equal(first.images, again.images)
    _mini_omniglot(tmp_path / "data", n_chars=3)  # adds a character per alphabet
    more = load_dataset("omniglot", "background", tmp_path / "data", image_size=20)
    assert (more.n_classes, len(more)) == (6, 12)
    assert len(list((tmp_path / "cache" / "decoded").glob("omniglot-*.npy"))) == 2


def test_missing_and_bad_split_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "nowhere" / "omniglot")):
        load_dataset("omniglot", "background", tmp_path / "nowhere")
    _mini_omniglot(tmp_path / "data")
    with pytest.raises(DataNotFoundError, match="vinyals/train.txt"):
        load_dataset("omniglot", "train", tmp_path / "data")
    splits = tmp_path / "data" / "omniglot" / "splits" / "vinyals"
    splits.mkdir(parents=True)
    (splits / "val.txt").write_text("Alpha/character01/rot045\n")
    with pytest.raises(InputDataError, match="val.txt:1"):
        load_dataset("omniglot", "val", tmp_path / "data")
    (splits / "test.txt").write_text("Alpha/character01/rot180\nGamma/character01/rot000\n")
    with pytest.raises(DataNotFoundError, match="Gamma/character01"):
        load_dataset("omniglot", "test", tmp_path / "data")
