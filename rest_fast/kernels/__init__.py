"""``@triton.jit`` kernels only; launchers and public entry points live in :mod:`rest_fast.ops`."""
