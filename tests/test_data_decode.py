"""Clip sampling and decoding: exact frame indices through lossy codecs, fast path == reference, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import video_fixtures as vf

from rest_fast.data import VideoDecodeError, read_clip
from rest_fast.data import decode as D

GOOD = ["h264", "hevc", "vp9", "mjpeg", "mpeg4", "h264_gop", "vfr", "mkv", "one", "three"]
BROKEN = ["truncated_mp4", "zero", "text", "audio"]
N_FRAMES = {"h264": 40, "hevc": 40, "vp9": 40, "mjpeg": 40, "mpeg4": 40, "h264_gop": 60, "vfr": 30, "mkv": 40,
            "one": 1, "three": 3}


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    return {k: str(v) for k, v in vf.make_fixture_set(tmp_path_factory.mktemp("videos")).items()}


@pytest.fixture(autouse=True)
def _fresh_verification():
    D.reset_verification()
    yield
    D.reset_verification()


# ------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("n,t", [(1, 1), (1, 8), (3, 8), (7, 8), (8, 8), (9, 8), (40, 8), (300, 8), (301, 16), (5, 3)])
def test_sample_indices_eval_and_train(n, t):
    idx = D.sample_indices(n, t)
    assert len(idx) == t and all(0 <= i < n for i in idx)
    if n < t:
        assert idx == [min(j, n - 1) for j in range(t)]
        return
    for j, i in enumerate(idx):  # eval: the centre of segment j
        assert i == int(np.floor((j + 0.5) * n / t))
    rng = np.random.default_rng(0)
    for _ in range(20):
        tr = D.sample_indices(n, t, train=True, offsets=D.draw_offsets(t, rng))
        for j, i in enumerate(tr):  # train: inside segment j
            assert np.floor(j * n / t) <= i < (j + 1) * n / t
    assert sorted(idx) == idx


def test_sample_indices_errors():
    with pytest.raises(ValueError, match="num_frames"):
        D.sample_indices(10, 0)
    with pytest.raises(ValueError, match="num_decoded"):
        D.sample_indices(0, 8)
    with pytest.raises(ValueError, match="offsets"):
        D.sample_indices(10, 4, train=True)
    with pytest.raises(ValueError, match="offsets"):
        D.sample_indices(10, 4, train=True, offsets=np.array([0.1, 0.2, 1.0, 0.3]))


# ------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("name", GOOD)
def test_count_frames_matches_encoded(fx, name):
    assert D.count_frames(fx[name]) == N_FRAMES[name]


@pytest.mark.parametrize("name", GOOD)
@pytest.mark.parametrize("method", ["reference", "fast", "auto"])
def test_decoded_pixels_prove_indices(fx, name, method):
    for t in (1, 3, 8):
        frames, idx = D.read_frames(fx[name], t, method=method)
        assert idx == D.sample_indices(N_FRAMES[name], t)
        assert [vf.decode_index(f) for f in frames] == idx


@pytest.mark.parametrize("name", GOOD)
def test_fast_path_equals_reference_train(fx, name):
    """The fast path returns the reference's frames, pixel for pixel, for random offsets."""
    rng = np.random.default_rng(1)
    for t in (2, 5, 8, 16):
        off = D.draw_offsets(t, rng)
        ref, ref_idx = D.read_frames_reference(fx[name], t, train=True, offsets=off)
        fast, fast_idx, _ = D.read_frames_fast(fx[name], t, train=True, offsets=off)
        assert fast_idx == ref_idx
        assert [vf.decode_index(f) for f in fast] == fast_idx
        for a, b in zip(fast, ref):
            assert np.array_equal(a, b)


def test_fast_path_jumps_and_skips(fx, monkeypatch):
    """On a short-GOP file the fast path must flush (jump) and send packets with skip_frame=NONREF."""
    calls = {"flush": 0, "nonref": 0, "sent": 0}
    orig = D._fast_decode

    def spy(container, stream, packets, indices, convert):
        cc = stream.codec_context

        class Wrap:
            def __getattr__(self, k):
                return getattr(cc, k)

            def __setattr__(self, k, v):
                if k == "skip_frame" and v == "NONREF":
                    calls["nonref"] += 1
                setattr(cc, k, v)

            def flush_buffers(self):
                calls["flush"] += 1
                cc.flush_buffers()

            def decode(self, p):
                calls["sent"] += p is not None
                return cc.decode(p)

        class S:
            codec_context = Wrap()

        return orig(container, S(), packets, indices, convert)

    monkeypatch.setattr(D, "_fast_decode", spy)
    frames, idx, _ = D.read_frames_fast(fx["h264_gop"], 4)
    assert [vf.decode_index(f) for f in frames] == idx == [7, 22, 37, 52]
    assert calls["flush"] >= 3 and calls["nonref"] >= 1
    assert calls["sent"] < 53  # sequential decoding would send 53 packets


def test_auto_verifies_then_trusts(fx):
    for _ in range(D.VERIFY_CLIPS + 1):
        D.read_frames(fx["h264"], 8)
    st = D.verification_state()[("mov,mp4,m4a,3gp,3g2,mj2", "h264")]
    assert st == {"verified": D.VERIFY_CLIPS, "failed": None}


def test_auto_falls_back_when_fast_path_differs(fx, monkeypatch):
    orig = D._fast_decode

    def corrupt(*a, **k):
        frames = orig(*a, **k)
        frames[0] = frames[0].copy()
        frames[0][0, 0, 0] ^= 1
        return frames

    monkeypatch.setattr(D, "_fast_decode", corrupt)
    with pytest.warns(RuntimeWarning, match="sequential decoding"):
        frames, idx = D.read_frames(fx["vp9"], 4)
    ref, ref_idx = D.read_frames_reference(fx["vp9"], 4)
    assert idx == ref_idx and all(np.array_equal(a, b) for a, b in zip(frames, ref))
    assert D.verification_state()[("matroska,webm", "vp9")]["failed"]
    calls = []
    monkeypatch.setattr(D, "_fast_decode", lambda *a, **k: calls.append(1))
    frames, idx = D.read_frames(fx["vp9"], 4)  # a failed type never tries the fast path again
    assert not calls and idx == ref_idx and all(np.array_equal(a, b) for a, b in zip(frames, ref))


def test_rotation_is_honoured(fx):
    frames, idx = D.read_frames(fx["rotated"], 4)
    assert frames[0].shape == (64, 48, 3)  # stored 64x48 (WxH), shown rotated by 90 degrees
    assert [vf.decode_index(np.rot90(f, -1)) for f in frames] == idx


@pytest.mark.parametrize("name", ["truncated_mkv", "bitflip"])
def test_damaged_but_readable(fx, name):
    """Damaged files either give a clip or a VideoDecodeError — never another exception."""
    for method in ("reference", "fast", "auto"):
        try:
            frames, idx = D.read_frames(fx[name], 8, method=method)
        except VideoDecodeError:
            continue
        assert len(frames) == 8 and len(idx) == 8


def test_truncated_streamable_reads_what_exists(fx):
    frames, idx = D.read_frames(fx["truncated_mkv"], 4, method="auto")
    n = D.count_frames(fx["truncated_mkv"])
    assert 0 < n < 40 and idx == D.sample_indices(n, 4)


@pytest.mark.parametrize("name,reason", [("truncated_mp4", "cannot open"), ("zero", "empty"), ("text", "cannot open"),
                                         ("audio", "no video stream")])
@pytest.mark.parametrize("method", ["reference", "auto"])
def test_unreadable_files_raise(fx, name, reason, method):
    with pytest.raises(VideoDecodeError, match=reason) as e:
        read_clip(fx[name], 4, size=16, method=method)
    assert e.value.path == fx[name] and fx[name] in str(e.value)


def test_missing_file_raises(tmp_path):
    with pytest.raises(VideoDecodeError, match="not found"):
        read_clip(tmp_path / "nope.mp4")


# ------------------------------------------------------------------------------------------- read_clip
@pytest.mark.parametrize("name", ["h264", "vp9", "mjpeg", "one"])
def test_read_clip_eval(fx, name):
    x, idx = read_clip(fx[name], 8, size=24, return_indices=True)
    assert x.dtype == torch.uint8 and x.shape == (8, 24, 24, 3)
    assert idx == D.sample_indices(N_FRAMES[name], 8)
    assert [vf.decode_index(f.numpy()) for f in x] == idx  # the centre crop keeps the digit grid


def test_read_clip_train_deterministic(fx):
    a, ia = read_clip(fx["h264_gop"], 8, size=20, train=True, seed=5, return_indices=True)
    b, ib = read_clip(fx["h264_gop"], 8, size=20, train=True, seed=5, return_indices=True, method="reference")
    c, ic = read_clip(fx["h264_gop"], 8, size=20, train=True, seed=6, return_indices=True)
    assert ia == ib and torch.equal(a, b)
    assert ia != ic or not torch.equal(a, c)
    assert a.shape == (8, 20, 20, 3)
    ref, _ = D.read_frames_reference(fx["h264_gop"], 8, train=True, offsets=D.draw_offsets(8, np.random.default_rng(5)))
    assert [vf.decode_index(f) for f in ref] == ia


def test_read_clip_argument_errors(fx):
    with pytest.raises(ValueError, match="num_frames"):
        read_clip(fx["h264"], 0)
    with pytest.raises(ValueError, match="size"):
        read_clip(fx["h264"], 4, size=0)
    with pytest.raises(ValueError, match="backend"):
        read_clip(fx["h264"], 4, backend="decord")
    with pytest.raises(ValueError, match="method"):
        D.read_frames(fx["h264"], 4, method="magic")


@pytest.mark.parametrize("name", ["textured", "rotated_tex", "vp9", "mjpeg", "rotated"])
@pytest.mark.parametrize("train", [False, True])
def test_swscale_crop_resize_matches_torch_reference(fx, name, train):
    """read_clip's one-pass swscale crop+resize vs the torch reference on full RGB frames."""
    for seed in range(3) if train else [None]:
        a, ia = read_clip(fx[name], 4, size=24, train=train, seed=seed, return_indices=True)
        b, ib = read_clip(fx[name], 4, size=24, train=train, seed=seed, return_indices=True, resize="torch")
        assert ia == ib and a.shape == b.shape == (4, 24, 24, 3)
        diff = (a.double() - b.double()).abs()
        assert diff.mean() < 4.0, f"seed {seed}: mean |delta| {diff.mean():.2f}"


def test_rotated_clip_reads_upright(fx):
    x, idx = read_clip(fx["rotated"], 4, size=24, return_indices=True)
    assert [vf.decode_index(np.rot90(f.numpy(), -1)) for f in x] == idx


def test_preverify_skips_bad_files_and_verifies_types(fx):
    state = D.preverify([fx["text"], fx["h264"], fx["vp9"], fx["h264"], fx["vp9"], fx["mjpeg"]])
    assert state[("mov,mp4,m4a,3gp,3g2,mj2", "h264")] == {"verified": D.VERIFY_CLIPS, "failed": None}
    assert state[("matroska,webm", "vp9")] == {"verified": D.VERIFY_CLIPS, "failed": None}


def test_auto_verification_with_frame_objects(fx):
    """convert=None (read_clip's mode) must compare pixels during verification, not frame objects."""
    for _ in range(D.VERIFY_CLIPS):
        frames, idx = D.read_frames(fx["hevc"], 4, convert=None)
        assert [vf.decode_index(D.frame_to_rgb(f)) for f in frames] == idx
    assert D.verification_state()[("mov,mp4,m4a,3gp,3g2,mj2", "hevc")] == {"verified": D.VERIFY_CLIPS, "failed": None}


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc (Linux)")
def test_frame_conversion_starts_no_threads_a_forked_worker_could_inherit(tmp_path):
    """swscale's slice-thread pool outlives a conversion; a DataLoader worker forked after it hung forever
    freeing the inherited pool. Conversions stay on the calling thread, so no pool exists to inherit."""
    code = (
        "import os, numpy as np, av\n"
        "from rest_fast.data.decode import frame_to_rgb\n"
        "from rest_fast.data.clip import crop_resize_frame\n"
        "f = av.VideoFrame.from_ndarray(np.zeros((480, 640, 3), np.uint8), format='rgb24').reformat(format='yuv420p', threads=1)\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "for _ in range(3):\n"
        "    frame_to_rgb(f); crop_resize_frame(f, (0, 0, 320, 240), 112)\n"
        "print(before, len(os.listdir('/proc/self/task')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if "unexpected keyword argument 'threads'" in out.stderr:
        pytest.skip("this PyAV has no swscale threads option (and no slice-thread pool)")
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    assert after == before
