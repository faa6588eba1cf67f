"""The synthetic action world, its pretrained demo models, and the claim of the default demo: REST beats its start.

Issue 15: the world's actions are visible in the set of frames but not in one frame; the demo CLIP (trained on the
disjoint web corpus) knows the actions; the demo BLIP, an image captioner, names the object but guesses the action;
the shipped weights are reproducible from their seed; and a reduced `rest-fast train` run ends far above the
zero-shot frame captioner it starts from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from rest_fast.synthetic import world


def test_world_is_deterministic_and_covers_every_action():
    rng = lambda: np.random.default_rng([3, 1])  # noqa: E731
    spec = world.ClipSpec("cross", "blue", "pulsing")
    a = world.render_clip(spec, rng(), frames=4, size=32)
    assert a.shape == (4, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, world.render_clip(spec, rng(), frames=4, size=32))
    assert len(world.ACTIONS) >= 8 and len(set(world.ACTIONS)) == len(world.ACTIONS)
    vocab = set(world.vocabulary())
    clips, specs = world.web_corpus(len(world.ACTIONS) * 12, seed=0)
    assert {s.action for s in specs} == set(world.ACTIONS)
    assert len({(s.object, s.action) for s in specs}) == len(specs)  # every object x action once
    r = np.random.default_rng(0)
    for s in specs:
        cap = world.caption(s, r)
        assert s.action in cap and s.object in cap and set(cap.split()) <= vocab
    # the captioner's corpus is a prefix of the CLIP's: clip i does not depend on how many are rendered
    more, more_specs = world.web_corpus(len(specs) + 30, seed=0)
    np.testing.assert_array_equal(more[: len(specs)], clips)
    assert more_specs[: len(specs)] == specs
    # standing still is the only action whose frames are all alike (up to the pixel noise)
    spread = {s.action: float(np.abs(c.astype(float) - c.astype(float).mean(0)).mean()) for c, s in zip(clips, specs)}
    assert spread["standing still"] < min(v for k, v in spread.items() if k != "standing still")


def test_order_dependent_actions_share_their_frame_sets():
    """Moving left shows the frames of moving right in reverse order (same clip seed): only order differs."""
    left = world.render_clip(world.ClipSpec("square", "red", "moving left"), np.random.default_rng(5), noise=0)
    right = world.render_clip(world.ClipSpec("square", "red", "moving right"), np.random.default_rng(5), noise=0)
    np.testing.assert_array_equal(left, right[::-1])
    grow = world.render_clip(world.ClipSpec("square", "red", "growing"), np.random.default_rng(5), noise=0)
    shrink = world.render_clip(world.ClipSpec("square", "red", "shrinking"), np.random.default_rng(5), noise=0)
    np.testing.assert_array_equal(grow, shrink[::-1])


def test_shipped_demo_models_are_small_and_load():
    from rest_fast.models import GARModel
    from rest_fast.synthetic.models import ASSETS, demo_blip_dir, demo_clip

    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total < 5e6, f"demo models take {total / 1e6:.1f} MB"
    clip = demo_clip()
    assert clip.image_size == (32, 32) and clip.encode_text(["a red square pulsing"]).shape == (1, clip.dim)
    model = GARModel.from_pretrained(str(demo_blip_dir()), num_frames=4)
    assert model.num_frames == 4 and len(model.temporal_adapters) == 2


def _fresh_clips(n_per_action: int, seed: int):
    clips, specs = [], []
    for a in world.ACTIONS:
        for j in range(n_per_action):
            rng = np.random.default_rng([seed, world.ACTIONS.index(a), j])
            spec = world.random_spec(rng, (a,))
            clips.append(world.render_clip(spec, rng))
            specs.append(spec)
    return torch.from_numpy(np.stack(clips)), specs


def test_demo_clip_knows_the_actions_and_blip_only_the_objects():
    """Premise of the demo, on clips of neither corpus: CLIP's video feature (a mean over frames) tells the
    action; the frame captioner names the object but is near chance on the action."""
    from rest_fast.clip import OPENAI_MEAN, OPENAI_STD
    from rest_fast.eval.clip_tam import clip_tam
    from rest_fast.models import GARModel
    from rest_fast.synthetic.models import demo_blip_dir, demo_clip, to_pixels

    clips, specs = _fresh_clips(6, seed=77)
    labels = np.array([world.ACTIONS.index(s.action) for s in specs])
    clip = demo_clip()
    v = clip.encode_frames(to_pixels(clips, clip.mean, clip.std))
    t = clip.encode_text(list(world.ACTIONS))
    clip_acc = float(((v @ t.T).argmax(1).numpy() == labels).mean())
    assert clip_acc >= 0.6, clip_acc  # bare action names: ~5x chance (measured 65%)
    # as REST ranks them: captions that name the clip's object, one per action (measured 92%; standing still is the
    # hard one, since only the sameness of the frames tells it)
    per_object = clip.encode_text([f"a {s.object} {a}" for s in specs for a in world.ACTIONS]).view(len(specs), 8, -1)
    named_acc = float((torch.einsum("bd,bad->ba", v, per_object).argmax(1).numpy() == labels).mean())
    assert named_acc >= 0.8, named_acc
    # CLIP-TAM: every template caption of every object maps to its own action name (measured 100%)
    captions = [tpl.format(o=f"{c} {s}", a=a) for tpl in world.TEMPLATES for c in world.COLOURS for s in world.SHAPES
                for a in world.ACTIONS]
    mapped = (clip.encode_text(captions) @ t.T).argmax(1).numpy()
    assert float((mapped == np.arange(len(captions)) % len(world.ACTIONS)).mean()) >= 0.95

    model = GARModel.from_pretrained(str(demo_blip_dir()), num_frames=1, adapter_layers=[])
    mid = to_pixels(clips[:, 2], OPENAI_MEAN, OPENAI_STD)
    texts = model.generate(mid, prompt="a video of", num_beams=2, max_length=16, min_length=3).texts
    object_acc = float(np.mean([s.object in t for s, t in zip(specs, texts)]))
    colour_acc = float(np.mean([s.colour in t for s, t in zip(specs, texts)]))
    pred, _ = clip_tam(texts, [world.folder_name(a) for a in world.ACTIONS], clip, topk=1)
    frame_acc = float((np.asarray(pred)[:, 0] == labels).mean())
    print(f"demo CLIP video->action {clip_acc:.0%} (object named: {named_acc:.0%}); frame captioner: object {object_acc:.0%}, action {frame_acc:.0%}")
    assert colour_acc >= 0.9 and object_acc >= 0.4, (colour_acc, object_acc)  # chance: 25% and 8%
    assert frame_acc <= 0.5, frame_acc


def test_pretrain_script_is_bit_reproducible(tmp_path):
    """The script that made the shipped weights, at reduced size, twice: identical bytes; the result loads."""
    from rest_fast.synthetic.models import demo_clip
    from rest_fast.synthetic.pretrain import main

    size = ["--web-clips", "24", "--blip-web-clips", "16", "--clip-steps", "3", "--blip-steps", "3"]
    args = [*size, "--seed", "5", "--serial"]
    assert main(["--out", str(tmp_path / "a"), *args]) == 0
    assert main(["--out", str(tmp_path / "b"), *args]) == 0
    assert main(["--out", str(tmp_path / "a"), "--check", *args]) == 0
    recipe = json.loads((tmp_path / "a" / "recipe.json").read_text())
    assert recipe["seed"] == 5 and recipe["blip_steps"] == 3
    assert demo_clip(tmp_path / "b").encode_text(["a blue cross blinking"]).shape[0] == 1
    assert main(["--out", str(tmp_path / "a"), "--check", *size, "--seed", "6", "--serial"]) == 1  # other seed, bytes


def _run_demo(out, *overrides: str) -> tuple[list[dict], subprocess.CompletedProcess]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    p = subprocess.run([sys.executable, "-m", "rest_fast", "train", f"--out={out}", "--no-progress", *overrides],
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return sorted((r for r in rounds if r.get("kind") == "round"), key=lambda r: r["round"]), p


def _verbatim(out, round_: int) -> float:
    """Share of generated captions that hold their action's phrase word for word."""
    recs = [json.loads(x) for x in (out / "captions" / f"round_{round_:02d}.jsonl").read_text().splitlines()]
    return float(np.mean([r["label"].replace("_", " ") in r["generated"] for r in recs]))


def test_rest_beats_its_start(tmp_path):
    """`rest-fast train` with no --data (the default demo, reduced to 2 rounds of 8 epochs, ~25 s): the generated
    captions' CLIP-TAM top-1 ends far above the zero-shot frame captioner's, the best pseudo-caption does not get
    worse, and the captions name their action verbatim. (Measured: frame captioner 32.3%, pseudo-captions
    75.0% -> 80.2%, generated 59.4%, 59% verbatim.)"""
    run = tmp_path / "demo"
    rounds, p = _run_demo(run, "epochs=16", "epochs_per_round=8")
    assert "synthetic world" in p.stdout
    assert [r["round"] for r in rounds] == [0, 1, 2]
    first, last = rounds[0], rounds[-1]
    for key in ("tam_top1", "tam_top5", "tam_pseudo_top1", "tam_initial_top1"):
        assert key in last, key
    print({k: [r.get(k) for r in rounds] for k in ("tam_initial_top1", "tam_pseudo_top1", "tam_top1")})
    assert last["tam_top1"] >= last["tam_initial_top1"] + 0.2
    assert last["tam_pseudo_top1"] >= first["tam_pseudo_top1"]
    assert _verbatim(run, 2) >= 0.5
    assert (run / "plots" / "accuracy.png").exists()
    html = (run / "report.html").read_text()
    assert "initial frame captions" in html and "class='ok'" in html


@pytest.mark.slow
def test_default_demo_meets_its_bars(tmp_path):
    """The full default demo (3 rounds of 16 epochs, ~45 s), against issue 15's bars: generated-caption top-1
    >= 60% and >= 25 points above the frame captioner, pseudo-caption accuracy not falling from round 0 to the
    last round, and at least half the captions naming their action verbatim. (Measured: 32.3% -> 79.2%,
    pseudo-captions 75.0% -> 80.2%, 79% verbatim.)"""
    run = tmp_path / "demo"
    rounds, _ = _run_demo(run)
    first, last = rounds[0], rounds[-1]
    print({k: [r.get(k) for r in rounds] for k in ("tam_initial_top1", "tam_pseudo_top1", "tam_top1")})
    assert last["tam_top1"] >= 0.6 and last["tam_top1"] >= last["tam_initial_top1"] + 0.25
    assert last["tam_pseudo_top1"] >= first["tam_pseudo_top1"]
    assert _verbatim(run, last["round"]) >= 0.5
