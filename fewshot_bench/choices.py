"""Names the command line offers as choices, kept free of heavy imports.

Building ``fsbench``'s parser (``fsbench --help``, a mistyped option) should not wait for torch;
the modules that implement these names import them from here.
"""

from __future__ import annotations

#: Built-in backbone architectures (:mod:`fewshot_bench.backbones.nets`; also ``wrn-D-K``).
ARCHS = ("conv4", "resnet12", "wrn-28-2", "wrn-28-10")
#: Pretraining objectives (:mod:`fewshot_bench.backbones.objectives`).
OBJECTIVES = ("ce", "nca", "instance")
#: Where methods run (:mod:`fewshot_bench.run.executor`, :mod:`fewshot_bench.run.ray_executor`).
EXECUTORS = ("serial", "processes", "ray")
