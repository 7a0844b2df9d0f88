"""One-line dataset notes for leaderboard pages: the dataset, its splits, and which copy of the
data the loader reads (e.g. the JPEG copy of CIFAR-10).

Only protocol files and file names under the data root are looked at, never image data. The
results store does not record which copy of a dataset a run read, so the copy is inferred the way
the loader picks it, on the machine that writes the page.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fewshot_bench.errors import FsbenchError

if TYPE_CHECKING:  # the protocol module pulls in torch: imported lazily below
    from fewshot_bench.tasks.protocol import Protocol


def find_protocol(name: str) -> Protocol | None:
    """The protocol called ``name`` from the protocol files, or ``None`` when none is."""
    from fewshot_bench.tasks.protocol import all_protocols

    try:
        return all_protocols().get(name)
    except FsbenchError:
        return None


def _dataset_description(name: str) -> str:
    from fewshot_bench.data.registry import get_info

    try:
        return get_info(name).description
    except FsbenchError:
        return ""


def source_note(dataset: str, splits: Sequence[str], data_root: str | Path | None = None) -> str:
    """Which copy of ``dataset`` the loader reads from the data root; ``""`` when there is only one.

    CIFAR-10 has three (python batches, JPEG zips, image folder), tried in that order per split,
    as :func:`fewshot_bench.data.cifar.load_cifar10` does.
    """
    from fewshot_bench.data.base import data_root as resolve_root
    from fewshot_bench.data.cifar import CIFAR10_FOLDER, CIFAR10_JPEG, CIFAR10_PY, JPEG_NOTE
    from fewshot_bench.data.registry import get_info

    try:
        name = get_info(dataset).name
    except FsbenchError:
        return ""
    if name != "cifar10":
        return ""
    root = resolve_root(data_root)
    if (root / CIFAR10_PY).is_dir():
        return f"Source: the official CIFAR-10 python batches ({CIFAR10_PY}/)."
    jpeg = [s for s in splits if (root / CIFAR10_JPEG / f"{s}.zip").is_file()]
    if jpeg:
        zips = ", ".join(f"{CIFAR10_JPEG}/{s}.zip" for s in jpeg)
        return f"Source: the JPEG copy of CIFAR-10 ({zips}; {JPEG_NOTE})."
    if all((root / CIFAR10_FOLDER / s).is_dir() for s in splits):
        return f"Source: an image folder ({CIFAR10_FOLDER}/<split>/<class>/)."
    return (
        f"Source: not checked (no CIFAR-10 files under {root}); results read from the "
        f"{CIFAR10_JPEG} zips are a JPEG copy ({JPEG_NOTE})."
    )


def _fmt_x(x: float | None) -> str:
    return "?" if x is None else f"{x:g}"


def dataset_note(protocols: str | Sequence[str], data_root: str | Path | None = None) -> str:
    """A one-line description of the protocols' dataset and splits (one protocol or a family),
    with the copy of the data read (see :func:`source_note`)."""
    names = [protocols] if isinstance(protocols, str) else list(protocols)
    found = [find_protocol(n) for n in names]
    missing = [n for n, p in zip(names, found, strict=True) if p is None]
    protos = [p for p in found if p is not None]
    if not protos:
        return (
            f"Dataset: not known ({', '.join(missing)} has no protocol file in episodes/ or "
            "$FSBENCH_PROTOCOLS)."
        )
    first = protos[0]
    ds = first.dataset["name"]
    desc = _dataset_description(ds)
    text = f"Dataset: {ds}" + (f" ({desc})" if desc else "") + "."
    if len(protos) == 1:
        split = first.summary()
    elif all(p.kind == "ssl" for p in protos) and len({p.dataset["name"] for p in protos}) == 1:
        prm = first.params
        pct = first.x_label.startswith("%")
        xs = ", ".join(_fmt_x(p.x_value) + ("%" if pct else "") for p in protos)
        amount = f"{xs}{first.x_label[1:]}" if pct else f"{xs} {first.x_label}"
        split = (
            f"{ds}[{'+'.join(first.splits)}]: balanced labels from {prm['labeled_split']} "
            f"({amount}), the rest unlabeled; query {prm['query_split']}"
        )
    else:
        split = "; ".join(p.summary() for p in protos)
    text += f" Splits: {split}."
    if first.dataset.get("image_size"):
        size = first.dataset["image_size"]
        text += f" Images resized to {size}x{size}."
    source = source_note(ds, first.splits, data_root)
    if source:
        text += f" {source}"
    if missing:
        text += f" ({', '.join(missing)}: no protocol file found.)"
    return text


def dataset_notes(protocols: Sequence[str], data_root: str | Path | None = None) -> list[str]:
    """:func:`dataset_note` for protocols of possibly different datasets (a group page): one
    line per dataset, in order of first appearance, with that dataset's protocols; protocols
    without a protocol file share one line. Repeated lines are dropped."""
    by_dataset: dict[str, list[str]] = {}
    for name in dict.fromkeys(protocols):
        proto = find_protocol(name)
        key = "" if proto is None else str(proto.dataset["name"])
        by_dataset.setdefault(key, []).append(name)
    notes = [dataset_note(names, data_root) for key, names in by_dataset.items() if key]
    if "" in by_dataset:
        notes.append(dataset_note(by_dataset[""], data_root))
    return list(dict.fromkeys(notes))
