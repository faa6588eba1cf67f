"""`rest-fast export` (issue 21 item 7): a run as a self-contained HF-style folder that captions as the run did.

The fast tests build a run folder the way the trainer writes one (tiny random BLIP in ``models/tiny_blip``, a
checksummed checkpoint whose adapters and captioner weights moved away from their init, ``state.json``,
``metrics.jsonl``), export it, move the run away and caption from the export alone. The slow test does the same
from a real `rest-fast train` run through the CLI in fresh processes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import video_fixtures as vf

from rest_fast.cli import main
from rest_fast.run.config import TrainConfig
from rest_fast.run.rundir import RunDir, atomic_write_text

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _make_run(root: Path) -> Path:
    """A finished-looking trainer run (epoch 2, round 2) with moved weights; as `rest-fast train` lays it out."""
    from rest_fast.models import GARModel
    from rest_fast.train.distributed import DistEnv
    from rest_fast.train.inputs import ensure_tiny_blip

    cfg = TrainConfig(blip="tiny", clip="tiny", clip_pretrained=None, num_frames=2, image_size=32, num_beams=2,
                      max_length=8, min_length=2, epochs=2, epochs_per_round=1, out=str(root))
    RunDir.claim(root)
    run = RunDir(root)
    atomic_write_text(run.config_path, cfg.to_yaml())
    blip_dir = ensure_tiny_blip(run.path("models", "tiny_blip"), cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    model = GARModel.from_pretrained(blip_dir, num_frames=2, adapter_layers="all")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # trained-looking weights: adapters far from identity, the decoder moved too
        for name, p in model.named_parameters():
            if name.startswith("temporal_adapters") or "text_decoder.cls" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    ckpt = run.save_checkpoint(2, model.state_dict(), {"step": 4}, {"round": 1, "step": 4, "world_size": 1})
    run.write_state({"epoch": 2, "round": 2, "checkpoint": str(ckpt.relative_to(root))})
    for r, acc in ((0, None), (1, 0.25), (2, 0.5)):
        run.append_metric({"kind": "round", "round": r, "epoch": r, "tam_pseudo_top1": 0.3,
                           **({"tam_top1": acc, "tam_top5": 0.9} if acc is not None else {})})
        if r:
            run.append_metric({"kind": "epoch", "epoch": r, "round": r, "loss": 3.0 - r, "step": 2 * r})
    return root


def _video(path: Path) -> str:
    return str(vf.write_video(path, (vf.textured_frame(i, 40, 36) for i in range(8)), "h264"))


def _tokens(checkpoint: str, video: str) -> tuple[list[list[int]], dict, tuple[str, float]]:
    """(token ids of the beam search on ``video`` with the checkpoint's own decoding defaults, those defaults,
    (caption, score))."""
    from rest_fast.data.clip import read_clip
    from rest_fast.data.loader import normalize_clips
    from rest_fast.eval.checkpoint import load_model, pixel_normalisation, resolve_checkpoint

    resolved = resolve_checkpoint(checkpoint)
    model = load_model(resolved, "cpu")
    d = resolved.defaults
    mean, std = pixel_normalisation(resolved)
    clip = normalize_clips(read_clip(video, d["num_frames"], size=d["image_size"])[None], mean, std)
    out = model.generate(clip, prompt=d["prompt"], num_beams=d["num_beams"], max_length=d["max_length"],
                         min_length=d["min_length"])
    return out.token_ids.tolist(), dict(d), (out.texts[0], float(out.scores[0]))


def test_export_captions_like_the_run_without_it(tmp_path, capsys):
    run = _make_run(tmp_path / "run")
    video = _video(tmp_path / "clip.mp4")
    run_tokens, run_defaults, (text, score) = _tokens(str(run), video)

    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0
    shutil.move(str(run), str(tmp_path / "moved"))  # no run folder any more: the export must stand alone
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "temporal_adapters.safetensors", "gar_config.json",
            "tokenizer.json", "preprocessor_config.json", "run_config.yaml", "README.md",
            "rest_fast_export.json"} <= names
    marker = json.loads((out / "rest_fast_export.json").read_text())
    assert set(marker["files"]) == names and marker["epoch"] == 2 and marker["defaults"] == run_defaults

    exp_tokens, exp_defaults, _ = _tokens(str(out), video)
    assert exp_defaults == run_defaults and exp_tokens == run_tokens
    capsys.readouterr()
    assert main(["caption", video, "--checkpoint", str(out), "--json", "--num-workers", "0"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["captions"] == [text] and got["scores"] == [pytest.approx(score, abs=1e-6)]

    from rest_fast.models import GARModel

    model = GARModel.from_pretrained(out)  # HF-style: adapters, frame count and tokenizer from the folder alone
    assert model.num_frames == 2 and len(model.temporal_adapters) == 2
    from transformers import BlipProcessor

    proc = BlipProcessor.from_pretrained(str(out))
    assert proc.image_processor.size["height"] == 32
    card = (out / "README.md").read_text()
    assert "library_name: rest_fast" in card and "| 2 | 2 | 30.0% | 50.0% | 90.0% |" in card
    assert "Self-training loss at epoch 2: 1.0000" in card and "blip: tiny" in card


def test_export_refuses_a_folder_it_did_not_write_and_replaces_its_own(tmp_path, capsys):
    run = _make_run(tmp_path / "run")
    capsys.readouterr()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["export", str(run), "--out", str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did not write (notes.txt)" in err[0]
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"] and (foreign / "notes.txt").read_text() == "mine"

    out = tmp_path / "exp"
    old = os.umask(0o027)
    try:
        assert main(["export", str(run), "--out", str(out)]) == 0
        assert main(["export", str(run / "checkpoints" / "epoch_0002"), "--out", str(out)]) == 0  # ours: replaced
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o640)}  # the umask, safetensors too
    (out / "extra.bin").write_bytes(b"x")  # a file the export did not write makes the folder foreign again
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "did not write (extra.bin)" in capsys.readouterr().err
    assert not list(tmp_path.glob(".exp.*")) and (out / "extra.bin").exists()
    assert main(["export", str(tmp_path / "foreign"), "--out", str(tmp_path / "x")]) == 2
    assert "neither a `rest-fast train` run" in capsys.readouterr().err and not (tmp_path / "x").exists()


class _NoNetwork:
    """Every socket connection and name lookup fails (and is recorded): nothing can reach the network."""

    def __init__(self, monkeypatch) -> None:
        self.tries: list[str] = []

        def refuse(*args, **kwargs):
            self.tries.append(repr(args[:2]))
            raise OSError("network access blocked by the test")

        monkeypatch.setattr(socket.socket, "connect", refuse)
        monkeypatch.setattr(socket.socket, "connect_ex", refuse)
        monkeypatch.setattr(socket, "getaddrinfo", refuse)
        monkeypatch.setattr(socket, "create_connection", refuse)


def test_push_to_hub_offline_is_one_line_and_keeps_the_export(tmp_path, monkeypatch, capsys):
    pytest.importorskip("huggingface_hub")
    run = _make_run(tmp_path / "run")
    capsys.readouterr()
    guard = _NoNetwork(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "exp"
    assert main(["export", str(run), "--out", str(out), "--push-to-hub", "someone/rest-demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rest-fast export: error: --push-to-hub someone/rest-demo: offline")
    assert guard.tries == [] and (out / "rest_fast_export.json").is_file()
    assert 'GARModel.from_pretrained("someone/rest-demo")' in (out / "README.md").read_text()
    # not flagged offline but unreachable: the hub client's error, in one line, still without any network
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    assert main(["export", str(run), "--out", str(out), "--push-to-hub", "someone/rest-demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--push-to-hub someone/rest-demo: upload failed" in err[0], err


@pytest.mark.slow
def test_export_of_a_trained_run_through_the_cli(tmp_path):
    """`rest-fast train` (tiny models) → `rest-fast export` → delete the run → `rest-fast caption --checkpoint DIR`
    in fresh processes: the same captions and scores as from the run."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}

    def cli(*args):
        p = subprocess.run([sys.executable, "-m", "rest_fast", *args], env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    run, out = tmp_path / "run", tmp_path / "export"
    cli("train", f"--out={run}", "demo_videos_per_class=2", "demo_frames=8", "num_frames=2", "epochs=2",
        "epochs_per_round=1", "batch_size=6", "num_beams=2", "max_length=8", "min_length=2", "num_neighbours=4",
        "progress=false", "blip=tiny", "clip=tiny", "clip_pretrained=none", "k=3")
    video = str(shutil.copy(next((run / "demo" / "clips").rglob("*.mp4")), tmp_path / "clip.mp4"))
    before = cli("caption", video, "--checkpoint", str(run), "--json", "--num-return", "2")
    cli("export", str(run), "--out", str(out))
    shutil.rmtree(run)
    after = cli("caption", video, "--checkpoint", str(out), "--json", "--num-return", "2")
    assert json.loads(after) == json.loads(before)
    card = (out / "README.md").read_text()
    assert "generated top-1" in card and "num_neighbours: 4" in card
