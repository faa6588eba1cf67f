"""REST is label-free: a flat folder of videos trains, prepares and is refused by eval with one clear line; a folder
mixing class sub-folders and loose videos trains with CLIP-TAM over the labelled videos only (issue 14, item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_fixtures import FAST, write_clip

from rest_fast.cli import main

TINY_RUN = ["--blip", "tiny", "--clip", "tiny", "clip_pretrained=none", "num_frames=2", "image_size=32",
            "num_workers=0", "threads=1", "num_neighbours=2", "epochs=2", "epochs_per_round=1", "batch_size=4",
            "lr=1e-3", "lr_min=1e-5", "num_beams=1", "max_length=8", "min_length=2", "eval_batch_size=8",
            "prompts=[a video of]", "progress=false", "final_caption_round=true"]


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _flat(root: Path, n: int = 4) -> Path:
    actions = ("growing", "spinning", "moving_left", "shrinking")
    for j in range(n):
        write_clip(root / f"clip_{j}.mp4", actions[j % len(actions)], seed=j, frames=4, size=32)
    return root


def _mixed(root: Path) -> Path:
    for a in ("growing", "spinning"):
        for j in range(2):
            write_clip(root / a / f"{a}_{j}.mp4", a, seed=j + len(a), frames=4, size=32)
    write_clip(root / "loose_0.mp4", "growing", seed=99, frames=4, size=32)
    return root


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_train_on_flat_folder(tmp_path, capsys):
    data = _flat(tmp_path / "videos")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *TINY_RUN]) == 0
    out = capsys.readouterr().out
    assert "no labels" in out and "CLIP-TAM accuracy is skipped" in out
    rounds = [r for r in _jsonl(run / "metrics.jsonl") if r.get("kind") == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert not any(k.startswith("tam") for r in rounds for k in r)
    caps = _jsonl(run / "captions" / "round_02.jsonl")
    assert len(caps) == 4 and all("label" not in c and c["captions"] for c in caps)


def test_train_on_mixed_folder_scores_labelled_only(tmp_path, capsys):
    data = _mixed(tmp_path / "videos")
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="1 of 5 videos"):
        assert main(["train", "--data", str(data), "--out", str(run), *TINY_RUN]) == 0
    assert "1 of 5 videos are unlabelled" in capsys.readouterr().out
    rounds = [r for r in _jsonl(run / "metrics.jsonl") if r.get("kind") == "round"]
    assert all(r["tam_videos"] == 4 and 0 <= r["tam_pseudo_top1"] <= 1 for r in rounds)
    assert all(0 <= r["tam_top1"] <= 1 for r in rounds if r["round"] > 0)
    caps = {c["video"]: c for c in _jsonl(run / "captions" / "round_01.jsonl")}
    assert "label" not in caps["loose_0.mp4"] and caps["growing/growing_0.mp4"]["label"] == "growing"


def test_prepare_flat_and_mixed(tmp_path):
    from rest_fast.data.shards import PreparedIndex

    flat = _flat(tmp_path / "flat", n=2)
    assert main(["prepare", "--data", str(flat), "--out", str(tmp_path / "p1"), "--frames", "4", "--workers", "0",
                 "--no-progress"]) == 0
    idx = PreparedIndex.load(tmp_path / "p1")
    assert len(idx) == 2 and idx.labels is None
    mixed = _mixed(tmp_path / "mixed")
    with pytest.warns(UserWarning, match="unlabelled"):
        assert main(["prepare", "--data", str(mixed), "--out", str(tmp_path / "p2"), "--frames", "4",
                     "--workers", "0", "--no-progress"]) == 0
    idx = PreparedIndex.load(tmp_path / "p2")
    assert sorted(idx.labels) == [-1, 0, 0, 1, 1] and idx.class_names == ["growing", "spinning"]


def test_eval_flat_folder_is_one_line(tmp_path, capsys):
    from eval_fixtures import make_tiny_gar

    gar = make_tiny_gar(tmp_path)
    flat = _flat(tmp_path / "flat", n=2)
    capsys.readouterr()
    rc = main(["eval", "--checkpoint", str(gar), "--data", str(flat), "--clip", "tiny", *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no labels" in err[0]
    mixed = _mixed(tmp_path / "mixed")
    with pytest.warns(UserWarning):
        rc = main(["eval", "--checkpoint", str(gar), "--data", str(mixed), "--clip", "tiny", "--out",
                   str(tmp_path / "ev"), "--num-beams", "1", "--max-length", "8", "--min-length", "2", *FAST])
    assert rc == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["sets"][0]["n"] == 4 and res["sets"][0]["num_classes"] == 2
    assert "1 unlabelled videos left out" in capsys.readouterr().err
