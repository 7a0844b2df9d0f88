"""Method interface, registry and the built-in methods."""

from fewshot_bench.methods.base import FitSource, Method, TaskContext
from fewshot_bench.methods.registry import available_methods, get_method, register_method

__all__ = [
    "FitSource",
    "Method",
    "TaskContext",
    "available_methods",
    "get_method",
    "register_method",
]
