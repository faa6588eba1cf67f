"""The inputs of issue 23, item 9, through the CLI: each ends in ONE line on stderr and exit code 2, never a
traceback, and a failed fresh start leaves no run folder behind. A full disk mid-run keeps the last good
checkpoint and ``state.json`` and says so.

Read-only folders are read-only tmpfs mounts (chmod does not stop root); the full disk is a small tmpfs filled
up, the file-size limit ``RLIMIT_FSIZE`` (``ulimit -f``). Where the machine cannot mount (not root, no mount
namespace) those tests are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rest_fast.cli import main

ARGS = ["--blip=tiny", "--clip=tiny", "clip_pretrained=none", "image_size=32", "num_frames=2", "epochs=2",
        "epochs_per_round=1", "batch_size=4", "num_beams=1", "max_length=8", "min_length=2", "prompts=[a video of]",
        "num_neighbours=2", "num_workers=0", "threads=1", "progress=false", "eval_batch_size=8"]
EVAL = ["--device", "cpu", "--no-progress", "--num-workers", "0", "--threads", "1"]


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _env() -> dict:
    return {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(sys.path)}


def _one_error_line(err: str, command: str) -> str:
    """The single error line of ``err`` (information lines a command prints before failing aside)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"rest-fast {command}: error: "), lines[0]
    return lines[0]


def _fails(argv: list[str], capsys, *expected: str) -> str:
    rc = main(argv)
    line = _one_error_line(capsys.readouterr().err, argv[0])
    assert rc == 2, line
    for text in expected:
        assert text in line, line
    return line


# ------------------------------------------------------------------------------------------ mounts
def _try_mount(*args: str) -> str | None:
    """None when ``mount args`` worked, else why not."""
    if shutil.which("mount") is None:
        return "no mount command"
    p = subprocess.run(["mount", *args], capture_output=True, text=True)
    return None if p.returncode == 0 else (p.stderr.strip() or f"mount exited {p.returncode}")


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64m"):
    """A tmpfs of ``size`` at ``path`` for the body (skips the test where the machine cannot mount one)."""
    path.mkdir(parents=True, exist_ok=True)
    why = _try_mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    if why is not None:
        pytest.skip(f"cannot mount a tmpfs here (needs root and a mount namespace): {why}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _read_only(path: Path) -> None:
    why = _try_mount("-o", "remount,ro", str(path))
    assert why is None, why


def _fill(disk: Path) -> Path:
    """Fill the file system of ``disk`` to the last byte (a file beside whatever is under test)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass
    return filler


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    from rest_fast.train.demo import ACTIONS, synthesize_dataset

    return synthesize_dataset(tmp_path_factory.mktemp("clips") / "clips", videos_per_class=2, frames=8, size=32,
                              actions=ACTIONS[:3])


@pytest.fixture(scope="module")
def finished(clips, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:  # the reference ops, for this run only (later modules need the kernels)
        mp.setenv("TRITON_INTERPRET", "0")
        assert main(["train", f"--data={clips}", f"--out={run}", *ARGS]) == 0
    return run


# ------------------------------------------------------------------------------------------ plain inputs
def test_prepare_out_holding_a_foreign_file(clips, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    _fails(["prepare", "--data", str(clips), "--out", str(out), "--workers", "0", "--no-progress"], capsys,
           "not a `rest-fast prepare` output", "notes.txt")
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_train_image_size_smaller_than_a_patch(clips, tmp_path, capsys):
    args = [a for a in ARGS if not a.startswith("image_size")]
    _fails(["train", f"--data={clips}", "--out", str(tmp_path / "run"), *args, "image_size=7"], capsys,
           "image_size=7", "patches")
    assert not (tmp_path / "run").exists()


def test_train_on_a_cuda_device_the_machine_lacks(clips, tmp_path, capsys):
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    _fails(["train", f"--data={clips}", "--out", str(tmp_path / "run"), *ARGS, "--device", "cuda:7"], capsys,
           "device='cuda:7'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--batch-size", "--image-size", "--num-frames", "--num-beams"])
def test_caption_generation_sizes_below_one(flag, clips, tmp_path, capsys):
    video = next(clips.rglob("*.mp4"))
    for value in ("0", "-5"):
        _fails(["caption", str(video), "--checkpoint", str(tmp_path), flag, value], capsys, flag, "must be >= 1")


def test_caption_image_size_smaller_than_a_patch_is_one_line_not_one_per_video(finished, clips, capsys):
    videos = [str(v) for v in sorted(clips.rglob("*.mp4"))[:3]]
    _fails(["caption", *videos, "--checkpoint", str(finished), "--image-size", "3", *EVAL], capsys,
           "image_size=3", "patches")


def test_train_on_a_prepared_folder_whose_index_leaves_it(clips, tmp_path, capsys):
    prep = tmp_path / "prep"
    assert main(["prepare", "--data", str(clips), "--out", str(prep), "--frames", "2", "--workers", "0",
                 "--no-progress"]) == 0
    capsys.readouterr()
    rows = [json.loads(x) for x in (prep / "index.jsonl").read_text().splitlines()]
    rows[0]["shard"] = "../outside.tar"
    (prep / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _fails(["train", f"--data={prep}", "--out", str(tmp_path / "run"), *ARGS], capsys, "'../outside.tar'",
           "not a file name inside")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ Ctrl-C
_SIGINT_AT = """
import importlib, os, signal, sys
from rest_fast.train import loop
prep = importlib.import_module("rest_fast.data.shards.prepare")
if sys.argv[1] == "train":
    real = loop.Trainer.train_epoch
    def train_epoch(self, epoch, rnd):
        if epoch == 1:  # Ctrl-C during the second epoch
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, epoch, rnd)
    loop.Trainer.train_epoch = train_epoch
else:
    real = prep.encode_video
    seen = []
    def encode_video(*a, **k):
        seen.append(1)
        if len(seen) == 3:  # Ctrl-C while decoding the third video
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)
    prep.encode_video = encode_video
from rest_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_in_train_says_where_the_run_stands(clips, tmp_path):
    run = tmp_path / "run"
    # num_neighbours given again (H=10 > N-1=5): the last value wins with a note, and the cap is said once
    p = subprocess.run([sys.executable, "-c", _SIGINT_AT, "train", f"--data={clips}", f"--out={run}", *ARGS,
                        "num_neighbours=10"], env=_env(), capture_output=True, text=True, timeout=300)
    # Ctrl-C during training is a stop signal (issue 21): the step ends, a checkpoint is written, exit 75
    # (EX_TEMPFAIL, what a job script resubmits on) with one line saying where the run stands and how to continue
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 75, p.stderr
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("rest-fast train: stopped by SIGINT")]
    assert "in epoch 2" in line and f"--out {run} --resume auto" in line, line
    state = json.loads((run / "state.json").read_text())
    assert state["checkpoint"].startswith("checkpoints/epoch_0001"), state
    said = (p.stdout + p.stderr).splitlines()
    assert [ln for ln in said if "capped" in ln] == [
        "rest-fast train: warning: num_neighbours H=10 capped at N-1=5 (only 6 videos)"], said  # once, one line
    assert "rest-fast train: note: num_neighbours given 2 times (2, then 10): the last, 10, is used" in said


def test_ctrl_c_in_prepare_says_how_far_it_got(clips, tmp_path):
    out = tmp_path / "prep"
    p = subprocess.run([sys.executable, "-c", _SIGINT_AT, "prepare", "--data", str(clips), "--out", str(out),
                        "--frames", "2", "--workers", "0", "--shard-size", "1", "--no-progress"],
                       env=_env(), capture_output=True, text=True, timeout=300)
    line = _one_error_line(p.stderr, "prepare")
    assert p.returncode == 2, p.stderr
    assert "interrupted" in line and "keeps the first 2 video(s) in 2 complete shard(s)" in line, line
    assert "rerun the same command" in line


# ------------------------------------------------------------------------------------------ read-only folders
def test_read_only_output_folders(finished, clips, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "16m") as ro:
        shutil.copytree(finished, ro / "run")
        _read_only(ro)
        before = sorted(str(p) for p in (ro / "run").rglob("*"))
        _fails(["train", f"--data={clips}", "--out", str(ro / "new"), *ARGS], capsys, "read-only")
        _fails(["train", "--out", str(ro / "run"), "--resume", "auto", "epochs=3"], capsys, "read-only",
               "last complete state intact")
        _fails(["eval", "--checkpoint", str(ro / "run"), *EVAL], capsys, "read-only")  # writes RUN/eval/
        _fails(["eval", "--checkpoint", str(finished), "--out", str(ro / "eval"), *EVAL], capsys, "read-only")
        _fails(["prepare", "--data", str(clips), "--out", str(ro / "prep"), "--workers", "0", "--no-progress"],
               capsys, "read-only")
        assert sorted(str(p) for p in (ro / "run").rglob("*")) == before
        assert not (ro / "new").exists() and not (ro / "prep").exists()


# ------------------------------------------------------------------------------------------ full disk
def test_full_disk_mid_run_keeps_the_last_checkpoint_and_state(clips, tmp_path, monkeypatch, capsys):
    from rest_fast.run.rundir import verify_checkpoint
    from rest_fast.train import loop

    with tmpfs(tmp_path / "disk", "64m") as disk:
        run = disk / "run"
        real = loop.Trainer.save_checkpoint

        def save_checkpoint(self, epoch, rnd):
            if epoch == 2:
                _fill(disk)  # the disk fills up during epoch 2: its checkpoint cannot be written
            return real(self, epoch, rnd)

        monkeypatch.setattr(loop.Trainer, "save_checkpoint", save_checkpoint)
        _fails(["train", f"--data={clips}", f"--out={run}", *ARGS], capsys, "disk is full",
               "keeps its last complete state intact", "epoch 1", "--resume auto")
        state = json.loads((run / "state.json").read_text())
        assert state["epoch"] == 1 and state["checkpoint"] == "checkpoints/epoch_0001"
        assert verify_checkpoint(run / "checkpoints" / "epoch_0001") is None
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_0001"]  # no half checkpoint
        monkeypatch.setattr(loop.Trainer, "save_checkpoint", real)
        (disk / "filler").unlink()
        assert main(["train", "--out", str(run), "--resume", "auto"]) == 0
        assert json.loads((run / "state.json").read_text())["epoch"] == 2


def test_full_disk_in_prepare(clips, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        _fill(disk)
        _fails(["prepare", "--data", str(clips), "--out", str(disk / "prep"), "--workers", "0", "--no-progress"],
               capsys, "disk is full")
        assert not (disk / "prep").exists()


def _limited(limit_bytes: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return preexec


@pytest.mark.parametrize("command", ["train", "prepare"])
def test_file_size_limit(command, clips, tmp_path):
    out = tmp_path / "out"
    argv = (["train", f"--data={clips}", f"--out={out}", *ARGS] if command == "train" else
            ["prepare", "--data", str(clips), "--out", str(out), "--frames", "2", "--workers", "0", "--no-progress"])
    # 4 KB: the tiny BLIP's weights (train) or the first shard (prepare) is larger
    p = subprocess.run([sys.executable, "-m", "rest_fast", *argv], env=_env(), capture_output=True, text=True,
                       timeout=300, preexec_fn=_limited(4096))
    line = _one_error_line(p.stderr, command)
    assert p.returncode == 2, p.stderr
    assert "file-size limit" in line, line
    if command == "train":
        assert not out.exists()  # a failed fresh start leaves no run folder
