"""Shared builders for the eval / caption / finetune CLI tests: a tiny GAR checkpoint, synthetic clips,
a small demo run, and a fake HMDB-51 data root holding a few videos at the protocol's listed names."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# A run smaller than the demo (12 clips, T=2, 2 rounds of 1 epoch), as in tests/test_train_e2e.py.
SMALL_RUN = ["demo_videos_per_class=2", "demo_frames=8", "num_frames=2", "epochs=2", "epochs_per_round=1",
             "batch_size=6", "num_beams=1", "max_length=8", "min_length=2", "prompts=[a video of, someone is]",
             "num_neighbours=4", "progress=false",
             "blip=tiny", "clip=tiny", "clip_pretrained=none", "k=3"]  # the random-init fixture (old demo clips)

# Flags that keep the commands fast on 2 busy cores (tiny models: one thread; no worker processes).
FAST = ["--threads", "1", "--num-workers", "0", "--no-progress", "--device", "cpu"]


def make_demo_run(root: Path) -> Path:
    from rest_fast.cli import main

    run = root / "run"
    assert main(["train", f"--out={run}", *SMALL_RUN]) == 0
    return run


def make_tiny_gar(root: Path, num_frames: int = 2) -> Path:
    """A GARModel (tiny random BLIP + adapters) written with save_pretrained."""
    from rest_fast.models import GARModel, tiny_blip
    from rest_fast.train.demo import ACTIONS
    from rest_fast.train.inputs import DEMO_WORDS

    blip_dir = root / "tiny_blip"
    tiny_blip(blip_dir, seed=3, vocab=[*DEMO_WORDS, *(w for a in ACTIONS for w in a.split("_"))])
    model = GARModel.from_pretrained(blip_dir, num_frames=num_frames, adapter_layers="all")
    out = root / "tiny_gar"
    model.save_pretrained(out)
    return out


def write_clip(path: Path, action: str, seed: int, frames: int = 8, size: int = 48) -> Path:
    from rest_fast.train.demo import render_clip, write_video

    write_video(path, render_clip(action, np.random.default_rng(seed), frames=frames, size=size))
    return path


def fake_hmdb_root(root: Path, per_class: int = 2, classes: int = 3) -> tuple[Path, dict]:
    """A data root with a few HMDB-51 videos that every test split lists (class sub-folder layout, one flat),
    one split-1-only video that is corrupt, and the 2-shot training videos of the same classes.

    Returns ``(root, info)`` with the placed names per split and the corrupt file's name.
    """
    from rest_fast.eval import protocols
    from rest_fast.train.demo import ACTIONS

    splits = [dict(protocols.get("hmdb51", split=s).videos) for s in (1, 2, 3)]
    names = protocols.get("hmdb51").class_names
    common = sorted(set(splits[0]) & set(splits[1]) & set(splits[2]))
    by_class: dict[int, list[str]] = {}
    for rel in common:
        by_class.setdefault(splits[0][rel], []).append(rel)
    chosen = [c for c in sorted(by_class) if len(by_class[c]) >= per_class][:classes]
    placed = []
    for k, c in enumerate(chosen):
        for j, rel in enumerate(by_class[c][:per_class]):
            # the first video flat under the root, the others in class sub-folders (both layouts are found)
            path = root / rel if (k, j) == (0, 0) else root / names[c] / rel
            write_clip(path, ACTIONS[k % len(ACTIONS)], seed=100 * k + j)
            placed.append(rel)
    only1 = next(r for r, y in splits[0].items() if y == chosen[0] and r not in splits[1] and r not in splits[2])
    (root / names[chosen[0]]).mkdir(parents=True, exist_ok=True)
    (root / names[chosen[0]] / only1).write_bytes(b"not a video" * 50)
    shots = [(r, y) for r, y in protocols.get("hmdb51", shots=2).videos if y in chosen]
    for r, y in shots:
        write_clip(root / names[y] / r, ACTIONS[chosen.index(y) % len(ACTIONS)], seed=7 + len(r))
    return root, {"placed": placed, "corrupt": only1, "classes": [names[c] for c in chosen],
                  "shots": [r for r, _ in shots]}
