"""`eval` and `finetune` at scale (issue 21 item 5): eval under 2 gloo ranks writes what one process writes;
`finetune --resume auto` after an interruption (an exception, then SIGKILL) ends where an uninterrupted run ends;
finetune under torchrun trains with DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from eval_fixtures import FAST, make_tiny_gar, write_clip

GEN = ["--num-beams", "1", "--max-length", "8", "--min-length", "2", "--clip", "tiny"]
TRAIN = ["--supervised", "--epochs", "4", "--image-size", "32", "--lr", "3e-3", "--lr-min", "1e-4",
         "--train-batch-size", "4", "--no-eval", "--save-every-minutes", "0"]


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def tiny_gar(tmp_path_factory):
    return make_tiny_gar(tmp_path_factory.mktemp("gar"))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """4 demo actions x 3 clips (12 videos), class sub-folders."""
    root = tmp_path_factory.mktemp("data") / "labelled"
    for a in ("growing", "moving_left", "spinning", "shrinking"):
        for j in range(3):
            write_clip(root / a / f"{a}_{j}.mp4", a, seed=10 * j + len(a))
    return root


def _env() -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    return env


def _files(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(out.iterdir()) if p.is_file()}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def _losses(out: Path) -> list[tuple[int, float, float, int]]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["epoch"], r["loss"], r["lr"], r["steps"]) for r in recs]


# ------------------------------------------------------------------------------------------- eval
@pytest.mark.slow
def test_eval_under_two_gloo_ranks_writes_what_one_process_writes(tiny_gar, labelled, tmp_path):
    # batches of 6 = one batch per rank's block of 6 videos: both runs caption the same batches
    args = ["eval", "--checkpoint", str(tiny_gar), "--data", str(labelled), "--batch-size", "6", *GEN, "--threads",
            "1", "--num-workers", "0", "--no-progress", "--device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    p = subprocess.run([sys.executable, "-m", "rest_fast", *args, "--out", str(one)], env=_env(),
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "rest_fast", *args, "--out", str(two)], env=_env(), capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("| set | split |") == 1  # rank 0 alone prints the table
    a, b = _files(one), _files(two)
    assert "results.json" in a and "predictions_labelled.jsonl" in a
    assert a == b
    assert len(a["predictions_labelled.jsonl"].splitlines()) == 12


# ------------------------------------------------------------------------------------------- finetune resume
class _Interrupted(Exception):
    pass


def test_finetune_interrupted_then_resumed_equals_uninterrupted(tiny_gar, labelled, tmp_path, monkeypatch, capsys):
    from rest_fast.cli import main
    from rest_fast.eval import finetune as ft

    base = ["finetune", "--data", str(labelled), "--checkpoint", str(tiny_gar), *TRAIN, *GEN, *FAST]
    ref = tmp_path / "ref"
    assert main([*base, "--out", str(ref)]) == 0
    assert len(list((ref / "checkpoints").iterdir())) == 1  # the newest epoch only
    assert (ref / "finished.json").is_file()

    run = tmp_path / "run"
    save = ft._save_checkpoint

    def save_then_die(folder, model, optimizer, scheduler, records, ranks):
        save(folder, model, optimizer, scheduler, records, ranks)
        if len(records) == 2:
            raise _Interrupted  # "killed" right after epoch 2's checkpoint, before its metrics line
    with monkeypatch.context() as m:
        m.setattr(ft, "_save_checkpoint", save_then_die)
        with pytest.raises(_Interrupted):
            main([*base, "--out", str(run)])
    assert not (run / "finished.json").exists() and len(_losses(run)) == 1
    capsys.readouterr()
    assert main([*base, "--out", str(run), "--resume", "auto"]) == 0
    assert "resuming fine-tuning from" in capsys.readouterr().err
    assert [x[:1] + x[2:] for x in _losses(run)] == [x[:1] + x[2:] for x in _losses(ref)]
    assert [x[1] for x in _losses(run)] == [x[1] for x in _losses(ref)]
    w_ref, w_run = _weights(ref / "model"), _weights(run / "model")
    assert w_ref.keys() == w_run.keys() and all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)
    # a finished folder is left alone; other settings are refused by name, in one line
    before = (run / "metrics.jsonl").read_text()
    assert main([*base, "--out", str(run), "--resume", "auto"]) == 0
    assert "nothing to do" in capsys.readouterr().err and (run / "metrics.jsonl").read_text() == before
    assert main([*base, "--out", str(run), "--resume", "auto", "--lr", "1e-3"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and "lr: 0.003 (then) != 0.001 (now)" in err[0], err


@pytest.mark.slow
def test_finetune_sigkill_and_resume_auto(tiny_gar, labelled, tmp_path):
    cmd = [sys.executable, "-m", "rest_fast", "finetune", "--data", str(labelled), "--checkpoint", str(tiny_gar),
           *TRAIN, *GEN, *FAST]
    ref = tmp_path / "ref"
    p = subprocess.run([*cmd, "--out", str(ref)], env=_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "run"
    proc = subprocess.Popen([*cmd, "--out", str(run), "--resume", "auto"], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None and not (run / "checkpoints" / "epoch_0002").is_dir():
            time.sleep(0.02)
        assert proc.poll() is None, "finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    p = subprocess.run([*cmd, "--out", str(run), "--resume", "auto"], env=_env(), capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming fine-tuning from" in p.stderr
    assert [x[:2] for x in _losses(run)] == [x[:2] for x in _losses(ref)]
    w_ref, w_run = _weights(ref / "model"), _weights(run / "model")
    assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)


@pytest.mark.slow
def test_finetune_under_torchrun_trains_with_ddp_and_evaluates(tiny_gar, labelled, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "rest_fast",
           "finetune", "--data", str(labelled), "--checkpoint", str(tiny_gar), "--supervised", "--epochs", "3",
           "--image-size", "32", "--lr", "3e-3", "--train-batch-size", "4", "--batch-size", "6", "--out", str(out),
           *GEN, *FAST]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "x 2 ranks" in p.stderr
    recs = _losses(out)
    assert [r[0] for r in recs] == [1, 2, 3] and all(r[3] == 3 for r in recs)  # 12 videos / global batch 4
    assert (out / "model" / "model.safetensors").is_file() and (out / "finished.json").is_file()
    res = json.loads((out / "eval" / "results.json").read_text())
    assert res["sets"][0]["n"] == 12
