"""rest_fast: performance-first REST (REtrieve & Self-Train) for generative action recognition.

Layout (imports point down): ``cli`` → ``train`` / ``eval`` → ``models`` / ``generation`` /
``retrieval`` / ``data`` / ``cache`` → ``nn`` → ``ops`` → ``kernels``.

``import rest_fast`` is cheap: the public names below are loaded on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["CaptionCache", "normalize_caption", "__version__"]


def __getattr__(name: str):
    if name in ("CaptionCache", "normalize_caption"):
        from rest_fast import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'rest_fast' has no attribute {name!r}")
