"""Run cards: ``baselines/*.toml``, one per baseline — its settings per protocol and the numbers
its paper reports, so leaderboards can print "reported" beside "measured".

A card::

    method = "protonet"                      # a registered method name
    title = "Prototypical Networks"
    paper = "Snell, Swersky & Zemel, ... NeurIPS 2017"
    notes = "..."                            # optional

    [protocols.omniglot-5w1s]
    params = { train_way = 60 }              # method parameters we run it with
    budget = 1500                            # training steps (optional)
    reported = 98.8                          # the paper's accuracy in percent (optional)
    reported_ci = 0.2                        # its ± (optional)
    source = "Snell et al. 2017, Table 1"    # required with `reported`
    differences = "..."                      # how the paper's protocol differs from ours
    command = "fsbench run ..."              # optional: how the measured number was made

Other keys inside a protocol table are kept in ``ProtocolCard.extra`` (e.g. a second reported
column); unknown top-level keys are an error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewshot_bench.errors import FsbenchError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BASELINES_ENV = "FSBENCH_BASELINES"
_TOP_KEYS = {"method", "title", "paper", "setting", "notes", "protocols"}
_KNOWN_PROTOCOL_KEYS = {"params", "budget", "reported", "reported_ci", "source", "differences"}


class CardError(FsbenchError):
    """A run card is malformed."""


def builtin_cards_dir() -> Path:
    """The ``baselines/`` folder beside the package (source checkout or installed data);
    ``$FSBENCH_BASELINES`` overrides it."""
    env = os.environ.get(BASELINES_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "baselines", here.parents[1] / "baselines"):
        if candidate.is_dir():
            return candidate
    return here.parents[2] / "baselines"


@dataclass(frozen=True)
class ProtocolCard:
    """One baseline's entry for one protocol."""

    protocol: str
    params: dict[str, Any] = field(default_factory=dict)
    budget: int | None = None
    reported: float | None = None
    reported_ci: float | None = None
    source: str = ""
    differences: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Card:
    """A baseline's run card."""

    method: str
    title: str
    paper: str
    path: Path
    setting: str = ""
    notes: str = ""
    protocols: dict[str, ProtocolCard] = field(default_factory=dict)

    def method_spec(self, protocol: str) -> str:
        """The ``-m`` argument of ``fsbench run`` for this card's settings on ``protocol``."""
        entry = self.protocols[protocol]
        items = ",".join(
            f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in entry.params.items()
        )
        return f"{self.method}:{items}" if items else self.method


def _number(value: Any, where: str, lo: float = 0.0, hi: float = 100.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise CardError(f"{where} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def parse_card(doc: dict[str, Any], path: Path) -> Card:
    """Validate one card's TOML document."""
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise CardError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    for key in ("method", "title", "paper"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise CardError(f"{path}: `{key}` (a non-empty string) is required")
    protocols: dict[str, ProtocolCard] = {}
    table = doc.get("protocols", {})
    if not isinstance(table, dict):
        raise CardError(f"{path}: [protocols] must be a table of tables")
    for name, entry in table.items():
        where = f"{path} [protocols.{name}]"
        if not isinstance(entry, dict):
            raise CardError(f"{where} must be a table")
        params = entry.get("params", {})
        if not isinstance(params, dict):
            raise CardError(f"{where}: params must be an inline table")
        budget = entry.get("budget")
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int) or budget < 0
        ):
            raise CardError(f"{where}: budget must be an integer >= 0, got {budget!r}")
        reported = entry.get("reported")
        if reported is not None:
            reported = _number(reported, f"{where} reported")
            if not entry.get("source"):
                raise CardError(f"{where}: a reported number needs its `source`")
        ci = entry.get("reported_ci")
        if ci is not None:
            ci = _number(ci, f"{where} reported_ci")
        protocols[name] = ProtocolCard(
            protocol=name,
            params=dict(params),
            budget=budget,
            reported=reported,
            reported_ci=ci,
            source=str(entry.get("source", "")),
            differences=str(entry.get("differences", "")),
            extra={k: v for k, v in entry.items() if k not in _KNOWN_PROTOCOL_KEYS},
        )
    return Card(
        method=doc["method"],
        title=doc["title"],
        paper=doc["paper"],
        path=path,
        setting=str(doc.get("setting", "")),
        notes=str(doc.get("notes", "")),
        protocols=protocols,
    )


def load_cards(folder: str | Path | None = None) -> list[Card]:
    """Every ``*.toml`` card in ``folder`` (default: the repository's ``baselines/``), by name."""
    root = Path(folder) if folder is not None else builtin_cards_dir()
    if not root.is_dir():
        raise CardError(f"run-card folder {root} does not exist")
    cards = []
    for path in sorted(root.glob("*.toml")):
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise CardError(f"{path}: not valid TOML ({exc})") from exc
        cards.append(parse_card(doc, path))
    seen: dict[str, Path] = {}
    for card in cards:
        if card.method in seen:
            raise CardError(
                f"method {card.method!r} has two cards: {seen[card.method]} and {card.path}"
            )
        seen[card.method] = card.path
    return cards


def reported_numbers(
    protocol: str, folder: str | Path | None = None, *, with_ci: bool = False
) -> dict[str, tuple]:
    """Method name → (reported accuracy in percent, source) for ``protocol``, from the cards;
    the shape :func:`fewshot_bench.report.leaderboard` takes as ``reported``. ``with_ci``: a
    third item, the card's ``reported_ci`` (``None`` when it gives none)."""
    out: dict[str, tuple] = {}
    for card in load_cards(folder):
        entry = card.protocols.get(protocol)
        if entry is not None and entry.reported is not None:
            item = (entry.reported, entry.source)
            out[card.method] = (*item, entry.reported_ci) if with_ci else item
    return out


def reported_by_protocol(
    protocols: Iterable[str], folder: str | Path | None = None, *, with_ci: bool = False
) -> dict[str, dict[str, tuple]]:
    """:func:`reported_numbers` for several protocols (for ``write_leaderboards(reported=...)``)."""
    return {p: reported_numbers(p, folder, with_ci=with_ci) for p in protocols}
