"""Imports every built-in method module so their ``@register_method`` decorators run."""

from fewshot_bench.methods import (  # noqa: F401
    ilpc,
    laplacianshot,
    maml,
    mean_teacher,
    metric_transfer,
    propagation,
    protonet,
    pt_map,
    simple,
    simpleshot,
    soft_kmeans,
    tim,
    tpn,
)
