"""Confidence intervals and paired tests over the results store.

Conventions (the ones few-shot and semi-supervised papers use):

* 95% intervals. ``"normal"``: ``1.96 * sd / sqrt(n)``; ``"t"``: ``t_{0.975, n-1} * sd / sqrt(n)``;
  ``sd`` always with ``ddof=1``. ``"auto"`` picks ``"t"`` when ``n < 30``.
* Aggregation unit (:func:`aggregate`): when every seed of a group holds exactly one task
  (a semi-supervised split such as CIFAR-10 with 250 labels, one ImageNet low-shot draw per
  seed) the interval is over seeds, always with Student-t. Otherwise (episodic protocols,
  possibly with several seeds) all episodes are pooled and treated as one sample ("auto": the
  1.96 normal interval for the usual hundreds of episodes, Student-t when fewer than 30). Pooling
  treats episodes of different seeds as exchangeable, which they are: a seed only picks which
  episodes are drawn. Seed-to-seed spread of a *trained* method is not separated out.
  Rows of different task sets (manifests) or code are never pooled: they are different entries
  (:mod:`fewshot_bench.report.entries`).
* Paired comparisons pair a task only with the very same task: same protocol, manifest hash,
  seed and task index (:data:`PAIR_KEY`); task *i* of one task set is never paired with task *i*
  of another.
* ``n = 1``: mean only; ``half_width`` and ``sd`` are NaN and ``method`` is ``"none"``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats as _st

from fewshot_bench.errors import FsbenchError
from fewshot_bench.report.entries import assign_task_sets, short_hash
from fewshot_bench.run.store import KEY

CIMethod = Literal["auto", "normal", "t"]

#: Columns every results frame must have; the others get defaults (see :func:`prepare`). The
#: manifest hash is required: without it rows of different task sets could be pooled or paired.
REQUIRED_COLUMNS = (
    "protocol",
    "manifest_hash",
    "method",
    "config_hash",
    "seed",
    "task_index",
    "accuracy",
)
#: Optional columns and their defaults when absent (the store always has them).
OPTIONAL_COLUMNS: dict[str, object] = {
    "family": "",
    "protocol_hash": "",
    "task_source": "",
    "data_fingerprint": "",
    "data_note": "",
    "code_fingerprint": "",
    "params": "",
    "config": "",
    "setting": "",
    "backbone": "",
    "backbone_hash": "",
    "budget": np.nan,
    "top5": np.nan,
    "seconds": np.nan,
    "device": "",
    "hardware": "",
    "x_value": np.nan,
    "x_label": "",
    "package_version": "",
    "git_commit": "",
    "timestamp": "",
}
_NUMERIC = ("accuracy", "top5", "seconds", "x_value", "budget")
#: One task of one entry: the results store's primary key.
TASK_KEY = KEY
#: Tasks are paired only when all of these match: same task set, same seed, same task.
PAIR_KEY = ["protocol", "manifest_hash", "seed", "task_index"]
Z_95 = 1.96
T_THRESHOLD = 30


class ReportError(FsbenchError):
    """The results cannot be reported as asked (missing columns, no shared tasks, ...)."""


@dataclass(frozen=True)
class CI:
    """A mean with its 95% confidence half-width; ``method`` is "normal", "t" or "none" (n < 2)."""

    mean: float
    half_width: float
    n: int
    sd: float
    method: str

    @property
    def low(self) -> float:
        """Lower end of the interval (NaN without an interval)."""
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        """Upper end of the interval (NaN without an interval)."""
        return self.mean + self.half_width

    @property
    def has_interval(self) -> bool:
        """Whether a half-width could be computed (n >= 2)."""
        return not math.isnan(self.half_width)

    def format(self, scale: float = 100.0, digits: int = 2) -> str:
        """``"98.12 ± 0.21"`` (values scaled, e.g. to percent); ``"98.12 (n=1, no CI)"`` for n < 2."""
        if math.isnan(self.mean):
            return "n/a"
        mean = f"{self.mean * scale:.{digits}f}"
        if not self.has_interval:
            return f"{mean} (n={self.n}, no CI)"
        return f"{mean} ± {self.half_width * scale:.{digits}f}"

    def __str__(self) -> str:
        return self.format(scale=1.0, digits=4)


def mean_ci(values: Iterable[float], *, method: CIMethod = "auto") -> CI:
    """Mean and 95% CI half-width of ``values`` ("auto": Student-t when n < 30, else normal)."""
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    x = x.ravel()
    if x.size == 0:
        raise ReportError("mean_ci: no values to aggregate")
    if not np.all(np.isfinite(x)):
        raise ReportError("mean_ci: values contain NaN or inf; drop missing results first")
    if method not in ("auto", "normal", "t"):
        raise ValueError(f"mean_ci: method must be 'auto', 'normal' or 't', not {method!r}")
    n = int(x.size)
    mean = float(x.mean())
    if n < 2:
        return CI(mean, math.nan, n, math.nan, "none")
    sd = float(x.std(ddof=1))
    chosen = ("t" if n < T_THRESHOLD else "normal") if method == "auto" else method
    q = float(_st.t.ppf(0.975, n - 1)) if chosen == "t" else Z_95
    return CI(mean, q * sd / math.sqrt(n), n, sd, chosen)


@dataclass(frozen=True)
class Aggregate:
    """A group's CI and the unit it was computed over ("seeds" or "tasks")."""

    ci: CI
    unit: str

    def describe(self) -> str:
        """E.g. ``"5 seeds (t)"`` or ``"600 tasks (normal)"``."""
        unit = self.unit[:-1] if self.ci.n == 1 else self.unit
        return f"{self.ci.n} {unit} ({self.ci.method})"


def aggregate(group: pd.DataFrame, column: str = "accuracy") -> Aggregate:
    """CI of ``column`` for one configuration's rows, over seeds or pooled tasks (module docstring)."""
    sub = group[["seed", column]].copy()
    sub[column] = pd.to_numeric(sub[column], errors="coerce")
    sub = sub.dropna(subset=[column])
    if sub.empty:
        return Aggregate(CI(math.nan, math.nan, 0, math.nan, "none"), "tasks")
    per_seed = sub.groupby("seed", sort=True)[column]
    if per_seed.size().max() == 1 and per_seed.ngroups > 1:
        return Aggregate(mean_ci(per_seed.first().to_numpy(), method="t"), "seeds")
    return Aggregate(mean_ci(sub[column].to_numpy(), method="auto"), "tasks")


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Validate a results frame, fill optional columns, coerce types, drop duplicate tasks and
    add the ``task_set`` column (:func:`~fewshot_bench.report.entries.assign_task_sets`).

    The store's primary key (:data:`TASK_KEY`) makes a task row unique, but frames concatenated
    from several stores may repeat one; the latest row (by ``timestamp``, then by position) is
    kept and a warning says how many were dropped. A frame that already has ``task_set`` keeps it,
    so a subset of a prepared frame keeps the labels of the whole.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ReportError(
            f"results are missing column(s) {missing}; expected at least {list(REQUIRED_COLUMNS)}"
        )
    out = df.copy()
    for col, default in OPTIONAL_COLUMNS.items():
        if col not in out.columns:
            out[col] = default
    for col in _NUMERIC:
        out[col] = pd.to_numeric(out[col], errors="coerce").astype(float)
    for col in ("protocol", "manifest_hash", "method", "config_hash") + tuple(
        c for c, d in OPTIONAL_COLUMNS.items() if isinstance(d, str)
    ):
        out[col] = out[col].fillna("").astype(str)
    out["seed"] = out["seed"].astype(int)
    out["task_index"] = out["task_index"].astype(int)
    if out["accuracy"].isna().any():
        bad = int(out["accuracy"].isna().sum())
        raise ReportError(f"{bad} result row(s) have no accuracy; the results store is corrupt")
    out["_order"] = np.arange(len(out))
    out = out.sort_values(["timestamp", "_order"], kind="stable")
    dup = out.duplicated(subset=TASK_KEY, keep="last")
    if dup.any():
        warnings.warn(
            f"{int(dup.sum())} duplicate result row(s) for the same task and configuration; "
            "keeping the latest of each",
            stacklevel=3,
        )
        out = out[~dup]
    out = out.sort_values("_order").drop(columns="_order").reset_index(drop=True)
    if "task_set" not in out.columns:
        out["task_set"] = assign_task_sets(out)
    out["task_set"] = out["task_set"].fillna("").astype(str)
    return out


@dataclass(frozen=True)
class PairedResult:
    """Method A minus method B on their shared tasks (accuracy as a fraction)."""

    method_a: str
    method_b: str
    n: int
    mean_diff: float
    ci: CI
    t_pvalue: float
    wilcoxon_pvalue: float

    def format(self, scale: float = 100.0, digits: int = 2) -> str:
        """E.g. ``"+1.23 ± 0.40 (p=0.0031, n=600)"`` (t-test p-value)."""
        diff = f"{self.mean_diff * scale:+.{digits}f}"
        hw = "" if not self.ci.has_interval else f" ± {self.ci.half_width * scale:.{digits}f}"
        return f"{diff}{hw} (p={format_p(self.t_pvalue)}, n={self.n})"


def format_p(p: float) -> str:
    """A p-value for tables: ``"<1e-4"`` when tiny, ``"n/a"`` when undefined."""
    if p is None or math.isnan(p):
        return "n/a"
    if p < 1e-4:
        return "<1e-4"
    return f"{p:.4f}" if p < 0.01 else f"{p:.3f}"


def _pick(
    df: pd.DataFrame,
    method: str,
    config: str | None,
    code: str | None,
    protocol: str | None,
) -> pd.DataFrame:
    sub = df[df["method"] == method]
    if protocol is not None:
        sub = sub[sub["protocol"] == protocol]
    if config is not None:
        sub = sub[sub["config_hash"].str.startswith(config)]
    if code is not None:
        sub = sub[sub["code_fingerprint"].str.startswith(code)]
    if sub.empty:
        where = f" on protocol {protocol!r}" if protocol else ""
        cfg = f" with config {config!r}" if config else ""
        cfg += f" and code {code!r}" if code else ""
        raise ReportError(f"no results for method {method!r}{cfg}{where}")
    entry = sub["config_hash"] + " code " + sub["code_fingerprint"].map(short_hash)
    entry += " on " + sub["backbone"]
    clash = entry.groupby([sub[c] for c in PAIR_KEY]).nunique()
    if (clash > 1).any():
        raise ReportError(
            f"method {method!r} has several entries on the same tasks ({sorted(set(entry))}): "
            "several configurations, code versions or backbones; pass config_a/config_b or "
            "code_a/code_b to choose one"
        )
    return sub


def paired_differences(a: pd.DataFrame, b: pd.DataFrame) -> np.ndarray:
    """Accuracy of ``a`` minus ``b`` on the tasks both hold: joined on :data:`PAIR_KEY`
    (protocol, manifest hash, seed, task index), so only the very same tasks are paired."""
    cols = [*PAIR_KEY, "accuracy"]
    try:
        joined = a[cols].merge(b[cols], on=PAIR_KEY, suffixes=("_a", "_b"), validate="1:1")
    except pd.errors.MergeError as exc:
        raise ReportError(
            f"a task appears twice on one side of a paired comparison ({exc})"
        ) from None
    return (joined["accuracy_a"] - joined["accuracy_b"]).to_numpy(dtype=float)


def _task_sets_text(rows: pd.DataFrame) -> str:
    return ", ".join(sorted({short_hash(m) for m in rows["manifest_hash"]}))


def shares_positions_only(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Whether ``a`` and ``b`` share no task but do share (protocol, seed, task index)
    positions, i.e. they ran different task sets (manifests) of a protocol."""
    pos = ["protocol", "seed", "task_index"]
    return (
        paired_differences(a, b).size == 0
        and not a[pos].merge(b[pos].drop_duplicates(), on=pos).empty
    )


def _paired_from_diffs(name_a: str, name_b: str, d: np.ndarray) -> PairedResult:
    n = int(d.size)
    # t interval, so that the CI excludes 0 exactly when the paired t-test gives p < 0.05.
    ci = mean_ci(d, method="t")
    if n < 2:
        p_t = p_w = math.nan
    elif np.all(d == 0):
        p_t = p_w = 1.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p_t = float(_st.ttest_1samp(d, 0.0).pvalue)
            p_w = float(_st.wilcoxon(d).pvalue)
    return PairedResult(name_a, name_b, n, ci.mean, ci, p_t, p_w)


def paired_test(
    df: pd.DataFrame,
    method_a: str,
    method_b: str,
    *,
    protocol: str | None = None,
    config_a: str | None = None,
    config_b: str | None = None,
    code_a: str | None = None,
    code_b: str | None = None,
) -> PairedResult:
    """Paired comparison of two methods on the tasks both ran (A − B accuracy).

    Tasks are matched on (protocol, manifest hash, seed, task index) (:data:`PAIR_KEY`);
    ``protocol`` restricts to one protocol (otherwise shared tasks of all protocols are pooled).
    ``config_*`` and ``code_*`` choose among a method's entries (a config hash or code
    fingerprint, or a prefix of one). Returns the mean difference, its 95% Student-t CI, the
    paired t-test and Wilcoxon signed-rank p-values and the number of pairs. Raises
    :class:`ReportError` when the two share no task, saying so when they ran different task
    sets of the same protocol.
    """
    df = prepare(df)
    a = _pick(df, method_a, config_a, code_a, protocol)
    b = _pick(df, method_b, config_b, code_b, protocol)
    d = paired_differences(a, b)
    if d.size == 0:
        if shares_positions_only(a, b):
            raise ReportError(
                f"methods {method_a!r} and {method_b!r} share no task set: they ran different "
                f"manifests ({method_a}: {_task_sets_text(a)}; {method_b}: "
                f"{_task_sets_text(b)}), so task i of one is not task i of the other; nothing is "
                "paired. Run both on the same task set to compare them"
            )
        raise ReportError(
            f"methods {method_a!r} and {method_b!r} share no tasks (matched on protocol, "
            "manifest hash, seed and task index); run both on the same protocol and seeds to "
            "compare them"
        )
    return _paired_from_diffs(method_a, method_b, d)
