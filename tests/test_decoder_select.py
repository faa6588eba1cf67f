"""--decoder auto|dali|pyav: the selection logic and its reasons (DALI present or absent, CUDA present or
absent, all simulated on CPU), validation, the worker-count defaults, and which loader each choice builds."""

from __future__ import annotations

import pytest
import torch
import video_fixtures as vf

from rest_fast.data import select, workers
from rest_fast.data.select import choose_decoder, validate_decoder

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def _fake(monkeypatch, *, cuda: bool, dali: bool):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    status = (True, "nvidia-dali 9.9.9") if dali else (
        False, "nvidia-dali is not importable (ModuleNotFoundError: No module named 'nvidia.dali')")
    monkeypatch.setattr(select, "dali_status", lambda: status)


def test_validate_decoder():
    assert validate_decoder(" DALI ") == "dali"
    with pytest.raises(ValueError, match=r"^decoder must be one of auto, dali, pyav, nvjpeg; got 'nvdec'$"):
        validate_decoder("nvdec")


def test_auto_without_dali_falls_back_with_the_reason(monkeypatch):
    _fake(monkeypatch, cuda=True, dali=False)
    monkeypatch.setattr(select, "nvjpeg_status", lambda: (False, "torchvision is not importable (x)"))
    c = choose_decoder("auto", "cuda:0")
    assert c.name == "pyav" and c.device_id is None
    assert c.reason.startswith("auto: nvidia-dali is not importable (ModuleNotFoundError")
    assert "CPU path" in c.reason


def test_auto_without_cuda_falls_back_with_the_reason(monkeypatch):
    _fake(monkeypatch, cuda=False, dali=True)
    c = choose_decoder("auto", "cpu")
    assert (c.name, c.device_id) == ("pyav", None)
    assert c.reason == "auto: no CUDA device, so the CPU path (PyAV / CPU shard reader)"
    _fake(monkeypatch, cuda=True, dali=True)  # a CPU run on a GPU machine also stays on the CPU path
    assert choose_decoder("auto", "cpu").reason.startswith("auto: the run computes on cpu")


def test_auto_with_cuda_and_dali_picks_dali_on_the_ranks_gpu(monkeypatch):
    _fake(monkeypatch, cuda=True, dali=True)
    c = choose_decoder("auto", "cuda:3")
    assert (c.name, c.device_id) == ("dali", 3)
    assert c.reason == "auto: CUDA device cuda:3 and nvidia-dali 9.9.9 present (NVDEC / nvJPEG)"
    assert choose_decoder("auto", None).device_id == 0  # device "auto": the current CUDA device


def test_explicit_choices(monkeypatch):
    _fake(monkeypatch, cuda=True, dali=True)
    assert choose_decoder("pyav", "cuda:1").name == "pyav"
    assert choose_decoder("dali", "cuda:1") == ("dali", choose_decoder("dali", "cuda:1").reason, 1)
    _fake(monkeypatch, cuda=False, dali=True)
    c = choose_decoder("dali", "cpu")
    assert (c.name, c.device_id) == ("dali", None) and "CPU variant" in c.reason
    _fake(monkeypatch, cuda=True, dali=False)
    with pytest.raises(ValueError, match=r"--decoder dali: nvidia-dali is not importable.*pip install"):
        choose_decoder("dali", "cuda:0")


def test_config_validates_decoder_and_loader_fields():
    from rest_fast.run.config import TrainConfig

    cfg = TrainConfig()
    assert (cfg.decoder, cfg.num_workers, cfg.prefetch_factor, cfg.decode_timeout_s) == ("auto", -1, 2, 60.0)
    for bad, match in ((dict(decoder="gpu"), "decoder must be one of"), (dict(num_workers=-2), "num_workers"),
                       (dict(prefetch_factor=0), "prefetch_factor"), (dict(decode_timeout_s=-1.0), "decode_timeout_s")):
        with pytest.raises(ValueError, match=match):
            cfg.replace(**bad)


def test_cli_bad_decoder_one_line_exit_2(capsys, monkeypatch):
    from rest_fast.cli import main

    assert main(["train", "--decoder", "nvdec"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rest-fast train: error: decoder must be one of auto, dali, pyav, nvjpeg; got 'nvdec'"]
    monkeypatch.setattr(select, "dali_status", lambda: (False, "nvidia-dali is not importable (ModuleNotFoundError)"))
    assert main(["train", "--decoder", "dali", "--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rest-fast train: error: decoder=dali: nvidia-dali is not importable")
    assert main(["prepare", "--data", "x", "--out", "y", "--decoder", "dali"]) == 2
    assert "rest-fast prepare: error: --decoder dali" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["eval", "caption", "finetune", "prepare"])
def test_every_video_command_takes_decoder(cmd):
    from rest_fast.cli import build_parser

    required = {"eval": ["--checkpoint", "c"], "caption": ["v.mp4"], "finetune": ["--checkpoint", "c"],
                "prepare": ["--data", "d", "--out", "o"]}[cmd]
    args = build_parser().parse_args([cmd, *required, "--decoder", "pyav"])
    assert args.decoder == "pyav"
    assert build_parser().parse_args([cmd, *required]).decoder == "auto"


def test_info_says_which_decoder_and_why(monkeypatch):
    from rest_fast.info import collect

    _fake(monkeypatch, cuda=False, dali=True)
    info = collect()
    assert info["decoder (auto)"] == "pyav: auto: no CUDA device, so the CPU path (PyAV / CPU shard reader)"
    assert "per rank" in info["decoding workers (default)"]
    _fake(monkeypatch, cuda=True, dali=False)
    assert collect()["decoder (auto)"].startswith("nvjpeg: auto: nvidia-dali is not importable")  # torchvision here
    monkeypatch.setattr(select, "nvjpeg_status", lambda: (False, "torchvision is not importable (x)"))
    assert collect()["decoder (auto)"] == ("pyav: auto: nvidia-dali is not importable (ModuleNotFoundError: No "
                                           "module named 'nvidia.dali'), so the CPU path (PyAV / CPU shard reader)")


def test_worker_count_from_cpus_per_rank(monkeypatch):
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert workers.cpus_available() == 64
    assert workers.default_num_workers() == 7  # 64 CPUs / 8 ranks, one left for the rank itself
    assert workers.resolve_num_workers(-1) == 7 and workers.resolve_num_workers(None) == 7
    assert workers.resolve_num_workers(3) == 3
    assert workers.resolve_num_workers(500) == 64  # never more than the machine has
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert workers.default_num_workers() == 0  # one CPU: decode in the main process


def test_make_clip_loader_builds_the_chosen_loader(tmp_path):
    from rest_fast.data import PyAVClipLoader, VideoIndex
    from rest_fast.data.shards import make_clip_loader

    idx = VideoIndex.from_paths([str(vf.write_index_clip(tmp_path / "a.webm", 6, "vp9", width=32, height=24))])
    kw = dict(batch_size=1, mean=MEAN, std=STD, num_frames=2, size=16, num_workers=0, stream=False,
              persistent_workers=True, prefetch=2, decode_timeout_s=5.0)
    assert type(make_clip_loader(idx, decoder="pyav", **kw)) is PyAVClipLoader
    with pytest.raises(ValueError, match="resolve 'auto'"):
        make_clip_loader(idx, decoder="auto", **kw)
    pytest.importorskip("nvidia.dali")
    from rest_fast.data.dali import DALIClipLoader

    d = make_clip_loader(idx, decoder="dali", **kw)
    assert type(d) is DALIClipLoader and d.decoder_device == "cpu" and d.device_id is None
    (b,) = list(d)
    assert b.clips.shape == (1, 2, 3, 16, 16)


def test_trainer_inputs_keep_one_loader_per_pass(tmp_path, capsys):
    """Inputs builds each pass's loader once (workers forked once, not per epoch or caption round), logs the
    decoder and why, and absorbs a kept loader's growing bad-files report without double counting."""
    from types import SimpleNamespace

    from rest_fast.data import VideoIndex
    from rest_fast.run.config import TrainConfig
    from rest_fast.train.distributed import DistEnv
    from rest_fast.train.inputs import Inputs

    paths = [str(vf.write_index_clip(tmp_path / f"v{i}.webm", 6 + i, "vp9", width=32, height=24)) for i in range(3)]
    (tmp_path / "bad.webm").write_text("garbage")
    index = VideoIndex.from_paths([*paths, str(tmp_path / "bad.webm")], [0, 1, 0, 1])
    cfg = TrainConfig(data="x", num_workers=1, num_frames=2, image_size=16, batch_size=2, eval_batch_size=2,
                      decoder="pyav", bad_files_threshold=0.5)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    clip = SimpleNamespace(mean=MEAN, std=STD, image_size=(16, 16))
    inputs = Inputs(index, cfg, env, blip_source=str(tmp_path), clip=clip)
    assert "decoder: pyav (requested (--decoder pyav)" in capsys.readouterr().out
    for epoch in range(2):
        assert sum(len(i) for i, _ in inputs.train_batches(epoch)) == 4
        if epoch == 0:
            loader = inputs._loaders["train"]
            pids = [w.pid for w in loader._loader._iterator._workers]
    assert inputs._loaders["train"] is loader and [w.pid for w in loader._loader._iterator._workers] == pids
    for _ in range(2):
        assert sum(len(i) for i, _ in inputs.eval_batches("blip")) == 4
    rows = inputs.bad_files.rows()
    assert len(rows) == 1 and rows[0][0].endswith("bad.webm")
    hits = loader.bad_files.rows()[0][2] + inputs._loaders["blip"].bad_files.rows()[0][2]
    assert hits >= 4 and rows[0][2] == hits  # hit in each of 2 epochs and 2 passes, each hit counted once


@pytest.mark.parametrize("decoder", ["pyav", "dali"])
def test_caption_videos_reports_unreadable_videos_with_either_decoder(tmp_path, decoder):
    """Captioning drops (does not replace) unreadable videos with both decoders: the same rows are captioned
    and the same files reported; the model sees normalised [B, T, 3, S, S] clips."""
    from types import SimpleNamespace

    from rest_fast.eval.run import caption_videos

    if decoder == "dali":
        pytest.importorskip("nvidia.dali")
    paths = [str(vf.write_index_clip(tmp_path / f"v{i}.webm", 6 + i, "vp9", width=32, height=24)) for i in range(3)]
    (tmp_path / "bad.webm").write_text("garbage")
    paths.insert(1, str(tmp_path / "bad.webm"))
    seen = []

    def generate(clips, **kw):
        seen.append(tuple(clips.shape))
        n = clips.shape[0] * kw["num_return_sequences"]
        return SimpleNamespace(texts=[f"clip {float(clips[i // kw['num_return_sequences']].mean()):.3f}"
                                      for i in range(n)], scores=torch.zeros(n))

    results, bad = caption_videos(SimpleNamespace(generate=generate), paths, num_frames=2, size=16, mean=MEAN,
                                  std=STD, batch_size=2, num_workers=0, progress=False, decoder=decoder)
    assert [r is None for r in results] == [False, True, False, False]
    assert [p for p, _ in bad] == [paths[1]]
    assert all(s[1:] == (2, 3, 16, 16) for s in seen) and sum(s[0] for s in seen) == 3
