"""``prepare --out`` is locked as ``train --out`` is (issue 23, item 3), and a lock that names no process says so
(item 10): two prepares never write the same shards; a dead holder's lock is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rest_fast.cli import main
from rest_fast.run.rundir import RunLock


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    from eval_fixtures import write_clip

    root = tmp_path_factory.mktemp("videos") / "v"
    root.mkdir()
    for j, a in enumerate(("growing", "spinning")):
        write_clip(root / f"{a}_{j}.mp4", a, seed=j, frames=4, size=32)
    return root


def _prepare(videos: Path, out: Path) -> list[str]:
    return ["prepare", "--data", str(videos), "--out", str(out), "--frames", "2", "--workers", "0", "--no-progress"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_second_prepare_on_a_locked_out_is_refused_in_one_line(videos, tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    with RunLock(out, holder="prepare"):  # a live prepare (this process) holds the folder
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        p = subprocess.run([sys.executable, "-m", "rest_fast", *_prepare(videos, out)], env=env,
                           capture_output=True, text=True, timeout=120)
        assert sorted(f.name for f in out.iterdir()) == [".lock"]  # nothing written beside the lock
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert len(errors) == 1 and errors[0].startswith("rest-fast prepare: error: "), p.stderr
    assert f"in use by another prepare (pid {os.getpid()} on host {socket.gethostname()}" in errors[0]


def test_a_dead_prepares_lock_is_taken_over(videos, tmp_path, capsys):
    out = tmp_path / "shards"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "since": 0}))
    with pytest.warns(UserWarning, match="taking over the lock"):
        assert main(_prepare(videos, out)) == 0
    assert json.loads((out / "prepared.json").read_text())["num_videos"] == 2
    assert not (out / ".lock").exists()  # released at the end


@pytest.mark.parametrize("content", ["", "garbage{", "{}", '{"pid": null}'])
def test_a_lock_naming_no_process_says_so(content, tmp_path, capsys):
    """Not 'in use by another trainer (pid None on host None)'."""
    (tmp_path / ".lock").write_text(content)
    with pytest.raises(Exception) as info:
        RunLock(tmp_path).acquire()
    msg = str(info.value)
    assert "None" not in msg and "names no process" in msg and str(tmp_path / ".lock") in msg, msg

