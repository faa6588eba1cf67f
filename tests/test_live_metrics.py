"""Live metrics (issue 21 item 6): clips/s and data-wait per logged step, TensorBoard and W&B sinks.

The run test trains the small tiny-model demo (as tests/test_train_e2e.py) with ``log_to=[tensorboard, wandb]``
(W&B in offline mode, when it is installed) and reads the event files back with TensorBoard's own
``EventAccumulator``: the tags are there and their values are the ``metrics.jsonl`` records'.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from rest_fast.run.rundir import RunDir, read_jsonl
from rest_fast.run.sinks import MetricSink, MetricsLog, caption_rows, check_available, parse_log_to, scalars
from rest_fast.train.throughput import LoaderMeter

SMALL = ["demo_videos_per_class=2", "demo_frames=8", "num_frames=2", "epochs=2", "epochs_per_round=1",
         "batch_size=6", "num_beams=1", "max_length=8", "min_length=2", "prompts=[a video of, someone is]",
         "num_neighbours=4", "progress=false", "blip=tiny", "clip=tiny", "clip_pretrained=none", "k=3",
         "log_every=1"]
STEP_KEYS = {"loss", "lr", "grad_norm", "clips_per_second", "data_wait_fraction"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_loader_meter_times_waits_and_counts_clips():
    clock = FakeClock()

    def batches():
        for n, wait in ((4, 0.5), (4, 0.0), (2, 1.5)):
            clock.now += wait  # the time blocked in next()
            yield list(range(n)), None

    meter = LoaderMeter(batches(), clock=clock)
    it = iter(meter)
    next(it)
    clock.now += 1.5  # the step's compute
    next(it)
    clock.now += 2.0
    first = meter.window()  # 8 clips in 0.5 + 1.5 + 0 + 2.0 = 4 s, 0.5 s of it waiting
    assert first == {"clips_per_second": 2.0, "data_wait_fraction": 0.125}
    next(it)
    clock.now += 0.5
    assert meter.window() == {"clips_per_second": 1.0, "data_wait_fraction": 0.75}  # 2 clips in 2 s, 1.5 waiting
    assert list(it) == []
    assert meter.total() == {"clips_per_second": round(10 / 6, 3), "data_wait_fraction": round(2 / 6, 4)}
    import torch

    from rest_fast.train.throughput import device_memory_gb

    assert device_memory_gb(torch.device("cpu")) == {}  # GPU memory is reported on CUDA only


def test_log_to_names_and_missing_package(tmp_path, monkeypatch, capsys):
    assert parse_log_to(["tensorboard,wandb", "TensorBoard"]) == ["tensorboard", "wandb"]
    assert parse_log_to([]) == [] and parse_log_to(None) == []
    from rest_fast.cli import main

    run = tmp_path / "run"
    assert main(["train", f"--out={run}", *SMALL, "log_to=tensorbored"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rest-fast train: error: log_to: unknown sink 'tensorbored'; known: tensorboard, wandb"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'rest_fast\[wandb\]'"):
        check_available(["wandb"])
    assert main(["train", f"--out={run}", *SMALL, "log_to=[wandb]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wandb needs the 'wandb' package" in err[0]
    assert not run.exists()  # refused before anything was written


def test_scalars_map_each_record_kind():
    assert scalars({"kind": "step", "step": 7, "epoch": 1, "round": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": None,
                    "clips_per_second": 10, "time": 5.0}) == \
        ("step", 7, {"train/loss": 2.5, "train/lr": 1e-3, "train/clips_per_second": 10.0})
    assert scalars({"kind": "round", "round": 2, "epoch": 4, "tam_top1": 0.5, "seconds": 1.0}) == \
        ("round", 2, {"round/tam_top1": 0.5, "round/seconds": 1.0})
    assert scalars({"kind": "start", "world_size": 1}) is None
    rows = caption_rows([{"video": "a.mp4", "label": "x", "captions": ["c1", "c2"], "generated": "g"},
                         {"video": "b.mp4", "captions": []}], limit=5)
    assert rows == [["a.mp4", "x", "c1 | c2", "g"], ["b.mp4", "", "", ""]]


class _Broken(MetricSink):
    name = "broken"

    def log(self, record: dict) -> None:
        raise OSError("disk full")


def test_a_failing_dashboard_is_dropped_and_metrics_jsonl_kept(tmp_path, capsys):
    run = RunDir(tmp_path)
    log = MetricsLog.open(run, [])
    log.sinks.append(_Broken())
    with pytest.warns(RuntimeWarning, match="broken failed .*disk full"):
        log.write({"kind": "step", "step": 1, "loss": 1.0})
    log.write({"kind": "step", "step": 2, "loss": 0.5})
    assert log.names == ["metrics.jsonl"]
    assert [r["step"] for r in read_jsonl(run.metrics_path)] == [1, 2]
    assert capsys.readouterr().out.count("no longer logging to it") == 1


class _FakeRun:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def define_metric(self, name, **kw):
        self.calls.append(("define_metric", name, kw))

    def log(self, data):
        self.calls.append(("log", data))

    def finish(self):
        self.calls.append(("finish",))


def _fake_wandb(calls: list) -> types.ModuleType:
    mod = types.ModuleType("wandb")

    def init(**kw):
        calls.append(("init", kw))
        return _FakeRun(calls)

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    mod.init, mod.Table = init, Table
    return mod


def test_wandb_sink_with_a_fake_module(tmp_path, monkeypatch):
    """The W&B sink's calls, whatever wandb version is (or is not) installed; the same run id on resume."""
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    run = RunDir(tmp_path / "run")
    log = MetricsLog.open(run, ["wandb"], config={"lr": 1e-3})
    assert log.names == ["metrics.jsonl", "wandb"]
    log.write({"kind": "start", "world_size": 1})
    log.write({"kind": "step", "step": 3, "epoch": 1, "round": 1, "loss": 2.0, "clips_per_second": 5.0,
               "data_wait_fraction": 0.25})
    log.write({"kind": "round", "round": 1, "epoch": 1, "tam_top1": 0.5})
    log.captions(1, [{"video": "v.mp4", "label": "jump", "captions": ["a jump"], "generated": "a man jumps"}])
    log.close()
    init = calls[0][1]
    assert calls[0][0] == "init" and init["dir"] == str(run.root) and init["config"] == {"lr": 1e-3}
    assert init["resume"] == "allow" and init["id"] == json.loads((run.root / "wandb_run.json").read_text())["id"]
    assert ("define_metric", "train/*", {"step_metric": "train/step"}) in calls
    logs = [c[1] for c in calls if c[0] == "log"]
    assert logs[0] == {"train/step": 3, "train/loss": 2.0, "train/clips_per_second": 5.0,
                       "train/data_wait_fraction": 0.25}
    assert logs[1] == {"round/round": 1, "round/tam_top1": 0.5}
    table = logs[2]["round/captions"]
    assert table.columns == ["video", "label", "pseudo_captions", "generated"]
    assert table.data == [["v.mp4", "jump", "a jump", "a man jumps"]]
    assert calls[-1] == ("finish",)
    calls.clear()
    MetricsLog.open(run, ["wandb"]).close()  # a resumed run continues the same W&B run
    assert calls[0][1]["id"] == init["id"]


def test_training_feeds_metrics_jsonl_tensorboard_and_wandb(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rest_fast.cli import main

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    sinks = ["tensorboard"]
    if importlib.util.find_spec("wandb") is not None:
        sinks.append("wandb")
        for key, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_DIR", str(tmp_path)),
                           ("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config")),
                           ("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))):
            monkeypatch.setenv(key, value)
    run = tmp_path / "run"
    # one epoch (2 logged steps) between round 0 and a final caption round: every record kind, kept short
    assert main(["train", f"--out={run}", *SMALL, "epochs=1", "final_caption_round=true",
                 f"log_to=[{', '.join(sinks)}]"]) == 0
    out = capsys.readouterr().out

    records = read_jsonl(run / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(steps) == 2 and len(epochs) == 1  # 12 clips / batch 6 = 2 steps, each logged
    for r in steps:
        assert STEP_KEYS <= set(r), r
        assert r["clips_per_second"] > 0 and 0 <= r["data_wait_fraction"] <= 1 and r["grad_norm"] > 0
    for r in epochs:
        assert r["clips_per_second"] > 0 and 0 <= r["data_wait_fraction"] <= 1
    lines = [x for x in out.splitlines() if x.startswith("epoch ")]
    assert len(lines) == 1 and all("clips/s per GPU, data wait " in x for x in lines), lines

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"train/{k}" for k in STEP_KEYS} <= tags
    assert {"epoch/loss", "epoch/clips_per_second", "epoch/data_wait_fraction", "round/tam_top1",
            "round/tam_pseudo_top1", "round/mean_score"} <= tags
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    rounds = [r for r in records if r["kind"] == "round"]
    assert [(e.step, e.value) for e in acc.Scalars("round/tam_top1")] == \
        [(r["round"], pytest.approx(r["tam_top1"], rel=1e-6)) for r in rounds if "tam_top1" in r]
    text = [t for t in acc.Tags()["tensors"] if t.startswith("captions")]
    assert text, acc.Tags()["tensors"]
    table = acc.Tensors(text[0])[-1].tensor_proto.string_val[0].decode()
    first_video = json.loads((run / "captions" / "round_01.jsonl").read_text().splitlines()[0])["video"]
    assert "| video | label | pseudo_captions | generated |" in table and first_video in table

    if "wandb" in sinks:
        (folder,) = list((run / "wandb").glob("offline-run-*"))
        data = next(folder.glob("run-*.wandb")).read_bytes()
        assert all(tag.encode() in data for tag in ("train/loss", "train/data_wait_fraction", "round/tam_top1"))
        assert list(folder.glob("files/media/table/**/captions_*.table.json"))


def test_dev_extra_declares_tensorboard():
    import tomllib

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = meta["project"]["optional-dependencies"]
    assert any(r.startswith("tensorboard") for r in extras["tensorboard"])
    assert any(r.startswith("wandb") for r in extras["wandb"])
    assert "rest_fast[tensorboard]" in extras["dev"]


def test_nothing_is_imported_unless_asked(tmp_path):
    """Without ``log_to`` neither dashboard package is imported (a fresh process: other tests import them)."""
    import subprocess

    code = ("import sys; from rest_fast.run.rundir import RunDir; from rest_fast.run.sinks import MetricsLog; "
            "import rest_fast.train.loop; "
            f"log = MetricsLog.open(RunDir({str(tmp_path)!r}), []); log.write({{'kind': 'step', 'step': 1}}); "
            "log.close(); print(sorted(m for m in ('tensorboard', 'wandb', 'torch.utils.tensorboard') "
            "if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"
