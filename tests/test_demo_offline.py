"""The demo's own run folder works offline (issue 23, item 11), and a checkpoint's checksum map must cover both
of its files (item 2).

The reduced demo (the pretrained demo BLIP and CLIP, 8 clips, 2 epochs) is trained through the CLI, then
``eval --checkpoint RUN`` and ``caption CLIP --checkpoint RUN`` run with the network unreachable: every socket
connect or name lookup fails the test. Names that are not hub ids (``demo``, ``tiny``, a missing local path)
never reach the network.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from rest_fast.cli import main

DEMO = ["epochs=2", "epochs_per_round=1", "demo_videos_per_class=1", "num_workers=0", "threads=1", "progress=false"]
FAST = ["--device", "cpu", "--no-progress", "--num-workers", "0", "--threads", "1"]


class NetworkUsed(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """The network is unreachable: any connect or DNS lookup fails the test at once (no retries to wait for)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*a, **k):
        raise NetworkUsed(f"network used: {a[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "demo"
    with pytest.MonkeyPatch.context() as mp:  # the reference ops, for this run only (later modules need the kernels)
        mp.setenv("TRITON_INTERPRET", "0")
        assert main(["train", "--out", str(run), *DEMO]) == 0
    cfg = (run / "config.yaml").read_text()
    assert "blip: demo" in cfg and "clip: demo" in cfg and "data: null" in cfg
    return run


def test_eval_and_caption_of_the_demo_run_work_offline(demo_run, capsys):
    assert main(["eval", "--checkpoint", str(demo_run), *FAST]) == 0  # its own labelled clips
    results = json.loads((demo_run / "eval" / "clips" / "results.json").read_text())
    assert results["sets"][0]["n"] == 8
    clip = demo_run / "demo" / "clips" / "blinking" / "blinking_00.mp4"
    capsys.readouterr()
    assert main(["caption", str(clip), "--checkpoint", str(demo_run), "--json", *FAST]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["video"] == str(clip) and rec["captions"][0].strip()


def test_finetune_from_the_demo_run_works_offline(demo_run, tmp_path):
    out = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(demo_run), "--supervised", "--data", str(demo_run / "demo" / "clips"),
                 "--epochs", "1", "--train-batch-size", "4", "--no-eval", "--out", str(out), *FAST]) == 0
    assert (out / "model" / "config.json").is_file()


def test_names_that_are_not_hub_ids_never_reach_the_network(demo_run, tmp_path, monkeypatch, capsys):
    from rest_fast.eval.checkpoint import resolve_checkpoint
    from rest_fast.synthetic.models import demo_blip_dir

    assert resolve_checkpoint("demo").blip_source == str(demo_blip_dir())  # the packaged demo BLIP
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    clip = demo_run / "demo" / "clips" / "blinking" / "blinking_00.mp4"
    for spec, msg in (("runs/nope", "runs/nope: no such directory (a local path, not a Hugging Face hub id)"),
                      ("tiny", "written into each run folder"), ("./gone", "no such directory")):
        assert main(["eval", "--checkpoint", spec, "--data", str(demo_run / "demo" / "clips"), *FAST]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert main(["caption", str(clip), "--checkpoint", "demo", *FAST]) == 0


def test_train_from_a_missing_local_model_folder_never_reaches_the_network(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for flag in ("--blip=models/nope", "--clip=./nope"):
        rc = main(["train", "--out", str(tmp_path / "run"), "--blip=tiny", "--clip=tiny", flag])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "no such folder (a local path, not a Hugging Face hub id)" in err[0], err
        assert not (tmp_path / "run").exists()


def test_a_run_trained_from_a_missing_local_blip_is_refused_without_the_network(demo_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    cfg = (run / "config.yaml").read_text().replace("blip: demo", f"blip: {tmp_path / 'moved_away'}")
    (run / "config.yaml").write_text(cfg)
    assert main(["eval", "--checkpoint", str(run), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "moved_away" in err[0] and "no such folder" in err[0], err


# ---------------------------------------------------------------------------------------------- item 2
def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("sums", [{}, None, "only_model"])
def test_a_checksum_map_lacking_a_file_is_unverified_and_skipped(demo_run, tmp_path, sums, capsys):
    """`"sha256": {}` and flipped weights: eval falls back to the intact epoch with a warning, never evaluates it."""
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    latest = run / "checkpoints" / "epoch_0002"
    meta = json.loads((latest / "meta.json").read_text())
    if sums == "only_model":
        meta["sha256"].pop("train_state.pt")
    elif sums is None:
        meta.pop("sha256")
    else:
        meta["sha256"] = sums
    (latest / "meta.json").write_text(json.dumps(meta))
    _flip_a_byte(latest / "train_state.pt" if sums == "only_model" else latest / "model.safetensors")
    with pytest.warns(UserWarning, match="no checksum for"):
        assert main(["eval", "--checkpoint", str(run), *FAST]) == 0
    results = json.loads((run / "eval" / "clips" / "results.json").read_text())
    assert results["checkpoint"]["epoch"] == 1
    # named explicitly, the unverified epoch is an error, not evaluated
    assert main(["eval", "--checkpoint", str(latest), *FAST]) == 2
    assert "unverified" in capsys.readouterr().err


def test_a_checksum_map_naming_other_files_is_an_error(demo_run, tmp_path, capsys):
    from rest_fast.run.rundir import RunDir, UnsafePath, verify_checkpoint

    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    latest = run / "checkpoints" / "epoch_0002"
    meta = json.loads((latest / "meta.json").read_text())
    meta["sha256"]["../../../../etc/passwd"] = "0" * 64
    (latest / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UnsafePath, match="not part of a checkpoint"):
        verify_checkpoint(latest)
    with pytest.raises(UnsafePath, match="not part of a checkpoint"):
        RunDir.load_checkpoint(latest)
    assert main(["eval", "--checkpoint", str(run), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "etc/passwd" in err[0] and "not part of a checkpoint" in err[0], err
    assert main(["train", "--out", str(run), "--resume", "auto", "epochs=3"]) == 2
    assert "not part of a checkpoint" in capsys.readouterr().err
