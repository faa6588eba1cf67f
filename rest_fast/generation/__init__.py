"""Decoding: HF-exact beam / greedy search over a preallocated, beam-reordered KV cache."""

from rest_fast.generation.beam_search import Decoder, SearchOutput, beam_search
from rest_fast.generation.kv_cache import StaticKVCache

__all__ = ["Decoder", "SearchOutput", "StaticKVCache", "beam_search"]
