"""``python -m fewshot_bench`` is ``fsbench``."""

from fewshot_bench.cli import entry

entry()
