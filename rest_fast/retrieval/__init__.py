"""Retrieval: the frozen-CLIP neighbour graph and exact top-k across ``torch.distributed`` ranks."""

from rest_fast.retrieval.distributed import distributed_topk
from rest_fast.retrieval.graph import NeighbourGraph, cap_neighbours, feature_hash

__all__ = ["distributed_topk", "NeighbourGraph", "cap_neighbours", "feature_hash"]
