"""The demo's unlabelled training set: world clips written as video files in class folders.

The folder names are the action names (``changing_colour/``): the trainer reads them as labels, which REST
itself never sees; they serve only to report CLIP-TAM accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rest_fast.synthetic import world
from rest_fast.synthetic.video import write_video


def write_world_dataset(root: str | Path, *, videos_per_class: int = 12, frames: int = 4, size: int = 32,
                        seed: int = 0, actions: tuple[str, ...] = world.ACTIONS) -> Path:
    """Write ``root/<action_folder>/<action_folder>_NN.mp4`` and return ``root``.

    Clip ``j`` of action ``a`` is seeded by ``[seed, a, j]`` (its object included), a namespace the web corpus
    never uses, so the training set and the corpus the demo models learned from are disjoint. Files already
    present are kept (a resumed demo reuses them).
    """
    if size % 2:
        raise ValueError(f"size must be even (yuv420p), got {size}")
    root = Path(root)
    for a_idx, action in enumerate(actions):
        folder = world.folder_name(action)
        for j in range(videos_per_class):
            path = root / folder / f"{folder}_{j:02d}.mp4"
            if path.exists():
                continue
            rng = np.random.default_rng([seed, a_idx, j])
            spec = world.random_spec(rng, (action,))
            write_video(path, world.render_clip(spec, rng, frames=frames, size=size))
    return root
