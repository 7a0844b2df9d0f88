"""Typed method parameters: a schema per method, shared groups, parsing from the command line.

A method declares ``schema = {name: Param(...)}`` (often ``{**GRAPH, **DIFFUSION, ...}`` from
the groups below). ``Method(**values)`` checks every value against its :class:`Param` before any
task runs and refuses a bad one with one line naming the method, the parameter, the value and
what is allowed. A method (for example a third-party plugin) that only sets ``defaults`` gets a
schema inferred from the default values' types.

One meaning per name across methods: ``normalize`` is always one of ``l2`` / ``center-l2`` /
``none``; every ``*temperature`` *divides* what it scales (``exp(s / T)``, ``softmax(z / T)``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fewshot_bench.errors import ProtocolError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_ANY = object()


@dataclass(frozen=True)
class Param:
    """One parameter: default, type, allowed values and a one-line doc.

    ``kind``: ``int``, ``float``, ``bool``, ``str``, ``list`` (of ``item``) or ``None`` (any
    JSON-able value). ``low``/``high`` bound numbers (``open_low``/``open_high`` exclude the
    bound); ``choices`` lists the allowed values; ``optional`` allows ``None``; ``auto`` allows
    the string ``"auto"`` (the method then chooses, e.g. on held-out support items).
    """

    default: Any
    doc: str = ""
    kind: type | None = _ANY  # type: ignore[assignment]
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[Any, ...] | None = None
    optional: bool = False
    auto: bool = False
    item: type | None = None
    group: str = ""

    def __post_init__(self) -> None:
        if self.kind is _ANY:
            object.__setattr__(self, "kind", infer_kind(self.default))
        if self.default is None:
            object.__setattr__(self, "optional", True)
        if self.default == "auto" and self.kind is not str and self.choices is None:
            object.__setattr__(self, "auto", True)

    def allowed(self) -> str:
        """What this parameter accepts, in words (used in error messages and ``fsbench methods``)."""
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind is None:
            text = "any value"
        else:
            text = self.kind.__name__
            if self.kind is list and self.item is not None:
                text = f"list of {self.item.__name__}"
            bounds = []
            if self.low is not None:
                bounds.append(f"{'>' if self.open_low else '>='} {self.low:g}")
            if self.high is not None:
                bounds.append(f"{'<' if self.open_high else '<='} {self.high:g}")
            if bounds:
                text += " " + " and ".join(bounds)
        extras = (["'auto'"] if self.auto else []) + (["none"] if self.optional else [])
        return text + "".join(f" or {e}" for e in extras)

    def check(self, value: Any) -> Any:
        """``value`` converted to this parameter's type; ``ValueError`` when it is not allowed."""
        if isinstance(value, str) and self.kind is not str:
            value = parse_value(value)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if self.optional:
                return None
            if value is None:
                raise ValueError
        if self.auto and isinstance(value, str) and value.lower() == "auto":
            return "auto"
        value = self._convert(value)
        if self.choices is not None and value not in self.choices:
            raise ValueError
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self._check_bounds(value)
        if isinstance(value, list):
            for v in value:
                self._check_bounds(v)
        return value

    def _convert(self, value: Any) -> Any:
        if self.kind is list:
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [convert(self.item, v) for v in value]
        return convert(self.kind, value)

    def _check_bounds(self, v: Any) -> None:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return
        if self.low is not None and (v <= self.low if self.open_low else v < self.low):
            raise ValueError
        if self.high is not None and (v >= self.high if self.open_high else v > self.high):
            raise ValueError


def convert(kind: type | None, value: Any) -> Any:
    """``value`` as ``kind`` (``None``: as it is); ``ValueError`` when it is not one: booleans are
    not numbers, an int must be whole, a float finite."""
    if kind is None:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ValueError
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if not math.isfinite(value):
            raise ValueError
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    raise ValueError


def infer_kind(default: Any) -> type | None:
    """The type a plain default value implies (``None`` for ``None`` or unusual values)."""
    for kind in (bool, int, float, str, list):
        if isinstance(default, kind):
            return kind
    return None


Schema = dict[str, Param]


def schema_from_defaults(defaults: Mapping[str, Any]) -> Schema:
    """A schema for a method that only declares ``defaults`` (types inferred; ints accept only
    integers, floats any finite number)."""
    return {k: Param(v) for k, v in defaults.items()}


def validate(method: str, schema: Schema, values: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overridden by ``values``, every value checked; refusals raise one-line errors."""
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise ProtocolError(
            f"method {method!r} has no parameter(s) {', '.join(unknown)}; its parameters are "
            f"{', '.join(sorted(schema))} (see `fsbench methods {method}`)"
        )
    out = {}
    for name, param in schema.items():
        value = values.get(name, param.default)
        try:
            out[name] = param.check(value)
        except (ValueError, TypeError, OverflowError):
            raise ProtocolError(
                f"method {method!r}: parameter {name}={value!r} is not allowed; "
                f"{name} must be {param.allowed()}"
            ) from None
    return out


def parse_value(text: str) -> Any:
    """A command-line value: a TOML value (``10``, ``0.5``, ``true``, ``[0.2, 0.8]``, ``"a,b"``),
    else Python literals ``True``/``False``/``None``, else the text itself."""
    text = text.strip()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    literal = {"True": True, "False": False, "None": None}
    if text in literal:
        return literal[text]
    try:
        return float(text)  # 1e400, nan, inf: refused later by the schema with a clear message
    except ValueError:
        return text


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """``text`` split at ``sep`` outside brackets, braces and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in (s.strip() for s in parts) if p]


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name:key=value,key=value``; values as :func:`parse_value` reads them, so
    lists and quoted strings may contain commas (``prior=[0.2,0.8]``)."""
    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for item in split_top_level(rest):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ProtocolError(
                f"bad method parameter {item!r} in {spec!r}; write name:key=value,key=value"
            )
        params[key.strip()] = parse_value(value)
    if not name.strip():
        raise ProtocolError(f"bad method spec {spec!r}: it names no method")
    return name.strip(), params


def load_method_config(path: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Methods, parameters and tuning records from a TOML file: ``[[method]]`` tables with
    ``name = "..."``, the parameters as keys and optionally a ``[method.tuning]`` table saying
    how they were chosen (``fsbench tune`` writes this format)."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ProtocolError(f"--method-config {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProtocolError(f"--method-config {path}: not valid TOML ({exc})") from None
    tables = doc.get("method")
    if not isinstance(tables, list) or not tables:
        raise ProtocolError(
            f'--method-config {path}: expected [[method]] tables, each with name = "..." and '
            "its parameters"
        )
    out = []
    for i, table in enumerate(tables):
        params = dict(table)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise ProtocolError(f"--method-config {path}: [[method]] number {i + 1} has no name")
        tuning = params.pop("tuning", {})
        if not isinstance(tuning, dict):
            raise ProtocolError(f"--method-config {path}: tuning of {name!r} must be a table")
        out.append((name, params, tuning))
    return out


def describe_schema(schema: Schema) -> list[str]:
    """Lines for ``fsbench methods NAME``: grouped parameters with default, allowed values, doc."""
    lines: list[str] = []
    groups: dict[str, list[str]] = {}
    for name, p in schema.items():
        groups.setdefault(p.group or "method", []).append(name)
    for group, names in groups.items():
        lines.append(f"  [{group}]")
        for name in names:
            p = schema[name]
            lines.append(f"    {name} = {p.default!r}  ({p.allowed()})")
            if p.doc:
                lines.append(f"        {p.doc}")
    return lines


def grouped(group: str, params: dict[str, Param]) -> Schema:
    """``params`` tagged with ``group`` (the heading ``fsbench methods NAME`` shows them under)."""
    return {k: dataclasses.replace(p, group=group) for k, p in params.items()}
