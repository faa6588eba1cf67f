"""Every ordinary mistake on the command line: one line on stderr naming the problem, exit code 2, no traceback,
and no half-made run folder (issue 14, item 14)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rest_fast.cli import main


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _two_clips(root: Path) -> Path:
    from eval_fixtures import write_clip

    root.mkdir(parents=True, exist_ok=True)
    for j, a in enumerate(("growing", "spinning")):
        write_clip(root / f"{a}_{j}.mp4", a, seed=j, frames=4, size=32)
    return root


def _setup(case: str, tmp: Path) -> list[str]:
    """The argv of one bad-input case (files it needs are made under ``tmp``)."""
    out = str(tmp / "run")
    if case == "bad_yaml":
        (tmp / "c.yaml").write_text("epochs: [1, 2\nk: 3\n")
        return ["train", "--config", str(tmp / "c.yaml"), "--out", out]
    if case == "yaml_not_mapping":
        (tmp / "c.yaml").write_text("- 1\n- 2\n")
        return ["train", "--config", str(tmp / "c.yaml"), "--out", out]
    if case == "config_is_dir":
        return ["train", "--config", str(tmp), "--out", out]
    if case == "config_missing":
        return ["train", "--config", str(tmp / "nope.yaml"), "--out", out]
    if case == "data_missing":
        return ["train", "--data", str(tmp / "nope"), "--out", out]
    if case == "data_empty":
        (tmp / "empty").mkdir()
        return ["train", "--data", str(tmp / "empty"), "--out", out]
    if case == "data_empty_list":
        (tmp / "list.txt").write_text("# nothing\n")
        return ["train", "--data", str(tmp / "list.txt"), "--out", out]
    if case == "out_is_file":
        (tmp / "f").write_text("x")
        return ["train", "--out", str(tmp / "f")]
    if case == "adapter_layers_syntax":
        return ["train", "--out", out, "adapter_layers=0,x"]
    if case == "adapter_layers_negative":
        return ["train", "--out", out, "adapter_layers=-1"]
    if case == "adapter_layers_out_of_range":  # known only once the model is loaded (tiny BLIP: 2 layers)
        return ["train", "--out", out, "adapter_layers=0,99", "demo_videos_per_class=1", "demo_frames=4",
                "demo_resolution=16", "progress=false"]
    if case.startswith("nonfinite_"):
        key, value = case[len("nonfinite_"):].rsplit("_", 1)
        return ["train", "--out", out, f"{key}={value}"]
    if case == "unknown_key":
        return ["train", "--out", out, "epoch=3"]
    if case == "bad_int":
        return ["train", "--out", out, "epochs=three"]
    if case == "old_config_unknown_key":
        run = tmp / "old"
        run.mkdir()
        (run / "config.yaml").write_text("epochs: 6\nsome_removed_key: 1\n")
        (run / "state.json").write_text('{"epoch": 1, "round": 0, "checkpoint": null}')
        return ["train", "--out", str(run), "--resume", "auto"]
    if case == "offline_hub":
        data = _two_clips(tmp / "videos")
        return ["train", "--data", str(data), "--out", out, "--blip", "Salesforce/not-in-cache",
                "--clip", "tiny", "clip_pretrained=none", "progress=false", "num_workers=0"]
    if case.startswith("prepare_"):
        data = tmp / "videos"
        data.mkdir(exist_ok=True)
        base = ["prepare", "--data", str(data), "--out", str(tmp / "shards"), "--no-progress"]
        flag = case[len("prepare_"):]
        extra = {"shard_size": ["--shard-size", "banana"], "shard_size_zero": ["--shard-size", "0"],
                 "frames_zero": ["--frames", "0"], "frames_text": ["--frames", "abc"],
                 "quality": ["--quality", "200"], "quality_zero": ["--quality", "0"],
                 "short_side": ["--short-side", "-5"], "workers": ["--workers", "-1"]}.get(flag)
        if extra is not None:
            return base + extra
        if flag == "data_missing":
            return ["prepare", "--data", str(tmp / "nope"), "--out", str(tmp / "shards")]
        if flag == "data_empty":
            return base
        if flag in ("data_root_missing", "list_all_missing"):
            (tmp / "list.txt").write_text("a.mp4\nb.mp4\n")
            root = tmp / ("nope" if flag == "data_root_missing" else "")
            return ["prepare", "--data", str(tmp / "list.txt"), "--data-root", str(root), "--out",
                    str(tmp / "shards")]
        if flag == "out_is_file":
            _two_clips(data)
            (tmp / "f").write_text("x")
            return ["prepare", "--data", str(data), "--out", str(tmp / "f"), "--no-progress"]
    if case == "eval_offline_hub":
        data = _two_clips(tmp / "set" / "growing")
        return ["eval", "--checkpoint", "Salesforce/not-in-cache", "--data", str(data.parent), "--clip", "tiny",
                "--device", "cpu", "--no-progress"]
    if case == "prepare_settings_changed":
        data = _two_clips(tmp / "videos")
        assert main(["prepare", "--data", str(data), "--out", str(tmp / "p"), "--frames", "4", "--workers", "0",
                     "--no-progress"]) == 0
        return ["prepare", "--data", str(data), "--out", str(tmp / "p"), "--frames", "8", "--workers", "0",
                "--no-progress"]
    if case == "eval_threshold_bad":
        return ["eval", "--checkpoint", str(tmp), "--data", str(tmp), "--max-unreadable", "2"]
    if case == "unknown_flag":
        return ["prepare", "--data", "x", "--out", "y", "--framez", "3"]
    raise AssertionError(case)


CASES = {
    "bad_yaml": "not valid YAML",
    "yaml_not_mapping": "mapping",
    "config_is_dir": "is a directory",
    "config_missing": "does not exist",
    "data_missing": "does not exist",
    "data_empty": "no video",
    "data_empty_list": "no video",
    "out_is_file": "not a folder",
    "adapter_layers_syntax": "adapter_layers",
    "adapter_layers_negative": "adapter_layers",
    "adapter_layers_out_of_range": "out of range",
    "nonfinite_lr_nan": "lr",
    "nonfinite_lr_inf": "lr",
    "nonfinite_grad_clip_nan": "grad_clip",
    "nonfinite_grad_clip_inf": "grad_clip",
    "nonfinite_weight_decay_nan": "weight_decay",
    "nonfinite_weight_decay_inf": "weight_decay",
    "nonfinite_lr_min_nan": "lr_min",
    "unknown_key": "unknown config key",
    "bad_int": "expected an integer",
    "old_config_unknown_key": "some_removed_key",
    "offline_hub": "pass a local folder",
    "prepare_shard_size": "--shard-size",
    "prepare_shard_size_zero": "--shard-size",
    "prepare_frames_zero": "--frames",
    "prepare_frames_text": "--frames",
    "prepare_quality": "--quality",
    "prepare_quality_zero": "--quality",
    "prepare_short_side": "--short-side",
    "prepare_workers": "--workers",
    "prepare_data_missing": "does not exist",
    "prepare_data_empty": "no video",
    "prepare_data_root_missing": "--data-root",
    "prepare_list_all_missing": "none of the 2 videos",
    "prepare_out_is_file": "not a folder",
    "eval_threshold_bad": "--max-unreadable",
    "prepare_settings_changed": "other settings",
    "eval_offline_hub": "offline, pass --checkpoint with a run directory",
    "unknown_flag": "--framez",
}


LOADS_MODELS = {"adapter_layers_out_of_range", "offline_hub", "eval_offline_hub"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2(case, tmp_path, capsys, monkeypatch):
    if case in ("offline_hub", "eval_offline_hub"):
        from rest_fast.models import GARModel

        def offline(*a, **k):  # what transformers raises without network and without a cached copy
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find "
                          "them in the cached files.\nCheck your internet connection.")

        monkeypatch.setattr(GARModel, "from_pretrained", classmethod(offline))
    argv = _setup(case, tmp_path)
    before = set(tmp_path.rglob("*"))
    rc = main(argv)
    err = capsys.readouterr().err
    # the decoder choice is an information line a command prints once it starts working (not an error)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(f"rest-fast {argv[0]}: decoder ")]
    assert rc == 2, err
    assert "Traceback" not in err
    if case in LOADS_MODELS:  # transformers' own progress bars and warnings may come before the error line
        lines = [ln for ln in lines if "error" in ln.lower()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"rest-fast {argv[0]}: error: "), lines[0]
    assert CASES[case] in lines[0], lines[0]
    # a failed start leaves no half-made run folder behind (and touches nothing that was there)
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "shards").exists()
    assert before <= set(tmp_path.rglob("*"))


def test_nonfinite_values_rejected_by_validate_config():
    from rest_fast.run.config import TrainConfig, validate_config

    cfg = TrainConfig()
    for key in ("lr", "lr_min", "grad_clip", "weight_decay", "label_smoothing", "bad_files_threshold"):
        for v in (math.nan, math.inf):
            object.__setattr__(cfg, key, v)
            with pytest.raises(ValueError, match=key):
                validate_config(cfg)
            cfg = TrainConfig()
    object.__setattr__(cfg, "betas", [0.9, math.nan])
    with pytest.raises(ValueError, match="betas"):
        validate_config(cfg)


def test_debug_env_keeps_the_traceback(tmp_path, monkeypatch):
    from rest_fast.errors import UserError

    monkeypatch.setenv("REST_FAST_DEBUG", "1")
    with pytest.raises(UserError):
        main(["prepare", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--quality", "200"])


def test_too_many_bad_files_is_one_line(monkeypatch, capsys):
    """The loaders' bad-files threshold is a data problem: one line with the count, exit 2."""
    import rest_fast.cli as cli
    from rest_fast.data.bad_files import TooManyBadFiles

    def boom(args):
        raise TooManyBadFiles("7 of 20 files are bad (> max_bad_fraction=0.05); see bad_files.tsv")

    monkeypatch.setattr(cli, "_cmd_info", boom)
    assert main(["info"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rest-fast info: error: 7 of 20 files are bad (> max_bad_fraction=0.05); see bad_files.tsv"]


def test_a_bug_keeps_its_traceback(monkeypatch):
    import rest_fast.cli as cli

    def bug(args):
        raise KeyError("internal")

    monkeypatch.setattr(cli, "_cmd_info", bug)
    with pytest.raises(KeyError):
        main(["info"])
