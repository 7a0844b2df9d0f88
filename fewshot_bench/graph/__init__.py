"""faiss kNN graphs, label diffusion, spectral embedding, Sinkhorn and pseudo-label confidence."""

from fewshot_bench.graph.build import (
    BackgroundGraphCache,
    Graph,
    build_block_graph,
    build_graph,
    graph_from_neighbors,
)
from fewshot_bench.graph.confidence import PseudoLabels, confident_pseudo_labels
from fewshot_bench.graph.diffusion import diffuse, diffuse_select, select_n_iter, sinkhorn
from fewshot_bench.graph.knn import KnnIndex, Neighbors, knn_search
from fewshot_bench.graph.spectral import SpectralEmbedding, spectral_embedding, vote

__all__ = [
    "BackgroundGraphCache",
    "Graph",
    "KnnIndex",
    "Neighbors",
    "PseudoLabels",
    "SpectralEmbedding",
    "build_block_graph",
    "build_graph",
    "confident_pseudo_labels",
    "diffuse",
    "diffuse_select",
    "graph_from_neighbors",
    "knn_search",
    "select_n_iter",
    "sinkhorn",
    "spectral_embedding",
    "vote",
]
