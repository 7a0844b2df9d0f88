"""Imports every built-in method module so their ``@register_method`` decorators run."""

from fewshot_bench.methods import (  # noqa: F401
    maml,
    mean_teacher,
    metric_transfer,
    propagation,
    protonet,
    simple,
    soft_kmeans,
)
