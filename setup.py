"""Build script: the pybind11 extension ``rest_fast._C`` (caption cache, CPU top-k selection).

``REST_FAST_NO_NATIVE=1`` skips the native build; the package then uses its pure-Python
``CaptionCache`` (same API, same behaviour). The extension does not link torch.
"""

import os
import sys

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("REST_FAST_NO_NATIVE", "0") not in ("1", "true", "yes"):
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    extra = ["-O3", "-fvisibility=hidden"] if sys.platform != "win32" else ["/O2"]
    ext_modules.append(
        Pybind11Extension(
            "rest_fast._C",
            sources=["csrc/caption_cache.cpp", "csrc/topk_select.cpp", "csrc/bindings.cpp"],
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=extra + ["-pthread"],
            extra_link_args=["-pthread"],
        )
    )
    cmdclass["build_ext"] = build_ext

setup(ext_modules=ext_modules, cmdclass=cmdclass)
