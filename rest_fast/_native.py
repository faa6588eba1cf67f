"""Loading the native extension ``rest_fast._C`` once, for every module that has a native fast path.

``REST_FAST_NO_NATIVE=1`` turns it off (the pure-Python/torch paths are then used); a missing or stale build
(one without the class a caller needs) counts as not loaded, and the reason is kept for ``rest-fast info``.
"""

from __future__ import annotations

import os
from types import ModuleType


def load_native(cls_name: str) -> tuple[ModuleType | None, str | None]:
    """``(rest_fast._C, None)`` when the extension loads and has ``cls_name``, else ``(None, reason)``."""
    if os.environ.get("REST_FAST_NO_NATIVE", "0").lower() in ("1", "true", "yes"):
        return None, "disabled by REST_FAST_NO_NATIVE=1"
    try:
        from rest_fast import _C

        getattr(_C, cls_name)
    except Exception as exc:  # noqa: BLE001 - any failure means "use the fallback"; keep the reason
        return None, f"{type(exc).__name__}: {exc}"
    return _C, None
