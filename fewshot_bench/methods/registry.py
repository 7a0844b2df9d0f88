"""Method registry: ``@register_method`` plus the ``fewshot_bench.methods`` entry-point group."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib.metadata import entry_points

from fewshot_bench.errors import ProtocolError
from fewshot_bench.methods.base import CONSUMES, SETTINGS, Method

ENTRY_POINT_GROUP = "fewshot_bench.methods"
_REGISTRY: dict[str, type[Method]] = {}
_plugins_loaded = False


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make ``cls`` available to ``fsbench run --method NAME``."""

    def decorate(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register_method({name!r}) must decorate a Method subclass")
        if cls.consumes not in CONSUMES:
            raise ValueError(f"{cls.__name__}.consumes must be one of {CONSUMES}")
        if cls.setting not in SETTINGS:
            raise ValueError(f"{cls.__name__}.setting must be one of {SETTINGS}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            if (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(
                    f"method name {name!r} is already registered by {existing.__module__}"
                )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_builtin() -> None:
    import fewshot_bench.methods.builtin  # noqa: F401  (registers on import)


def builtin_method(name: str) -> type[Method] | None:
    """The built-in class registered as ``name`` (``None``: not a built-in method). Entry-point
    plugins are not loaded, and a class defined outside the package does not count."""
    _load_builtin()
    cls = _REGISTRY.get(name)
    if cls is None or not cls.__module__.startswith("fewshot_bench.methods."):
        return None
    module = sys.modules.get(cls.__module__)
    return cls if getattr(module, cls.__qualname__, None) is cls else None


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()  # a module (registers on import) or a Method subclass
        if not (isinstance(obj, type) and issubclass(obj, Method)):
            continue
        registered = next((n for n, c in _REGISTRY.items() if c is obj), None)
        if registered is not None and registered != ep.name:
            raise ProtocolError(
                f"plugin entry point {ep.name!r} ({ep.value}) names a class registered as "
                f"{registered!r}: give the entry point and @register_method the same name"
            )
        if registered is None:
            register_method(ep.name)(obj)


def available_methods() -> dict[str, type[Method]]:
    """All registered methods, built-in and from installed plugins, by name."""
    _load_builtin()
    _load_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[Method]:
    methods = available_methods()
    if name not in methods:
        raise ProtocolError(
            f"unknown method {name!r}; available: {', '.join(methods)}. "
            f"Third-party methods register through the {ENTRY_POINT_GROUP!r} entry-point group."
        )
    return methods[name]
