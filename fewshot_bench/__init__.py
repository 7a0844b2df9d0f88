"""fewshot-bench: episodic few-shot and semi-supervised benchmarking around label propagation."""

__version__ = "0.1.0"
