"""The trainer end to end on the demo data: a fast small run, the demo itself, kill -9 + resume, torchrun x2.

Every run here uses tiny random models and synthetic clips; ops run on their torch reference paths
(``TRITON_INTERPRET=0``: the interpreter is for the kernel tests).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

# A run smaller than the demo: 12 clips, T=2, 2 rounds of 1 epoch.
SMALL = ["demo_videos_per_class=2", "demo_frames=8", "num_frames=2", "epochs=2", "epochs_per_round=1",
         "batch_size=6", "num_beams=1", "max_length=8", "min_length=2", "prompts=[a video of, someone is]",
         "num_neighbours=4", "progress=false",
         "blip=tiny", "clip=tiny", "clip_pretrained=none", "k=3"]  # the random-init fixture (old demo clips)


def _env() -> dict:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rest_fast", "train", *args], env=_env(), capture_output=True,
                          text=True, **kw)


def _records(run: Path, kind: str) -> list[dict]:
    from rest_fast.run.rundir import read_jsonl

    return [r for r in read_jsonl(run / "metrics.jsonl") if r.get("kind") == kind]


def _check_complete_run(run: Path, rounds: int, epochs: int, n_videos: int) -> None:
    from rest_fast.cache import CaptionCache

    state = json.loads((run / "state.json").read_text())
    assert state["epoch"] == epochs and state["round"] == rounds
    for r in range(rounds + 1):
        recs = [json.loads(x) for x in (run / "captions" / f"round_{r:02d}.jsonl").read_text().splitlines()]
        assert len(recs) == n_videos
        assert all(1 <= len(x["captions"]) <= 3 and x["scores"] == sorted(x["scores"], reverse=True) for x in recs)
        assert all(len(set(x["captions"])) == len(x["captions"]) for x in recs)  # distinct
        assert ("generated" in recs[0]) == (r > 0)
    single = run / "cache" / f"round_{rounds:02d}.rfcc"
    if single.exists():  # one process: the cache keeps every round's snapshot
        cache = CaptionCache.load(str(single))
        assert [r for r, _ in cache.history(0)] == list(range(rounds + 1))  # no gap in the caption history
    else:  # torchrun: per-rank files of every round; joined back, the last one holds the captions file's slots
        from rest_fast.cache.sharded import to_single_process

        assert all((run / "cache" / f"round_{r:02d}.sharded.json").is_file() for r in range(rounds + 1))
        cache = to_single_process(run / "cache", rounds)
        ids, _ = cache.get(np.arange(n_videos))
        assert [[cache.text(int(c)) for c in row if c >= 0] for row in ids] == [x["captions"] for x in recs]
    assert sorted(r["epoch"] for r in _records(run, "epoch")) == list(range(1, epochs + 1))
    assert sorted(r["round"] for r in _records(run, "round")) == list(range(rounds + 1))
    assert (run / "report.html").exists() and (run / "plots" / "loss.png").exists()
    assert (run / "plots" / "rounds.png").exists() and (run / "bad_files.tsv").exists()
    assert (run / "checkpoints" / f"epoch_{epochs:04d}" / "model.safetensors").exists()


def test_small_run_end_to_end(tmp_path, monkeypatch, capsys):
    """In-process: CLI parsing → Algorithm 1 → complete run dir; then `--resume auto` on a finished run is a no-op."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from rest_fast.cli import main

    run = tmp_path / "run"
    assert main(["train", f"--out={run}", *SMALL]) == 0
    _check_complete_run(run, rounds=2, epochs=2, n_videos=12)
    round1 = _records(run, "round")[1]
    assert round1["new_captions"] <= 12 and "tam_top1" in round1  # demo clips are labelled: CLIP-TAM is measured
    html = (run / "report.html").read_text()
    assert "moving_right" in html and "plots/frames/video_00000.png" in html
    # a new run may not overwrite it
    capsys.readouterr()
    assert main(["train", f"--out={run}", *SMALL]) == 2
    assert "already holds a run" in capsys.readouterr().err
    before = (run / "metrics.jsonl").read_text().count('"kind": "epoch"')
    assert main(["train", f"--out={run}", "--resume", "auto", *SMALL]) == 0
    assert (run / "metrics.jsonl").read_text().count('"kind": "epoch"') == before
    # a changed identity key is refused on resume, in one line per key naming both values
    capsys.readouterr()
    assert main(["train", f"--out={run}", "--resume", "auto", *SMALL, "k=2"]) == 2
    assert "k: 3 (run) != 2 (now)" in capsys.readouterr().err


def _run_and_kill(run: Path, args: list[str], marker) -> None:
    """Start `rest-fast train args`, SIGKILL it once ``marker()`` is true."""
    proc = subprocess.Popen([sys.executable, "-m", "rest_fast", "train", *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None and not marker():
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()


def _final_state(run: Path, epochs: int, rounds: int):
    from safetensors.torch import load_file

    weights = load_file(str(run / "checkpoints" / f"epoch_{epochs:04d}" / "model.safetensors"))
    captions = (run / "captions" / f"round_{rounds:02d}.jsonl").read_text()
    return weights, captions


@pytest.mark.slow
def test_demo_runs_under_cli(tmp_path):
    """The demo's random-init fixture path as a user runs it: `rest-fast train` with no --data, tiny models.

    (The default demo, on the synthetic world with the pretrained demo models, is tests/test_demo_world.py.)"""
    run = tmp_path / "demo"
    t0 = time.time()
    p = _cli([f"--out={run}", "--no-progress", "blip=tiny", "clip=tiny", "clip_pretrained=none",
              "demo_videos_per_class=5", "epochs=6", "epochs_per_round=3"], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "shows the REST pipeline" in p.stdout and "mean nothing" in p.stdout
    print(f"demo wall time {time.time() - t0:.1f} s")
    _check_complete_run(run, rounds=2, epochs=6, n_videos=30)


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(tmp_path):
    """SIGKILL during round 0 and again mid-round 2, resume each time, finish: same final state as a run that
    was never interrupted (CPU is deterministic), no gap in the caption history."""
    args = [*SMALL, "epochs=4", "epochs_per_round=2"]
    ref = tmp_path / "ref"
    p = _cli([f"--out={ref}", *args], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]

    run = tmp_path / "killed"
    # first kill: as soon as the initial captions are on disk (round 0 under way, no state yet or just written)
    _run_and_kill(run, [f"--out={run}", *args], lambda: (run / "captions" / "initial.jsonl").exists())
    # second kill: mid-round, once the first epoch of round 2 is recorded
    _run_and_kill(run, [f"--out={run}", "--resume", "auto", *args],
                  lambda: any(r["epoch"] == 3 for r in _records(run, "epoch")))
    state = json.loads((run / "state.json").read_text())
    assert state["round"] == 1 and state["epoch"] in (2, 3)
    p = _cli([f"--out={run}", "--resume", "auto", *args], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming" in p.stdout
    _check_complete_run(run, rounds=2, epochs=4, n_videos=12)
    w_ref, cap_ref = _final_state(ref, 4, 2)
    w_run, cap_run = _final_state(run, 4, 2)
    assert cap_run == cap_ref
    assert w_ref.keys() == w_run.keys()
    for k in w_ref:
        assert torch.equal(w_ref[k], w_run[k]), k
    # going back to an older checkpoint folder (--resume PATH) redoes epoch 4 and round 2 identically
    p = _cli(["--resume", str(run / "checkpoints" / "epoch_0003"), *args], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    _check_complete_run(run, rounds=2, epochs=4, n_videos=12)
    w_again, cap_again = _final_state(run, 4, 2)
    assert cap_again == cap_ref and all(torch.equal(w_ref[k], w_again[k]) for k in w_ref)


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    """torchrun --nproc-per-node 2 on CPU (gloo): the sharded passes equal a 1-process run's; DDP trains."""
    # eval batches of 6 = one batch per rank's block of 6 videos: both runs see the same batches, so the
    # sharded passes must agree bit for bit (a tiny random captioner is sensitive to rounding noise)
    args = [*SMALL, "epochs=1", "eval_batch_size=6"]
    single = tmp_path / "single"
    p = _cli([f"--out={single}", *args], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "rest_fast", "train", f"--out={run}", *args]
    env = _env()
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    _check_complete_run(run, rounds=1, epochs=1, n_videos=12)
    # sharded by video then gathered: identical to one process
    assert (run / "captions" / "initial.jsonl").read_text() == (single / "captions" / "initial.jsonl").read_text()
    np.testing.assert_array_equal(np.load(run / "features" / "video_clip.npy"),
                                  np.load(single / "features" / "video_clip.npy"))
    from rest_fast.retrieval import NeighbourGraph
    from rest_fast.train.neighbours import read_rank_graphs

    # each rank saved its own rows (issue 20 item 4)
    g_ddp = read_rank_graphs(run / "features" / "neighbours", 2)
    g_one = NeighbourGraph.load(single / "features" / "neighbours")
    assert torch.equal(g_ddp.indices, g_one.indices)
    # under torchrun the tag is made of the ranks' per-block digests (no rank holds every row: issue 20, item 5)
    from rest_fast.retrieval import feature_hash
    from rest_fast.train.neighbours import blocks_tag

    one = torch.from_numpy(np.load(single / "features" / "video_clip.npy")).half()
    assert g_one.feature_hash == feature_hash(one)
    assert g_ddp.feature_hash == blocks_tag([feature_hash(one[:6]), feature_hash(one[6:])])
    assert (run / "captions" / "round_00.jsonl").read_text() == (single / "captions" / "round_00.jsonl").read_text()
    start = _records(run, "start")
    assert start and start[0]["world_size"] == 2


def test_real_data_path_with_a_bad_file(tmp_path, monkeypatch, capsys):
    """--data as a list file with one corrupt video: over the threshold the run stops with a clear error;
    under it the run completes and bad_files.tsv names the file; H=2000 is capped at N-1 with a warning."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from rest_fast.cli import main
    from rest_fast.train.demo import ACTIONS, synthesize_dataset

    root = synthesize_dataset(tmp_path / "clips", videos_per_class=1, frames=8, size=32, actions=ACTIONS[:4])
    (root / "moving_left" / "broken.mp4").write_bytes(b"this is not a video")
    lines = [f"{a}/{a}_00.mp4 {i}" for i, a in enumerate(ACTIONS[:4])] + ["moving_left/broken.mp4 0"]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    args = [f"--data={tmp_path / 'train.txt'}", f"data_root={root}", "--blip=tiny", "--clip=tiny", "clip_pretrained=none", "image_size=32",
            "num_frames=2", "epochs=1", "epochs_per_round=1", "batch_size=4", "num_beams=1", "max_length=8",
            "min_length=2", "prompts=[a video of]", "num_neighbours=2", "num_workers=0", "threads=1",
            "progress=false", "eval_batch_size=8", "final_caption_round=true"]
    # over the threshold: one line naming the file, exit 2 (the loaders' TooManyBadFiles, reported by the CLI)
    assert main(["train", f"--out={tmp_path / 'strict'}", *args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and err[0].startswith("rest-fast train: error: ") and "broken.mp4" in err[0]
    run = tmp_path / "lenient"
    with pytest.warns(UserWarning, match="capped at N-1=4"):  # H larger than the dataset allows
        assert main(["train", f"--out={run}", *args, "bad_files_threshold=0.25", "num_neighbours=2000"]) == 0
    _check_complete_run(run, rounds=1, epochs=1, n_videos=5)
    from rest_fast.retrieval import NeighbourGraph

    assert NeighbourGraph.load(run / "features" / "neighbours").k == 4
    tsv = (run / "bad_files.tsv").read_text()
    assert "broken.mp4" in tsv
