"""`rest-fast eval` fails (non-zero, with the count) when more than --max-unreadable (default 5%) of the videos it
evaluates cannot be decoded; the results and the bad-file list are still written (issue 14, item 15)."""

from __future__ import annotations

import json

import pytest
from eval_fixtures import FAST, make_tiny_gar, write_clip

from rest_fast.cli import main

GEN = ["--num-beams", "1", "--max-length", "8", "--min-length", "2", "--clip", "tiny"]


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_eval_fails_when_too_many_videos_are_unreadable(tmp_path, capsys):
    gar = make_tiny_gar(tmp_path)
    data = tmp_path / "set"
    for a in ("growing", "spinning"):
        for j in range(2):
            write_clip(data / a / f"{a}_{j}.mp4", a, seed=j, frames=4, size=32)
    (data / "spinning" / "broken.mp4").write_bytes(b"not a video" * 40)  # 1 of 5 = 20% unreadable
    out = tmp_path / "ev"
    capsys.readouterr()
    rc = main(["eval", "--checkpoint", str(gar), "--data", str(data), "--out", str(out), *GEN, *FAST])
    err = capsys.readouterr().err
    assert rc != 0
    assert "1 of 5 videos" in err and "--max-unreadable" in err and "Traceback" not in err
    res = json.loads((out / "results.json").read_text())  # written anyway, for the user to inspect
    assert res["sets"][0]["unreadable"] == 1 and res["sets"][0]["n"] == 4
    assert "broken.mp4" in (out / "bad_files.tsv").read_text()
    # raising the limit accepts the run
    rc = main(["eval", "--checkpoint", str(gar), "--data", str(data), "--out", str(out), "--max-unreadable", "0.25",
               *GEN, *FAST])
    assert rc == 0
