"""A run folder without ``state.json`` is still its run (issue 23, item 1): ``--resume auto`` continues it under
its saved ``config.yaml`` (its own data, never the demo preset), rebuilding the state from intact checkpoints, and
nothing the run wrote is overwritten or pruned by a run of another identity.

End to end through the CLI: a real trainer process gets SIGTERM before round 0 ends (before the first
``state.json``), then ``--resume auto`` with no other option. Tiny random models, 6 clips, 2 epochs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rest_fast.cli import main

ARGS = ["--blip=tiny", "--clip=tiny", "clip_pretrained=none", "image_size=32", "num_frames=2", "epochs=2",
        "epochs_per_round=1", "batch_size=4", "num_beams=1", "max_length=8", "min_length=2", "prompts=[a video of]",
        "num_neighbours=2", "num_workers=0", "threads=1", "progress=false", "eval_batch_size=8"]

# The trainer, stopped by a real SIGTERM at the start of round 0 (models, features and config.yaml are written;
# state.json is not yet): what a preemption during the minutes of round 0 leaves at Kinetics scale.
_SIGTERM_IN_ROUND_0 = """
import os, signal, sys
from rest_fast.train import loop
def stop(self):
    os.kill(os.getpid(), signal.SIGTERM)
    os._exit(143)  # a handler that returns (a graceful stop at the next safe point) still never ends round 0
loop.Trainer.round_zero = stop
from rest_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _config(run: Path) -> dict:
    """The run's config.yaml without ``out`` (a copied run folder records where it is now)."""
    import yaml

    return {k: v for k, v in yaml.safe_load((run / "config.yaml").read_text()).items() if k != "out"}


def _digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (a dead trainer's ``.lock``, taken over and released, aside)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    from rest_fast.train.demo import ACTIONS, synthesize_dataset

    return synthesize_dataset(tmp_path_factory.mktemp("clips") / "clips", videos_per_class=2, frames=8, size=32,
                              actions=ACTIONS[:3])


@pytest.fixture(scope="module")
def stopped(clips, tmp_path_factory) -> Path:
    """A run stopped by SIGTERM before its first state.json."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-c", _SIGTERM_IN_ROUND_0, "train", f"--data={clips}", f"--out={run}", *ARGS],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0, p.stdout + p.stderr
    assert (run / "config.yaml").is_file() and (run / "models" / "tiny_blip" / "config.json").is_file(), p.stderr
    assert not (run / "state.json").exists()
    return run


@pytest.fixture(scope="module")
def finished(clips, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", f"--data={clips}", f"--out={run}", *ARGS]) == 0
    return run


def test_sigterm_before_state_then_resume_auto_continues_its_own_data(stopped, clips, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    config, models, videos = _config(run), _digests(run / "models"), _digests(clips)
    assert main(["train", "--out", str(run), "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "round 0 restarts from what the run saved" in out
    assert _config(run) == config and config["data"] == str(clips)  # not the demo's `data: null, blip: demo`
    assert _digests(run / "models") == models and _digests(clips) == videos
    assert not (run / "demo").exists()  # the demo preset never applies to a run's folder
    state = json.loads((run / "state.json").read_text())
    assert state["epoch"] == 2 and state["checkpoint"] == "checkpoints/epoch_0002"
    names = json.loads((run / "videos.json").read_text())["videos"]
    assert len(names) == 6 and all(n.endswith(".mp4") for n in names)  # its own 6 clips, not the demo's


def test_a_fresh_start_of_another_run_in_a_stopped_runs_folder_is_refused(stopped, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    before = _digests(run)
    # no --data: the demo preset; and the same data with another k: both another run
    for extra in ([], ["k=2"]):
        rc = main(["train", "--out", str(run), *ARGS[:2], *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "another run's config.yaml" in err[0] and "--resume auto" in err[0], err
    assert _digests(run) == before


def test_finished_run_without_state_resumes_from_its_checkpoints(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    final = json.loads((run / "state.json").read_text())
    (run / "state.json").unlink()
    ckpts = _digests(run / "checkpoints")
    assert {p.split("/")[0] for p in ckpts} == {"epoch_0001", "epoch_0002"}
    config = _config(run)
    assert main(["train", "--out", str(run), "--resume", "auto"]) == 0
    assert "continuing from checkpoints/epoch_0002 (epoch 2," in capsys.readouterr().out
    assert _digests(run / "checkpoints") == ckpts  # nothing overwritten, nothing pruned
    assert _config(run) == config
    state = json.loads((run / "state.json").read_text())
    assert {k: state[k] for k in ("epoch", "round", "checkpoint", "cache")} == {
        k: final[k] for k in ("epoch", "round", "checkpoint", "cache")}


def test_stateless_run_whose_checkpoints_cannot_continue_is_refused_untouched(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "state.json").unlink()
    for p in (run / "cache").glob("round_*.rfcc"):
        p.unlink()  # no checkpoint can be continued without its round's caption cache
    before = _digests(run)
    assert main(["train", "--out", str(run), "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no state.json and none of its 2 checkpoint(s) can be continued" in err[0], err
    assert _digests(run) == before
