"""``nn.Module`` wrappers around :mod:`rest_fast.ops`."""

from rest_fast.nn.temporal_adapter import TemporalAdapter

__all__ = ["TemporalAdapter"]
