"""Real runs never hurt the user (issue 14, resume and run folders): resume takes the saved config, the video
list is checked, train_state.pt never runs code, corrupt checkpoints are skipped (train and eval), the run
folder is locked, foreign folders are refused, paths from state.json stay inside, files follow the umask,
and the bad-files threshold is checked early (and may change on resume).

One small labelled run (tiny random models, 6 synthetic clips + 1 unreadable file, 2 epochs) is made once;
each test works on a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rest_fast.run.rundir import (
    CheckpointCorrupt,
    RunDir,
    RunLock,
    RunLockedError,
    atomic_write_json,
    atomic_write_text,
)

ARGS = ["--blip=tiny", "--clip=tiny", "clip_pretrained=none", "image_size=32", "num_frames=2", "epochs=2",
        "epochs_per_round=1", "batch_size=4", "num_beams=1", "max_length=8", "min_length=2", "prompts=[a video of]",
        "num_neighbours=2", "num_workers=0", "threads=1", "progress=false", "eval_batch_size=8",
        "bad_files_threshold=0.25"]


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(clips folder, finished run folder)."""
    from rest_fast.cli import main
    from rest_fast.train.demo import ACTIONS, synthesize_dataset

    base = tmp_path_factory.mktemp("made")
    clips = synthesize_dataset(base / "clips", videos_per_class=2, frames=8, size=32, actions=ACTIONS[:3])
    (clips / ACTIONS[0] / "broken.mp4").write_bytes(b"not a video")
    run = base / "run"
    with pytest.MonkeyPatch.context() as mp:  # the reference ops for this run only: the env var must not leak
        mp.setenv("TRITON_INTERPRET", "0")
        assert main(["train", f"--data={clips}", f"--out={run}", *ARGS]) == 0
    return clips, run


def _copy(made, tmp_path, *, clips_too: bool = False) -> tuple[Path, Path]:
    """A copy of the finished run (and, if asked, of its clips, the copy's config pointing at them)."""
    clips, run = made
    new_run = tmp_path / "run"
    shutil.copytree(run, new_run)
    if clips_too:
        new_clips = tmp_path / "clips"
        shutil.copytree(clips, new_clips)
        text = (new_run / "config.yaml").read_text().replace(str(clips), str(new_clips))
        (new_run / "config.yaml").write_text(text)
        clips = new_clips
    return clips, new_run


def _state(run: Path) -> dict:
    return json.loads((run / "state.json").read_text())


def _epochs(run: Path) -> list[int]:
    from rest_fast.run.rundir import read_jsonl

    return [r["epoch"] for r in read_jsonl(run / "metrics.jsonl") if r.get("kind") == "epoch"]


def _main(args: list[str]) -> int:
    from rest_fast.cli import main

    return main(args)


def _resume_args(run: Path, clips: Path, *extra: str) -> list[str]:
    """`train --resume auto` with the run's own flags repeated (as a job script would), then ``extra``."""
    return ["train", f"--data={clips}", "--out", str(run), "--resume", "auto", *ARGS, *extra]


def _resume(run: Path, clips: Path, *extra: str) -> int:
    return _main(_resume_args(run, clips, *extra))


def _main_or_bad(args: list[str], capsys) -> tuple[int, str]:
    """(exit code, message) of a command that stops on too many bad files (raised, or printed with code 2)."""
    from rest_fast.data.bad_files import TooManyBadFiles

    try:
        code = _main(args)
    except TooManyBadFiles as exc:
        return 2, str(exc)
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- item 2
def test_resume_auto_without_data_takes_the_saved_config(made, tmp_path, capsys):
    """The README's `rest-fast train --out runs/k400 --resume auto`: no --data, no demo preset; epochs may grow."""
    clips, run = _copy(made, tmp_path)
    assert not (run / ".lock").exists()  # the finished run released its lock
    assert _main(["train", "--out", str(run), "--resume", "auto", "epochs=3"]) == 0, capsys.readouterr().err
    assert _state(run)["epoch"] == 3 and sorted(_epochs(run)) == [1, 2, 3]
    saved = __import__("yaml").safe_load((run / "config.yaml").read_text())
    assert saved["data"] == str(clips) and saved["blip"] == "tiny" and saved["epochs"] == 3
    assert saved["num_frames"] == 2  # not the demo preset's 4


def test_resume_refuses_identity_changes_and_names_them(made, tmp_path, capsys):
    _, run = _copy(made, tmp_path)
    before = (run / "state.json").read_text()
    assert _main(["train", "--out", str(run), "--resume", "auto", "k=2", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "k: 3 (run) != 2 (now)" in err and "data:" in err
    assert "keys that may change:" in err and "num_workers" in err and "bad_files_threshold" in err
    assert (run / "state.json").read_text() == before
    # a runtime key and the same identity values are fine: --print-config shows the resumed config
    assert _main(["train", "--out", str(run), "--resume", "auto", "num_workers=0", "k=3", "--print-config"]) == 0
    assert "blip: tiny" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- item 6
def test_resume_refuses_a_changed_video_list(made, tmp_path, capsys):
    clips, run = _copy(made, tmp_path, clips_too=True)
    from rest_fast.train.demo import ACTIONS

    gone = sorted((clips / ACTIONS[1]).glob("*.mp4"))[0]
    shutil.copy(gone, clips / ACTIONS[2] / "zz_new.mp4")
    gone.unlink()
    before = (run / "state.json").read_text()
    assert _resume(run, clips, "epochs=3") == 2
    err = capsys.readouterr().err
    assert "1 added (e.g. " in err and "zz_new.mp4" in err
    assert "1 removed (e.g. " in err and gone.name in err and "7 then, 7 now" in err
    assert (run / "state.json").read_text() == before and sorted(_epochs(run)) == [1, 2]


# ---------------------------------------------------------------------------------------------- item 7
class _Planted:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_planted_pickle_in_train_state_is_never_run(made, tmp_path, capsys):
    clips, run = _copy(made, tmp_path)
    ckpt = run / "checkpoints" / "epoch_0002"
    marker = tmp_path / "code_ran"
    torch.save({"step": 1, "evil": _Planted(str(marker))}, ckpt / "train_state.pt")
    meta = json.loads((ckpt / "meta.json").read_text())
    digest = hashlib.sha256((ckpt / "train_state.pt").read_bytes()).hexdigest()
    meta.setdefault("sha256", {})["train_state.pt"] = digest  # an attacker fixes the checksum too
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointCorrupt, match="weights_only"):
        RunDir.load_checkpoint(ckpt)
    assert _resume(run, clips, "epochs=3") == 2
    assert "weights_only" in capsys.readouterr().err
    assert not marker.exists()


def test_train_state_round_trips_rng_with_weights_only(tmp_path):
    import random

    import numpy as np

    from rest_fast.run.rundir import capture_rng, restore_rng

    run = RunDir(tmp_path / "r")
    run.save_checkpoint(1, {"w": torch.ones(2)}, {"rng": {0: capture_rng()}, "step": 3}, {"round": 0})
    a = (random.random(), np.random.rand(), torch.rand(2))
    _, state, _ = RunDir.load_checkpoint(run.checkpoint_dir(1))  # weights_only=True inside
    restore_rng(state["rng"][0])
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


# ---------------------------------------------------------------------------------------------- item 8
def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 5] ^= 0x10  # inside the last tensor's data: safetensors alone would load it
    path.write_bytes(bytes(data))


def test_corrupt_latest_checkpoint_is_skipped_by_eval_and_train(made, tmp_path, capsys):
    from eval_fixtures import FAST

    from rest_fast.eval.checkpoint import CheckpointError, load_model, resolve_checkpoint

    clips, run = _copy(made, tmp_path)
    _flip_a_bit(run / "checkpoints" / "epoch_0002" / "model.safetensors")
    # eval: never the flipped weights; the epoch used is said on stdout
    with pytest.warns(UserWarning, match="epoch_0002"):
        resolved = resolve_checkpoint(run)
    assert resolved.weights.parent.name == "epoch_0001" and resolved.epoch == 1
    with pytest.raises(CheckpointError, match="checksum"):
        resolve_checkpoint(run / "checkpoints" / "epoch_0002")  # named explicitly: an error, not a swap
    bad = resolved.__class__(**{**resolved.__dict__, "weights": run / "checkpoints" / "epoch_0002" / "model.safetensors"})
    with pytest.raises(CheckpointError, match="checksum"):
        load_model(bad)
    capsys.readouterr()
    with pytest.warns(UserWarning):
        # the run's clips hold one broken video (1 of 7): allowed here, the test is about the checkpoint
        assert _main(["eval", "--checkpoint", str(run), "--out", str(tmp_path / "ev"), "--max-unreadable", "0.2",
                      *FAST]) == 0
    out = capsys.readouterr().out
    assert "at epoch 1 (epoch_0001)" in out and "epoch_0002" in out
    # train: resumes from the newest intact checkpoint, with a warning, and redoes epoch 2
    with pytest.warns(UserWarning, match="latest checkpoint unusable"):
        assert _resume(run, clips) == 0
    assert "resuming from epoch_0001" in capsys.readouterr().out
    assert _state(run)["epoch"] == 2 and RunDir.load_checkpoint(run / "checkpoints" / "epoch_0002")
    # an explicitly named corrupt checkpoint is refused
    _flip_a_bit(run / "checkpoints" / "epoch_0002" / "model.safetensors")
    assert _main(["train", "--resume", str(run / "checkpoints" / "epoch_0002")]) == 2
    assert "checksum" in capsys.readouterr().err


def test_missing_checkpoints_fall_back_to_round_zero(made, tmp_path, capsys):
    clips, run = _copy(made, tmp_path)
    shutil.rmtree(run / "checkpoints" / "epoch_0002")
    (run / "checkpoints" / "epoch_0001" / "train_state.pt").unlink()
    with pytest.warns(UserWarning, match="round 0"):
        assert _resume(run, clips) == 0
    assert _state(run)["epoch"] == 2 and sorted(_epochs(run)) == [1, 2]


# ---------------------------------------------------------------------------------------------- item 9
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    lock = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / ".lock").exists()
    atomic_write_json(tmp_path / ".lock", {"pid": _dead_pid(), "host": socket.gethostname(), "since": 0})
    with pytest.warns(UserWarning, match="no longer running"):
        with RunLock(tmp_path):
            assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()
    # another host's pid cannot be checked: refused, naming it
    atomic_write_json(tmp_path / ".lock", {"pid": 1, "host": "other-node-7", "since": 0})
    with pytest.raises(RunLockedError, match="pid 1 on host other-node-7"):
        RunLock(tmp_path).acquire()
    assert sorted(os.listdir(tmp_path)) == [".lock"]  # no temporaries left behind


def test_second_trainer_on_a_locked_run_refuses(made, tmp_path, capsys):
    clips, run = _copy(made, tmp_path)
    atomic_write_json(run / ".lock", {"pid": os.getpid(), "host": socket.gethostname(), "since": 0})
    before = (run / "state.json").read_text()
    assert _resume(run, clips, "epochs=3") == 2
    err = capsys.readouterr().err
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in err
    assert (run / "state.json").read_text() == before


# ---------------------------------------------------------------------------------------------- item 10
def test_train_out_into_a_foreign_folder_is_refused(made, tmp_path, capsys):
    clips, _ = made
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text("my own notes\n")
    (out / "thesis.tex").write_text("x")
    assert _main(["train", f"--data={clips}", f"--out={out}", *ARGS]) == 2
    assert "not a rest-fast run" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["metrics.jsonl", "thesis.tex"]
    assert (out / "metrics.jsonl").read_text() == "my own notes\n"


# ---------------------------------------------------------------------------------------------- item 11
def test_state_paths_must_stay_inside_the_run(made, tmp_path, capsys):
    from rest_fast.eval.checkpoint import CheckpointError, resolve_checkpoint

    clips, run = _copy(made, tmp_path)
    outside = tmp_path / "outside" / "epoch_0002"
    shutil.copytree(run / "checkpoints" / "epoch_0002", outside)
    state = _state(run)
    for bad in ("../outside/epoch_0002", str(outside)):
        atomic_write_json(run / "state.json", {**state, "checkpoint": bad})
        assert _resume(run, clips) == 2
        assert "inside" in capsys.readouterr().err
        with pytest.raises(CheckpointError, match="inside"):
            resolve_checkpoint(run)


# ---------------------------------------------------------------------------------------------- item 12
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_and_folders_follow_the_umask(tmp_path, umask):
    from rest_fast.cache import CaptionCache

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        run = RunDir(tmp_path / "run")
        ckpt = run.save_checkpoint(1, {"w": torch.ones(2)}, {"step": 1}, {"round": 0})
        cache = CaptionCache(2, 1)
        cache.save(str(tmp_path / "c.rfcc"))
    finally:
        os.umask(old)
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    for f in (tmp_path / "a.txt", ckpt / "model.safetensors", ckpt / "train_state.pt", ckpt / "meta.json",
              tmp_path / "c.rfcc"):
        assert oct(f.stat().st_mode & 0o777) == oct(want_file), f
    assert oct(ckpt.stat().st_mode & 0o777) == oct(want_dir)


# ---------------------------------------------------------------------------------------------- item 13
def test_bad_files_threshold_checked_after_features_and_changeable_on_resume(made, tmp_path, monkeypatch, capsys):
    """The copy's features are cached, so nothing is decoded before training: the 1 unreadable file of 7
    recorded by the run must still stop a resume under a 10% threshold before any training starts."""
    from rest_fast.train.loop import Trainer

    clips, run = _copy(made, tmp_path)

    def too_late(self):
        raise AssertionError("the threshold was not checked before training")

    with monkeypatch.context() as m:
        m.setattr(Trainer, "setup_training", too_late)
        code, msg = _main_or_bad(_resume_args(run, clips, "epochs=3", "bad_files_threshold=0.1"), capsys)
    assert code == 2 and "1 of 7 videos cannot be read" in msg and "broken.mp4" in msg
    assert _state(run)["epoch"] == 2
    # raising the threshold on resume is allowed
    assert _resume(run, clips, "epochs=3", "bad_files_threshold=0.3") == 0
    assert _state(run)["epoch"] == 3


def test_missing_files_over_the_threshold_stop_before_models_load(made, tmp_path, monkeypatch, capsys):
    """Right after indexing: a list whose files are mostly missing stops before any model is loaded."""
    from rest_fast.train import inputs

    clips, _ = made
    good = sorted(str(p.relative_to(clips)) for p in clips.rglob("*_00.mp4"))
    (tmp_path / "list.txt").write_text("".join(f"{p}\n" for p in good) + "gone/a.mp4\ngone/b.mp4\n")

    def too_late(*a, **k):
        raise AssertionError("models were loaded before the missing files were counted")

    monkeypatch.setattr(inputs, "load_models", too_late)
    code, msg = _main_or_bad(["train", f"--data={tmp_path / 'list.txt'}", f"data_root={clips}",
                              f"--out={tmp_path / 'run'}", *ARGS], capsys)
    assert code == 2 and "2 of 5 videos cannot be read" in msg
