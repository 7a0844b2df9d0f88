"""Lines of text for leaderboard pages, from the results store's own columns: the data note
(e.g. that CIFAR-10 was read from its JPEG copy), imported episodes, and protocols whose rows
ran on several task sets.

Everything here reads the rows, never protocol files, dataset loaders or the data root: the
runner records in ``data_note`` what it knew about the data it read, and a page written later,
on another machine, says the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from fewshot_bench.report.entries import (
    TASK_ORIGIN,
    is_imported,
    parse_task_source,
    short_hash,
    source_text,
    task_sets,
)
from fewshot_bench.report.stats import prepare


def _rows(df: pd.DataFrame, protocols: str | Sequence[str] | None) -> tuple[pd.DataFrame, list]:
    data = prepare(df)
    if protocols is None:
        names = list(dict.fromkeys(data["protocol"]))
    else:
        names = [protocols] if isinstance(protocols, str) else list(dict.fromkeys(protocols))
        data = data[data["protocol"].isin(names)]
    return data, [n for n in names if n in set(data["protocol"])]


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?", ")")) else f"{text}."


def _seeds(values: Sequence[int]) -> str:
    seeds = sorted({int(v) for v in values})
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}–{seeds[-1]}"
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def dataset_notes(df: pd.DataFrame, protocols: str | Sequence[str] | None = None) -> list[str]:
    """One ``"Data: …"`` line per distinct ``data_note`` of the rows of ``protocols`` (all
    protocols by default), in order of first appearance; a note that does not hold for every
    row names the protocols it holds for (``"some entries of"`` where it holds for only part
    of a protocol's rows). Empty when no row has a note."""
    data, names = _rows(df, protocols)
    lines = []
    notes = [n for n in dict.fromkeys(data["data_note"]) if n.strip()]
    for note in notes:
        has = data["data_note"] == note
        if has.all():
            lines.append(f"Data: {_sentence(note)}")
            continue
        where = []
        for p in names:
            of_p = has[data["protocol"] == p]
            if of_p.all():
                where.append(p)
            elif of_p.any():
                where.append(f"some entries of {p}")
        lines.append(f"Data ({', '.join(where)}): {_sentence(note)}")
    return lines


def dataset_note(df: pd.DataFrame, protocols: str | Sequence[str] | None = None) -> str:
    """:func:`dataset_notes` joined into one line (``""`` when no row has a data note)."""
    return " ".join(dataset_notes(df, protocols))


def imported_notes(df: pd.DataFrame, protocols: str | Sequence[str] | None = None) -> list[str]:
    """One line per imported episode file the rows of ``protocols`` ran on: the file, its
    sha256 and the protocols and seeds it gave tasks for."""
    data, names = _rows(df, protocols)
    sub = data[data["task_source"].map(is_imported)]
    lines = []
    for source, g in sub.groupby("task_source", sort=False):
        _, file, sha = parse_task_source(source)
        where = "; ".join(
            f"{p} {_seeds(g.loc[g['protocol'] == p, 'seed'])}"
            for p in names
            if (g["protocol"] == p).any()
        )
        digest = f" (sha256 {sha[:12]}…)" if sha else ""
        lines.append(
            f"Imported episodes: {file}{digest} gave the tasks of {where}; entries on them are "
            "marked imported."
        )
    return lines


def task_set_notes(df: pd.DataFrame, protocols: str | Sequence[str] | None = None) -> list[str]:
    """One line per protocol whose rows ran on several task sets (manifests changed between
    runs: protocol file edited, episodes imported, other data): each set's label, its manifest
    hashes per seed and what made it, saying that those entries are never pooled or paired."""
    data, names = _rows(df, protocols)
    sets = task_sets(data)
    lines = []
    for p in names:
        of_p = sets[sets["protocol"] == p]
        if of_p.empty:
            continue
        differs = {c: of_p[c].nunique() > 1 for c in TASK_ORIGIN}
        parts = []
        for label, g in of_p.groupby("task_set", sort=True):
            manifests = ", ".join(
                f"{short_hash(m)} (seed {int(s)})"
                for s, m in zip(g["seed"], g["manifest_hash"], strict=True)
            )
            what = [source_text(g["task_source"].iloc[0], sha=True) or "source not recorded"]
            if differs["protocol_hash"]:
                what.append(f"protocol hash {short_hash(g['protocol_hash'].iloc[0])}")
            if differs["data_fingerprint"]:
                what.append(f"data {short_hash(g['data_fingerprint'].iloc[0])}")
                note = g["data_note"].iloc[0]
                if note:
                    what.append(note.rstrip("."))
            if g["first_used"].iloc[0]:
                what.append(f"first run {g['first_used'].iloc[0]}")
            plural = "s" if len(g) > 1 else ""
            parts.append(f"tasks {label} = manifest{plural} {manifests}: {', '.join(what)}")
        lines.append(
            f"{p} ran on {len(parts)} different task sets (its tasks changed between runs); "
            "entries on different task sets are listed separately, never pooled and never "
            "paired: " + "; ".join(parts) + "."
        )
    return lines


def provenance_notes(df: pd.DataFrame, protocols: str | Sequence[str] | None = None) -> list[str]:
    """:func:`imported_notes` and :func:`task_set_notes` of the rows of ``protocols``."""
    return imported_notes(df, protocols) + task_set_notes(df, protocols)
