"""report.py on a hand-made run directory: plots, the round table and each video's caption evolution."""

from __future__ import annotations

import numpy as np

from rest_fast.run.rundir import RunDir, atomic_write_jsonl
from rest_fast.train.report import write_report


def test_report_from_files(tmp_path):
    run = RunDir(tmp_path)
    for step, loss in enumerate([3.0, 2.5, 2.2, 2.0], 1):
        run.append_metric({"kind": "step", "epoch": (step + 1) // 2, "step": step, "loss": loss, "lr": 1e-3})
    run.append_metric({"kind": "epoch", "epoch": 2, "step": 4, "loss": 2.1})
    for r in (0, 1):
        run.append_metric({"kind": "round", "round": r, "epoch": 2 * r, "distinct_captions": 5 - r,
                           "mean_score": 0.2 + 0.01 * r, "mean_top1_score": 0.25, "tam_pseudo_top1": 0.5,
                           **({"tam_top1": 0.25, "tam_top5": 0.75} if r else {})})
        recs = [{"video": f"cls/v{i}.mp4", "index": i, "label": "cls", "captions": [f"cap <{i}> r{r}", "other"],
                 "scores": [0.3, 0.2], **({"generated": f"gen {i}"} if r else {})} for i in range(3)]
        atomic_write_jsonl(run.captions_path(r), recs)

    frames = np.zeros((4, 8, 8, 3), np.uint8)
    out = write_report(tmp_path, max_videos=2, frames_of=lambda i: frames + 40 * i)
    html = out.read_text()
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 0
    assert (tmp_path / "plots" / "rounds.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "plots" / "frames").iterdir()) == ["video_00000.png", "video_00001.png"]
    assert "Caption evolution (2 of 3 videos)" in html
    assert "cap &lt;1&gt; r0" in html and "cap &lt;1&gt; r1" in html and "gen 1" in html  # escaped, both rounds
    assert "cap &lt;2&gt;" not in html  # beyond max_videos
    assert "25.0%" in html and "75.0%" in html  # CLIP-TAM columns


def test_report_shows_every_class_in_turn():
    """A labelled set shows videos from every class (in turn, then by index), not the first class's videos only."""
    from rest_fast.train.report import _videos_to_show

    recs = [{"label": lab} for lab in ["a"] * 4 + ["b"] * 3 + ["c"]]
    assert _videos_to_show(recs, 5) == [0, 1, 4, 5, 7]  # a, b, c, then a, b
    assert _videos_to_show(recs, 100) == list(range(8))
    assert _videos_to_show(recs, 0) == []
    assert _videos_to_show([{"video": "x"}] * 3, 2) == [0, 1]  # unlabelled: the first n
    assert _videos_to_show(iter(recs), 5) == [0, 1, 4, 5, 7]  # a file read streaming gives the same choice


def test_report_reads_round_files_streaming(tmp_path):
    """Only the shown videos' records are kept from a round file (issue 20: rank 0 never holds a whole round)."""
    import json

    from rest_fast.run.rundir import iter_jsonl as _iter_jsonl
    from rest_fast.train.report import _records_of

    p = tmp_path / "round_00.jsonl"
    p.write_text("".join(json.dumps({"index": i}) + "\n" for i in range(50)) + "{torn", encoding="utf-8")
    assert _records_of(p, {3, 40, 77}) == {3: {"index": 3}, 40: {"index": 40}}
    assert sum(1 for _ in _iter_jsonl(p)) == 50 and list(_iter_jsonl(tmp_path / "missing.jsonl")) == []
