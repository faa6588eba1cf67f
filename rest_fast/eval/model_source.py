"""Where a captioner named by a run's ``config.yaml`` or by ``--checkpoint`` is loaded from, without the network
whenever it can be (issue 23, item 11).

A run folder must evaluate, caption and fine-tune offline: the names the trainer itself gives models are not hub
ids and never reach the hub —

* ``demo``: the pretrained demo BLIP shipped in the package (:func:`rest_fast.synthetic.models.demo_blip_dir`);
* ``tiny``: the random-init BLIP the trainer wrote into the run (``RUN/models/tiny_blip``);
* a local folder (a path that exists, or one that looks like a path: ``./x``, ``/x``, ``~/x``, ``runs/x`` when
  ``runs/`` exists here): used as is, or refused in one line when it is missing;
* a hub id already in the local Hugging Face cache: its cached snapshot folder (no request, no retries);
* any other hub id: left to ``from_pretrained`` (the network, or its one-line error offline).
"""

from __future__ import annotations

from pathlib import Path

from rest_fast.models.source import cached_hub_snapshot, looks_like_local_path

__all__ = ["DEMO", "TINY", "looks_like_local_path", "cached_hub_snapshot", "captioner_source"]

DEMO = "demo"  # the trainer's name for the packaged pretrained demo models
TINY = "tiny"  # the trainer's name for its random-init models (the BLIP is written into the run)

def captioner_source(name: str, *, run_dir: str | Path | None = None, what: str = "BLIP") -> str:
    """What :meth:`GARModel.from_pretrained` should load for captioner ``name`` (see the module docstring).

    ``run_dir``: the run whose ``config.yaml`` named it (``tiny`` lives inside it). Raises
    :class:`~rest_fast.eval.checkpoint.CheckpointError` for a name that cannot be right (``tiny`` outside a
    run, a missing local folder) — before anything reaches the network."""
    from rest_fast.eval.checkpoint import CheckpointError

    where = f"run {run_dir} was trained from {what} {name!r}" if run_dir is not None else f"{what} {name!r}"
    if name == DEMO:
        from rest_fast.synthetic.models import demo_blip_dir

        try:
            return str(demo_blip_dir())
        except FileNotFoundError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
    if name == TINY:
        if run_dir is None:
            raise CheckpointError(f"{what} 'tiny' is the trainer's random-init model, written into each run folder: "
                                  "pass the run folder (RUN or RUN/checkpoints/epoch_XXXX)")
        path = Path(run_dir) / "models" / "tiny_blip"
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{where}, but {path} is missing")
        return str(path)
    p = Path(name).expanduser()
    if p.exists():
        return str(p)
    if looks_like_local_path(name):
        raise CheckpointError(f"{where}: no such folder {name} (a local path, not a Hugging Face hub id)")
    return cached_hub_snapshot(name) or name
