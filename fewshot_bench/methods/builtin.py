"""Imports every built-in method module so their ``@register_method`` decorators run."""

from fewshot_bench.methods import propagation, simple  # noqa: F401
