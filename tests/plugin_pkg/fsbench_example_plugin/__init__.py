"""A third-party method: cosine similarity to class centroids, registered by entry point."""

import torch.nn.functional as F

from fewshot_bench.methods import Method


class ExampleCentroid(Method):
    consumes = "features"
    setting = "inductive"
    defaults = {"scale": 10.0}

    def predict(self, task, ctx):
        sup = F.normalize(task.support.float(), dim=1)
        onehot = F.one_hot(task.support_labels, task.n_way).float()
        centroids = F.normalize(onehot.T @ sup, dim=1)
        return self.params["scale"] * F.normalize(task.query.float(), dim=1) @ centroids.T
