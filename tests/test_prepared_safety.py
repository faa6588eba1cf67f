"""Issue 14 on prepared folders and inputs: `prepare --out` never writes into or deletes from a folder it did not
make, a planted index cannot point outside its folder, files follow the umask; `finetune --data` reads a prepared
folder's shards (the source videos may be gone); `--clip` with a local HF folder works with the default config."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from rest_fast.data.shards import PreparedIndex, prepare


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """3 labelled classes x 2 synthetic clips."""
    from eval_fixtures import write_clip

    root = tmp_path_factory.mktemp("src") / "labelled"
    for a in ("growing", "moving_left", "spinning"):
        for j in range(2):
            write_clip(root / a / f"{a}_{j}.mp4", a, seed=10 * j + len(a))
    return root


def _prepare(src, out, **kw):
    return prepare(src, out, frames=4, short_side=32, workers=0, progress=False, **kw)


# ---------------------------------------------------------------------------------------------- item 10
def test_prepare_refuses_a_foreign_folder_and_deletes_nothing(clips, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"someone else's shard")
    (out / "upload.tmp").write_bytes(b"half a download")
    with pytest.raises(ValueError, match="not a `rest-fast prepare` output"):
        _prepare(clips, out)
    assert sorted(os.listdir(out)) == ["shard-000000.tar", "upload.tmp"]
    assert (out / "shard-000000.tar").read_bytes() == b"someone else's shard"
    (out / "x").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        _prepare(clips, out / "x")


def test_prepare_resume_deletes_only_its_own_leftovers(clips, tmp_path):
    out = tmp_path / "out"
    _prepare(clips, out, max_videos=2, shard_size=1)  # stops early: a partial, resumable folder of ours
    (out / "notes.tmp").write_text("mine")  # a user's file in our folder: kept
    (out / ".shard-000002.tar.tmp").write_bytes(b"torn")  # what a kill mid-shard leaves: removed
    res = _prepare(clips, out, shard_size=1)
    assert res.num_videos == 6
    assert (out / "notes.tmp").read_text() == "mine" and not (out / ".shard-000002.tar.tmp").exists()
    # a shard the manifest cannot explain (not the one a kill can leave) is never deleted or overwritten
    part = tmp_path / "part"
    _prepare(clips, part, max_videos=1, shard_size=1)
    (part / "shard-000005.tar").write_bytes(b"foreign")
    with pytest.raises(ValueError, match="shard-000005.tar"):
        _prepare(clips, part, shard_size=1)
    assert (part / "shard-000005.tar").read_bytes() == b"foreign"


# ---------------------------------------------------------------------------------------------- item 11
def test_index_shard_names_stay_inside_the_folder(clips, tmp_path):
    out = tmp_path / "out"
    _prepare(clips, out)
    PreparedIndex.load(out)  # as written: fine
    lines = (out / "index.jsonl").read_text().splitlines()
    for bad in ("../elsewhere/shard-000000.tar", "/etc/shard.tar"):
        e = json.loads(lines[0])
        e["shard"] = bad
        (out / "index.jsonl").write_text("\n".join([json.dumps(e), *lines[1:]]) + "\n")
        with pytest.raises(ValueError, match="not a file name inside"):
            PreparedIndex.load(out)


# ---------------------------------------------------------------------------------------------- item 12
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_prepared_files_follow_the_umask(clips, tmp_path, umask):
    old = os.umask(umask)
    try:
        _prepare(clips, tmp_path / "out")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").iterdir() if p.is_file()]
    assert {p.name for p in files} >= {"prepared.json", "index.jsonl", "settings.json", "shard-000000.tar"}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~umask)}


# ---------------------------------------------------------------------------------------------- item 4
def test_finetune_data_reads_a_prepared_folder(clips, tmp_path):
    """The source videos are gone after prepare (moved to cold storage): finetune trains from the shards."""
    from eval_fixtures import FAST, make_tiny_gar

    from rest_fast.cli import main

    src = tmp_path / "labelled"
    shutil.copytree(clips, src)
    prep = tmp_path / "prep"
    _prepare(src, prep)
    shutil.rmtree(src)
    gar = make_tiny_gar(tmp_path / "gar")
    out = tmp_path / "ft"
    assert main(["finetune", "--supervised", "--data", str(prep), "--checkpoint", str(gar), "--epochs", "1",
                 "--train-batch-size", "6", "--no-eval", "--out", str(out), "--num-beams", "1", *FAST]) == 0
    (rec,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rec["steps"] == 1
    bad = json.loads((out / "bad_files.json").read_text())
    assert bad == []  # every clip came from the shards, none from the deleted videos


# ---------------------------------------------------------------------------------------------- item 3
def test_hf_clip_folder_with_the_default_config(tmp_path):
    """`--clip LOCAL_HF_FOLDER` with the config default clip_pretrained='openai' (documented as ignored there)."""
    import open_clip
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizerFast

    from rest_fast.eval.checkpoint import ResolvedCheckpoint, load_clip
    from rest_fast.run.config import TrainConfig
    from rest_fast.train.distributed import DistEnv
    from rest_fast.train.inputs import ensure_tiny_blip, load_models

    oc = open_clip.get_tokenizer("ViT-B-16")
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (tmp_path / "vocab.json").write_text(json.dumps({special.get(k, k): v for k, v in oc.encoder.items()}))
    merges = sorted(oc.bpe_ranks, key=oc.bpe_ranks.get)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizerFast(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=32, bos_token_id=49406,
                                      eos_token_id=49407, pad_token_id=0),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    hf_dir = tmp_path / "my-clip"
    CLIPModel(cfg).save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)

    tc = TrainConfig(data="videos", clip=str(hf_dir), blip="tiny", image_size=32, num_frames=2)
    assert tc.clip_pretrained == "openai"  # the default the issue is about
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    blip = ensure_tiny_blip(tmp_path / "tiny_blip", tc, env)
    _, clip = load_models(str(blip), tc.clip, tc, env)
    assert clip.backend == "hf" and clip.encode_text(["a dog"]).shape == (1, 16)
    # eval: a run that trained with this CLIP, its config.yaml saying clip_pretrained: openai
    run = ResolvedCheckpoint("run", "run", str(blip), config={"clip": str(hf_dir), "clip_pretrained": "openai"})
    assert load_clip(run, device="cpu").backend == "hf"
