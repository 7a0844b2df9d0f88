"""Tasks, episode samplers, semi-supervised splits, protocols and frozen manifests."""

from fewshot_bench.tasks.task import Task, TaskIndices, TaskTruth, task_truth

__all__ = ["Task", "TaskIndices", "TaskTruth", "task_truth"]
