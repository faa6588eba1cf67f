"""`rest-fast finetune`: few-shot on a protocol's shot list (fake HMDB-51 root, missing videos reported) and on a
labelled folder; `--supervised` (the class-label baseline) learns the class names; epochs per Table 10; errors."""

from __future__ import annotations

import json

import pytest
import torch
from eval_fixtures import FAST, fake_hmdb_root, make_tiny_gar, write_clip


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def tiny_gar(tmp_path_factory):
    return make_tiny_gar(tmp_path_factory.mktemp("gar"))


@pytest.fixture(scope="module")
def hmdb(tmp_path_factory):
    return fake_hmdb_root(tmp_path_factory.mktemp("hmdb"))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """3 demo actions x 3 clips, class sub-folders."""
    root = tmp_path_factory.mktemp("data") / "labelled"
    for a in ("growing", "moving_left", "spinning"):
        for j in range(3):
            write_clip(root / a / f"{a}_{j}.mp4", a, seed=10 * j + len(a))
    return root


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


GEN = ["--num-beams", "1", "--max-length", "8", "--min-length", "2", "--clip", "tiny"]


def test_few_shot_epochs_table10():
    from rest_fast.eval.finetune import few_shot_epochs

    assert [few_shot_epochs(m) for m in (2, 4, 8, 16)] == [200, 100, 50, 30]
    assert few_shot_epochs(1) == 400 and few_shot_epochs(3) == 134 and few_shot_epochs(64) == 30
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="shots"):
            few_shot_epochs(bad)


def test_class_captions_and_sample_shots():
    from rest_fast.eval.finetune import class_captions, sample_shots

    assert class_captions(["ApplyEyeMakeup", "brush_hair", "moving_left", "YoYo"]) == [
        "apply eye makeup", "brush hair", "moving left", "yo-yo"]
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0]
    train, rest = sample_shots(labels, 2, seed=1)
    assert sorted(train + rest) == list(range(len(labels))) and not set(train) & set(rest)
    assert [sum(labels[i] == c for i in train) for c in (0, 1, 2)] == [2, 2, 2]
    assert sample_shots(labels, 2, seed=1) == (train, rest)
    assert sample_shots(labels, 3, seed=0)[0].count(3) + sample_shots(labels, 3, seed=0)[0].count(4) == 2


def test_default_epochs_and_plan(hmdb, labelled):
    """Few-shot defaults to max(400/M, 30) epochs, supervised to SUPERVISED_EPOCHS; the sets each mode uses."""
    from rest_fast.cli import build_parser
    from rest_fast.eval.finetune import SUPERVISED_EPOCHS, _plan

    root, info = hmdb
    parse = lambda *a: build_parser().parse_args(["finetune", "--checkpoint", "x", *a])  # noqa: E731
    for m, e in ((2, 200), (16, 30)):
        plan = _plan(parse("--protocol", "hmdb51", "--shots", str(m), "--data-root", str(root)))
        assert plan["epochs"] == e and [s.split for s in plan["eval_sets"]] == [1]
    plan = _plan(parse("--protocol", "hmdb51", "--shots", "2", "--data-root", str(root)))
    assert len(plan["train"].videos) == len(info["shots"]) and plan["train"].listed == 102
    plan = _plan(parse("--supervised", "--data", str(labelled)))
    assert plan["epochs"] == SUPERVISED_EPOCHS and plan["eval_sets"][0] is plan["train"]
    plan = _plan(parse("--supervised", "--data", str(labelled), "--protocol", "hmdb51", "--data-root", str(root)))
    assert [s.split for s in plan["eval_sets"]] == [1, 2, 3] and len(plan["train"].videos) == 9
    plan = _plan(parse("--data", str(labelled), "--shots", "1", "--seed", "4"))
    assert len(plan["train"].videos) == 3 and plan["eval_sets"][0].name == "labelled_heldout"
    assert len(plan["eval_sets"][0].videos) == 6
    assert not {p for p, _ in plan["train"].videos} & {p for p, _ in plan["eval_sets"][0].videos}


def test_finetune_few_shot_protocol_end_to_end(tiny_gar, hmdb, tmp_path, capsys):
    from safetensors.torch import load_file

    from rest_fast.cli import main

    root, info = hmdb
    out = tmp_path / "fs"
    rc = main(["finetune", "--protocol", "hmdb51", "--shots", "2", "--split", "1", "--data-root", str(root),
               "--checkpoint", str(tiny_gar), "--epochs", "2", "--lr", "1e-3", "--train-batch-size", "4", "--out",
               str(out), "--max-unreadable", "0.2", *GEN, *FAST])
    assert rc == 0
    assert "96 of 102 training videos missing" in capsys.readouterr().err
    cfg = json.loads((out / "finetune.json").read_text())
    assert (cfg["mode"], cfg["epochs"], cfg["train_videos"], cfg["train_missing"]) == ("few-shot", 2, 6, 96)
    assert len((out / "missing_train.txt").read_text().split()) == 96
    recs = _jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in recs] == [1, 2] and all(r["steps"] == 2 for r in recs)
    # the saved model differs from the start (it trained) and evaluates the same as in-process
    before = load_file(str(tiny_gar / "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    res = json.loads((out / "eval" / "results.json").read_text())
    (s,) = res["sets"]
    assert (s["name"], s["split"], s["n"], s["unreadable"]) == ("hmdb51", 1, len(info["placed"]), 1)
    preds = _jsonl(out / "eval" / "predictions_hmdb51_split1.jsonl")
    assert main(["eval", "--checkpoint", str(out), "--protocol", "hmdb51", "--data-root", str(root), "--split", "1",
                 "--out", str(tmp_path / "re"), "--max-unreadable", "0.2", *GEN, *FAST]) == 0
    again = _jsonl(tmp_path / "re" / "predictions_hmdb51_split1.jsonl")
    assert [(p["video"], p["caption"], p["topk"]) for p in again] == [(p["video"], p["caption"], p["topk"])
                                                                     for p in preds]


def test_finetune_supervised_learns_class_names(tiny_gar, labelled, tmp_path):
    """The class-label baseline on a small labelled folder: the loss falls and the model ends up writing the class
    names, so CLIP-TAM (any deterministic text encoder maps a name to itself) scores the training set high."""
    from rest_fast.cli import main

    out = tmp_path / "sup"
    assert main(["finetune", "--supervised", "--data", str(labelled), "--checkpoint", str(tiny_gar), "--epochs", "30",
                 "--image-size", "32",
                 "--lr", "3e-3", "--lr-min", "1e-4", "--label-smoothing", "0", "--no-augment", "--train-batch-size",
                 "9", "--out", str(out), *GEN, *FAST]) == 0
    recs = _jsonl(out / "metrics.jsonl")
    assert len(recs) == 30 and recs[-1]["loss"] < 0.5 * recs[0]["loss"]
    res = json.loads((out / "eval" / "results.json").read_text())
    assert res["sets"][0]["n"] == 9 and res["sets"][0]["top1"] >= 2 / 3
    preds = _jsonl(out / "eval" / "predictions_labelled.jsonl")
    assert sum(p["caption"] == p["label"].replace("_", " ") for p in preds) >= 6


def test_finetune_few_shot_on_data_holds_out_the_rest(tiny_gar, labelled, tmp_path):
    from rest_fast.cli import main

    out = tmp_path / "fsd"
    assert main(["finetune", "--data", str(labelled), "--shots", "1", "--checkpoint", str(tiny_gar), "--epochs", "1",
                 "--out", str(out), *GEN, *FAST]) == 0
    res = json.loads((out / "eval" / "results.json").read_text())
    train = {line.split()[0] for line in (out / "train_videos.txt").read_text().splitlines()}
    preds = _jsonl(out / "eval" / "predictions_labelled_heldout.jsonl")
    assert len(train) == 3 and res["sets"][0]["n"] == len(preds) == 6
    assert not train & {p["path"] for p in preds}


def test_finetune_argument_errors(tiny_gar, hmdb, labelled, tmp_path, capsys):
    from rest_fast.cli import main

    root, _ = hmdb
    base = ["--checkpoint", str(tiny_gar), "--out", str(tmp_path / "x"), *FAST]
    cases = [
        (["--protocol", "hmdb51", "--data-root", str(root)], "--shots M"),
        (["--supervised", "--shots", "2", "--data", str(labelled)], "pick one"),
        (["--supervised", "--protocol", "hmdb51", "--data-root", str(root)], "--supervised trains on"),
        (["--protocol", "k400", "--shots", "2", "--data-root", str(root)], "no few-shot lists"),
        (["--protocol", "hmdb51", "--shots", "3", "--data-root", str(root)], "shots must be one of"),
        (["--protocol", "hmdb51", "--shots", "2"], "--data-root"),
        (["--protocol", "hmdb51", "--shots", "2", "--data-root", str(tmp_path)], "none of the 102 training videos"),
    ]
    for args, msg in cases:
        assert main(["finetune", *args, *base]) == 2, args
        assert msg in capsys.readouterr().err, args


def _three_split_root(root):
    """Two HMDB-51 classes: 2 videos every split's test list holds, the published 2-shot split-1 training videos,
    and 3 split-1-test-only videos per class (training candidates for splits 2 and 3). Flat file names."""
    from rest_fast.eval import protocols
    from rest_fast.train.demo import ACTIONS

    tests = [dict(protocols.get("hmdb51", split=s).videos) for s in (1, 2, 3)]
    names = protocols.get("hmdb51").class_names
    shots = protocols.get("hmdb51", shots=2).videos
    classes = sorted({y for _, y in shots})[:2]
    placed = []
    for k, c in enumerate(classes):
        everywhere = [r for r, y in tests[0].items() if y == c and r in tests[1] and r in tests[2]][:2]
        only1 = [r for r, y in tests[0].items() if y == c and r not in tests[1] and r not in tests[2]][:3]
        train1 = [r for r, y in shots if y == c]
        for j, rel in enumerate(dict.fromkeys(everywhere + only1 + train1)):
            write_clip(root / rel, ACTIONS[k], seed=31 * k + j, frames=4, size=32)
            placed.append(rel)
    return root, [names[c] for c in classes], tests


def test_derive_few_shot_lists(tmp_path):
    from rest_fast.eval import protocols

    root, classes, tests = _three_split_root(tmp_path / "hmdb")
    for s in (2, 3):
        p = protocols.derive_few_shot("hmdb51", s, 2, root, seed=0)
        assert p.split == s and p.shots == 2 and "seed 0" in p.video_list
        labels = [y for _, y in p.videos]
        assert sorted({p.class_names[y] for y in labels}) == sorted(classes)
        assert all(labels.count(y) == 2 for y in set(labels))
        assert not {r for r, _ in p.videos} & set(tests[s - 1])  # never a video of that split's test list
        assert all((root / r).is_file() for r, _ in p.videos)
        assert protocols.derive_few_shot("hmdb51", s, 2, root, seed=0).videos == p.videos  # fixed seed: same list
    # class sub-folders are read too, and a class with fewer videos than M gives all it has
    one = tmp_path / "sub" / "brush_hair"
    write_clip(one / "my_clip.mp4", "growing", seed=1, frames=4, size=32)
    p = protocols.derive_few_shot("hmdb51", 2, 4, tmp_path / "sub")
    assert p.videos == [("brush_hair/my_clip.mp4", p.class_names.index("brush_hair"))]
    with pytest.raises(ValueError, match="few-shot"):
        protocols.derive_few_shot("k400", None, 2, root)


def test_few_shot_runs_three_splits_mean_std(tiny_gar, tmp_path, capsys):
    from rest_fast.cli import main
    from rest_fast.eval.metrics import mean_std

    root, _, tests = _three_split_root(tmp_path / "hmdb")
    out = tmp_path / "fs3"
    rc = main(["finetune", "--protocol", "hmdb51", "--shots", "2", "--data-root", str(root), "--checkpoint",
               str(tiny_gar), "--epochs", "1", "--lr", "1e-3", "--train-batch-size", "4", "--out", str(out),
               *GEN, *FAST])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert [s["split"] for s in res["sets"]] == [1, 2, 3]
    for s in res["sets"]:
        sub = out / f"split{s['split']}"
        assert (sub / "model" / "model.safetensors").is_file() and (sub / "eval" / "results.json").is_file()
        cfg = json.loads((sub / "finetune.json").read_text())
        assert cfg["split"] == s["split"] and cfg["epochs"] == 1 and cfg["train_videos"] == s["train_videos"] == 4
        trained = {line.split()[0].rsplit("/", 1)[-1] for line in (sub / "train_videos.txt").read_text().splitlines()}
        assert not trained & set(tests[s["split"] - 1])
    summary = res["summary"]["hmdb51_2shot"]
    m, sd = mean_std([s["top1"] for s in res["sets"]])
    assert summary["splits"] == 3 and summary["top1"] == {"mean": m, "std": sd}
    assert "mean ± std (3)" in (out / "table.md").read_text()


def test_supervised_defaults_follow_table10(tiny_gar, labelled, tmp_path, monkeypatch):
    """The class-label baseline: 60 epochs at S=224 by default, whatever the checkpoint's native size (32 here)."""
    from rest_fast.cli import main
    from rest_fast.eval import finetune as ft

    seen = {}

    def fake_finetune(model, videos, class_names, **kw):  # record the schedule; training itself is tested above
        seen.update(kw)
        from rest_fast.data.bad_files import BadFilesReport

        return [], BadFilesReport()

    monkeypatch.setattr(ft, "finetune", fake_finetune)
    assert ft.SUPERVISED_EPOCHS == 60 and ft.SUPERVISED_IMAGE_SIZE == 224
    out = tmp_path / "sup"
    assert main(["finetune", "--supervised", "--data", str(labelled), "--checkpoint", str(tiny_gar), "--no-eval",
                 "--out", str(out), *FAST]) == 0
    assert seen["epochs"] == 60 and seen["image_size"] == 224
    cfg = json.loads((out / "finetune.json").read_text())
    assert (cfg["epochs"], cfg["image_size"]) == (60, 224)
    assert main(["finetune", "--supervised", "--data", str(labelled), "--checkpoint", str(tiny_gar), "--no-eval",
                 "--image-size", "32", "--out", str(out), *FAST]) == 0
    assert seen["image_size"] == 32
