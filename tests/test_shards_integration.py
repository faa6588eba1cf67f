"""A prepared directory wherever videos are accepted: `rest-fast train --data DIR` and `rest-fast eval --data DIR`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from eval_fixtures import FAST, make_tiny_gar, write_clip  # noqa: E402

from rest_fast.data.shards import PreparedIndex, ShardClipLoader, prepare  # noqa: E402


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the models use the ops' torch references here


def test_eval_reads_a_prepared_directory(tmp_path):
    from rest_fast.cli import main
    from rest_fast.eval.run import _data_set

    vids = tmp_path / "videos"
    write_clip(vids / "growing" / "g1.mp4", "growing", 1)
    write_clip(vids / "spinning" / "s1.mp4", "spinning", 2)
    write_clip(vids / "spinning" / "s2.mp4", "spinning", 3)
    (vids / "spinning" / "broken.mp4").write_text("not a video")
    prep = tmp_path / "prep"
    prepare(vids, prep, frames=4, short_side=32, workers=0, progress=False)
    s = _data_set(str(prep), None, None)
    assert s.class_names == ["growing", "spinning"] and [y for _, y in s.videos] == [0, 1, 1]
    assert s.rel == ["growing/g1.mp4", "spinning/s1.mp4", "spinning/s2.mp4"]
    assert s.missing == ["spinning/broken.mp4"]
    gar = make_tiny_gar(tmp_path / "gar")
    out = tmp_path / "out"
    assert main(["eval", "--data", str(prep), "--checkpoint", str(gar), "--clip", "tiny", "--out", str(out),
                 "--num-beams", "1", "--max-length", "6", *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    (row,) = res["sets"]
    assert (row["n"], row["missing"], row["num_classes"]) == (3, 1, 2)


def test_train_reads_a_prepared_directory(tmp_path, monkeypatch):
    from rest_fast.cli import main
    from rest_fast.train import inputs
    from rest_fast.train.demo import ACTIONS, synthesize_dataset

    root = synthesize_dataset(tmp_path / "clips", videos_per_class=1, frames=8, size=32, actions=ACTIONS[:4])
    (root / ACTIONS[0] / "broken.mp4").write_bytes(b"this is not a video")
    prep = tmp_path / "prep"
    prepare(root, prep, frames=8, short_side=32, workers=0, progress=False)
    index = inputs.build_index(str(prep), None)
    assert isinstance(index, PreparedIndex) and len(index) == 4 and len(index.missing) == 1
    made = []
    real = ShardClipLoader.__init__

    def spy(self, *a, **k):
        made.append(k.get("train"))
        real(self, *a, **k)

    monkeypatch.setattr(ShardClipLoader, "__init__", spy)
    run = tmp_path / "run"
    args = [f"--data={prep}", "--blip=tiny", "--clip=tiny", "clip_pretrained=none", "image_size=32",
            "num_frames=2", "epochs=1", "epochs_per_round=1", "batch_size=4", "num_beams=1", "max_length=8",
            "min_length=2", "prompts=[a video of]", "num_neighbours=2", "num_workers=0", "threads=1",
            "progress=false", "eval_batch_size=8", "bad_files_threshold=0.25"]
    assert main(["train", f"--out={run}", *args]) == 0
    assert made and True in made and False in made  # both eval and training passes read the shards
    tsv = (run / "bad_files.tsv").read_text()
    assert "broken.mp4" in tsv and "cannot open" in tsv and "missing file" not in tsv  # prepare's reason
    assert json.loads((run / "state.json").read_text())["epoch"] == 1
