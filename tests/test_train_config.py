"""TrainConfig: defaults, precedence (defaults < demo preset < YAML < overrides), coercion, errors, --help."""

from __future__ import annotations

import pytest

from rest_fast.run.config import (
    DEMO_PRESET,
    TrainConfig,
    apply_overrides,
    help_text,
    identity_differences,
    parse_key_values,
    resolve_config,
)


def test_paper_defaults():
    c = TrainConfig(data="x.txt")
    assert (c.num_frames, c.image_size, c.num_neighbours, c.k, c.epochs_per_round, c.epochs) == (8, 224, 2000, 3, 10, 60)
    assert (c.lr, c.lr_min, c.weight_decay, c.betas, c.batch_size, c.label_smoothing) == (2e-5, 2e-8, 1e-3, [0.9, 0.98], 64, 0.2)
    assert c.prompts == ["a video of", "a person is", "someone is"]
    assert c.num_rounds == 6 and c.round_end_epoch(1) == 10 and c.round_end_epoch(6) == 60


def test_rounds_when_epochs_not_multiple_of_r():
    c = TrainConfig(data="x", epochs=25, epochs_per_round=10)
    assert c.num_rounds == 3 and [c.round_end_epoch(r) for r in (1, 2, 3)] == [10, 20, 25]


def test_precedence_demo_yaml_overrides(tmp_path):
    demo = resolve_config()
    assert demo.is_demo and demo.blip == DEMO_PRESET["blip"] and demo.num_frames == DEMO_PRESET["num_frames"]
    y = tmp_path / "c.yaml"
    y.write_text("num_frames: 6\nepochs: 9\nprompts: [a video of]\n")
    c = resolve_config(yaml_file=y, overrides={"epochs": "12", "num-neighbours": "5"})
    assert (c.num_frames, c.epochs, c.num_neighbours, c.prompts) == (6, 12, 5, ["a video of"])
    # data given anywhere: no demo preset
    (tmp_path / "list.txt").write_text("a.mp4\n")  # resolve time checks that data exists
    real = resolve_config(overrides={"data": str(tmp_path / "list.txt")})
    assert real.blip == TrainConfig().blip and real.num_frames == 8


def test_coercion_and_errors():
    c = apply_overrides(TrainConfig(), {"augment": "false", "lr": "1e-4", "betas": "[0.8, 0.9]", "data": "none",
                                       "prompts": "someone is", "clip_pretrained": "null"})
    assert c.augment is False and c.lr == 1e-4 and c.betas == [0.8, 0.9] and c.data is None
    assert c.prompts == ["someone is"] and c.clip_pretrained is None
    with pytest.raises(ValueError, match="unknown config key 'epoch'"):
        apply_overrides(TrainConfig(), {"epoch": 3})
    with pytest.raises(ValueError, match="k: expected an integer"):
        apply_overrides(TrainConfig(), {"k": "1.5"})
    with pytest.raises(ValueError, match="k must be >= 1"):
        TrainConfig(k=0)
    with pytest.raises(ValueError, match="lr_min"):
        TrainConfig(lr=1e-5, lr_min=1e-3)
    with pytest.raises(ValueError, match="adapter_layers"):
        TrainConfig(adapter_layers="a,b")
    assert TrainConfig(adapter_layers="0, 3").adapter_layers_value() == [0, 3]
    assert TrainConfig(adapter_layers="none").adapter_layers_value() == []
    with pytest.raises(ValueError, match="expected key=value"):
        parse_key_values(["epochs"])
    assert parse_key_values(["train_prompt=a b=c"]) == {"train_prompt": "a b=c"}


def test_yaml_round_trip_and_identity():
    c = resolve_config(overrides={"epochs": 7})
    import yaml

    back = TrainConfig(**yaml.safe_load(c.to_yaml()))
    assert back == c
    assert identity_differences(c, back.replace(num_workers=3, epochs=20, out="elsewhere")) == []
    diffs = identity_differences(c, back.replace(k=2))
    assert len(diffs) == 1 and diffs[0].startswith("k:")


def test_help_lists_every_field():
    text = help_text()
    for f in TrainConfig.__dataclass_fields__:
        assert f"  {f}=" in text


def test_cli_help_and_print_config(capsys):
    from rest_fast.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--num-neighbours" in out and "H: nearest videos" in out and "key=value" in out
    assert main(["train", "--print-config", "epochs=3", "--num-frames", "2", "--no-augment", "k=2"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "num_frames: 2" in out and "augment: false" in out and "k: 2" in out
    assert main(["train", "--print-config", "k=x"]) == 2
    assert "k: expected an integer" in capsys.readouterr().err
