"""Fused ops (Triton on CUDA, references on CPU), importable into other models.

Dispatch rule shared by every op here: CUDA tensors use the Triton kernels; CPU tensors use the
Triton kernels through the interpreter when ``TRITON_INTERPRET=1`` is set (how the tests exercise
the real kernels without a GPU), and the pure-torch reference otherwise.
"""

from rest_fast.ops.dwconv3d import temporal_dwconv3d, temporal_dwconv3d_ref
from rest_fast.ops.rerank import rerank_captions, rerank_captions_ref
from rest_fast.ops.topk import topk_similarity, topk_similarity_ref

__all__ = ["temporal_dwconv3d", "temporal_dwconv3d_ref", "topk_similarity", "topk_similarity_ref",
           "rerank_captions", "rerank_captions_ref"]
