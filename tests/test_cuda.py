"""The CUDA paths against the CPU on the same tasks: every built-in feature method, the kNN
search without faiss's GPU build, and a per-task network. Skipped on machines without CUDA
(``scripts/gpu_check.sh`` runs them on one that has it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from digits_episodes import digits_episode

from fewshot_bench.graph.knn import KnnIndex, knn_search
from fewshot_bench.methods import available_methods
from fewshot_bench.methods.base import TaskContext
from fewshot_bench.tasks.task import Task

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

FEATURE_METHODS = sorted(
    name
    for name, cls in available_methods().items()
    if cls.consumes == "features" and cls.__module__.startswith("fewshot_bench.")
)


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_feature_method_on_cuda_agrees_with_cpu(name, digits) -> None:
    """Same task, same seed: the CUDA scores rank the queries as the CPU ones do (float32 sums
    in another order may flip a near tie, never an accuracy)."""
    x, y = digits
    task, query_labels = digits_episode(x, y, 0, way=5, shot=2, queries=10, n_unl=8)
    method = available_methods()[name]
    cpu = method().predict(task, TaskContext.create(0)).float()
    gpu = method().predict(task, TaskContext.create(0, device="cuda"))
    assert gpu.device.type == "cuda" or gpu.device.type == "cpu"
    gpu = gpu.float().cpu()
    assert gpu.shape == cpu.shape and torch.isfinite(gpu).all()
    agree = (gpu.argmax(1) == cpu.argmax(1)).float().mean().item()
    assert agree >= 0.96, f"{name}: CUDA and CPU agree on {agree:.0%} of the queries"
    labels = torch.from_numpy(np.asarray(query_labels))
    acc = [(s.argmax(1) == labels).float().mean().item() for s in (cpu, gpu)]
    assert abs(acc[0] - acc[1]) <= 0.04, f"{name}: accuracy CPU {acc[0]:.3f}, CUDA {acc[1]:.3f}"


def test_torch_knn_path_matches_faiss_on_cpu() -> None:
    """Without faiss's GPU build the CUDA search is a torch scan: same neighbours as faiss."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5000, 32)).astype(np.float32)
    cpu = knn_search(x, None, 10, index="flat")
    gpu = knn_search(x, None, 10, index="flat", device="cuda")
    assert (cpu.indices == gpu.indices).mean() > 0.99
    np.testing.assert_allclose(cpu.sims, gpu.sims, rtol=1e-4, atol=1e-4)
    ivf_cpu = KnnIndex(x, index="ivf", nlist=32, nprobe=4)
    ivf_gpu = KnnIndex(x, index="ivf", nprobe=4, device="cuda", state=ivf_cpu.state())
    assert (ivf_cpu.search_self(10).indices == ivf_gpu.search_self(10).indices).mean() > 0.99


def test_a_task_network_trains_on_cuda(digits) -> None:
    """A per-task network (``supervised``) trains and scores on CUDA; its weights live there."""
    x, y = digits
    pixels = (x.reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    images = torch.from_numpy(pixels.repeat(2, axis=2).repeat(2, axis=3))  # conv4 needs 16×16
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))
    s, q = idx[:50], idx[50:250]
    task = Task(
        support=images[s],
        support_labels=torch.from_numpy(y[s]).long(),
        unlabeled=images[:0],
        query=images[q],
        n_way=10,
        kind="images",
    )
    method = available_methods()["supervised"](steps=30)
    scores = method.predict(task, TaskContext.create(0, device="cuda")).float().cpu()
    assert scores.shape == (200, 10) and torch.isfinite(scores).all()
