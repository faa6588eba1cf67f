"""Every Triton kernel compiled ahead of time for sm_90 and sm_80 (no GPU, no driver): zero spills.

The launches are the launchers' own (see :mod:`rest_fast.ops.aot`); registers and spill bytes come from the
``ptxas -v`` log of the ptxas inside the Triton wheel, shared memory from the compiled kernel's metadata.
The default run compiles a representative set (the trainer's path: fp16 retrieval, bf16 adapters; 12
compiles); the full matrix (every autotune config, fp32/fp16/bf16, k=16/2000, both archs) is
``slow``, split per kernel family, dtype and arch. Results are cached on disk (``REST_FAST_AOT_CACHE``),
keyed by the Triton version, the kernel source and the specialisation, so a rerun costs seconds.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402

from rest_fast.ops import aot  # noqa: E402


def _check(results: list[aot.AotResult]) -> None:
    print("\n" + aot.format_table(results))
    assert results, "no launch compiled"
    bad = [r for r in results if not r.ok]
    assert not bad, "kernels that spill, overflow shared memory or fail to compile:\n" + aot.format_table(bad)


def test_aot_launch_list_covers_every_kernel():
    # Cheap (no compile): every kernel of rest_fast.kernels appears in the full matrix, for each dtype.
    names = {(x.kernel, x.dtype) for x in aot.launches(full=True, arch=90)}
    for kernel in ("filter_kernel", "group_max_kernel", "dwconv3d_fwd_kernel", "dwconv3d_bwd_w_kernel",
                   "rerank_kernel"):
        for dt in ("fp32", "fp16", "bf16"):
            assert (kernel, dt) in names, (kernel, dt)
    assert GPUTarget("cuda", 90, 32).arch == 90


def test_aot_representative_set_compiles_clean():
    _check(aot.compile_all(full=False, archs=(90, 80)))


_FAMILIES = {"topk": ("filter_kernel", "group_max_kernel"), "dwconv3d": ("dwconv3d_fwd_kernel",
             "dwconv3d_bwd_w_kernel"), "rerank": ("rerank_kernel",)}


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("family", list(_FAMILIES))
def test_aot_full_matrix_compiles_clean(family, dtype, arch):
    kernels = _FAMILIES[family]
    _check(aot.compile_all(full=True, archs=(arch,),
                           select=lambda x: x.kernel in kernels and x.dtype == dtype))
