"""Is a model name a local path or a Hugging Face hub id, and is a hub id already cached? Answered without the
network (issue 23, item 11): a mistyped local folder must never become a hub request with minutes of retries."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["looks_like_local_path", "cached_hub_snapshot"]

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def looks_like_local_path(spec: str) -> bool:
    """True when ``spec`` is meant as a local path: it starts with ``.``, ``/`` or ``~``, has more than one
    ``/`` (a hub id has one), or its first component is a folder here (``runs/nope`` with ``runs/`` present:
    a mistyped run folder, not the hub organisation ``runs``)."""
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec:
        return True
    head = spec.split("/", 1)[0]
    return "/" in spec and os.path.isdir(head)


def cached_hub_snapshot(repo_id: str) -> str | None:
    """The local snapshot folder of hub model ``repo_id`` when the Hugging Face cache holds its config and
    weights, else None. Never makes a request."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, not a valid id, hub library missing: not available offline
        return None
    if (path / "config.json").is_file() and any((path / f).is_file() for f in _WEIGHT_FILES):
        return str(path)
    return None
