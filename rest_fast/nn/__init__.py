"""``nn.Module`` wrappers around :mod:`rest_fast.ops`."""
