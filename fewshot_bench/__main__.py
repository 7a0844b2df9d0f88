"""``python -m fewshot_bench`` is ``fsbench``."""

import sys

from fewshot_bench.cli import main

sys.exit(main())
