"""Videos NVDEC cannot take never reach the GPU pipeline: the limits by codec, profile, pixel format and size
(fabricated probes), the header probe on real files, the DALI samples' bad-file routing, and ``--decoder auto``
keeping such data sets (the demo's 32x32 MPEG-4 clips) on the CPU path. No GPU: CUDA and DALI are stood in for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import video_fixtures as vf

from rest_fast.data import select
from rest_fast.data.decode import VideoDecodeError, VideoProbe, probe_format
from rest_fast.data.nvdec import nvdec_rejects


@pytest.mark.parametrize("codec,w,h,profile,pix,bad", [
    ("h264", 1280, 720, "High", "yuv420p", None),
    ("h264", 48, 16, "Main", "yuv420p", None),
    ("h264", 47, 16, "Main", "yuv420p", "below NVDEC's minimum size 48x16"),
    ("h264", 640, 360, "High 10", "yuv420p10le", "profile High 10"),
    ("h264", 640, 360, "High 4:2:2", "yuv422p", "profile High 4:2:2"),
    ("h264", 640, 360, None, "yuv444p", "pixel format yuv444p"),
    ("h264", 4097, 2160, "High", "yuv420p", "above NVDEC's maximum size 4096x4096"),
    ("hevc", 144, 144, "Main", "yuv420p", None),
    ("hevc", 176, 143, "Main", "yuv420p", "below NVDEC's minimum size 144x144"),
    ("hevc", 640, 360, "Main 10", "yuv420p10le", "pixel format yuv420p10le"),
    ("vp9", 128, 128, "Profile 0", "yuv420p", None),
    ("vp9", 127, 200, "Profile 0", "yuv420p", "below NVDEC's minimum size 128x128"),
    ("vp9", 640, 360, "Profile 1", "yuv444p", "profile Profile 1"),
    ("av1", 96, 96, "Main", "yuv420p", "below NVDEC's minimum size 128x128"),
    ("mjpeg", 64, 64, None, "yuvj422p", None),
    ("mpeg4", 32, 32, "Simple Profile", "yuv420p", "does not decode mpeg4"),  # the demo's clips
    ("prores", 640, 360, None, "yuv422p10le", "does not decode prores"),
])
def test_limits(codec, w, h, profile, pix, bad):
    why = nvdec_rejects(codec, w, h, profile=profile, pix_fmt=pix)
    assert (why is None) if bad is None else (bad in why), why


def test_probe_reads_codec_size_and_format(tmp_path):
    from rest_fast.synthetic.video import write_video

    demo = tmp_path / "demo.mp4"  # what the built-in demo writes: 32x32 MPEG-4
    write_video(demo, np.zeros((4, 32, 32, 3), np.uint8))
    p = probe_format(demo)
    assert (p.type_key[1], p.width, p.height, p.pix_fmt) == ("mpeg4", 32, 32, "yuv420p")
    assert "mpeg4" in p.gpu_rejects()
    h = probe_format(vf.write_index_clip(tmp_path / "a.mp4", 3, "h264", width=176, height=144))
    assert (h.type_key[1], h.width, h.height, h.pix_fmt) == ("h264", 176, 144, "yuv420p") and h.profile
    assert h.gpu_rejects() is None
    with pytest.raises(VideoDecodeError):
        probe_format(tmp_path / "missing.mp4")


def _fake(codec, w, h, pix="yuv420p"):
    return VideoProbe(0, w, h, ("mp4", codec), False, None, pix)


def test_gpu_decode_check_names_the_first_file_it_cannot_take():
    probes = {"/d/a.mp4": _fake("h264", 320, 240), "/d/b.mp4": VideoDecodeError("/d/b.mp4", "truncated"),
              "/d/c.mp4": _fake("hevc", 100, 100), "/d/d.mp4": _fake("mpeg4", 32, 32)}

    def probe(path):
        r = probes[path]
        if isinstance(r, Exception):
            raise r
        return r

    why = select.gpu_decode_check(list(probes), probe=probe)
    assert why.startswith("c.mp4: hevc 100x100 is below NVDEC's minimum size 144x144")
    assert select.gpu_decode_check(["/d/a.mp4", "/d/b.mp4"], probe=probe) is None  # unreadable: skipped
    assert select.gpu_decode_check(list(probes), max_files=1, probe=probe) is None  # only a.mp4 probed


@pytest.fixture
def gpu_machine(monkeypatch):
    """As on a GPU machine with DALI installed (the decision reads only these two)."""
    monkeypatch.setattr(select, "_cuda_device", lambda device: torch.device("cuda", 0))
    monkeypatch.setattr(select, "dali_status", lambda: (True, "nvidia-dali 9.9"))


def test_auto_keeps_the_demo_on_the_cpu_path(gpu_machine, tmp_path):
    from rest_fast.synthetic.video import write_video

    demo = [tmp_path / f"{i}.mp4" for i in range(3)]
    for p in demo:
        write_video(p, np.zeros((4, 32, 32, 3), np.uint8))
    c = select.choose_decoder("auto", "cuda", videos=[str(p) for p in demo])
    assert c.name == "pyav" and "0.mp4" in c.reason and "mpeg4" in c.reason, c
    good = [str(vf.write_index_clip(tmp_path / "g.mp4", 3, "h264", width=176, height=144))]
    assert select.choose_decoder("auto", "cuda", videos=good).name == "dali"
    assert select.choose_decoder("auto", "cuda").name == "dali"  # nothing to probe (e.g. a prepared dir)
    assert select.choose_decoder("dali", "cuda", videos=[str(demo[0])]).name == "dali"  # asked for: as asked


def test_dali_samples_count_what_nvdec_cannot_take_as_bad_files(tmp_path):
    pytest.importorskip("nvidia.dali")
    from rest_fast.data.dali import VideoSampleSource
    from rest_fast.data.index import VideoIndex
    from rest_fast.synthetic.video import write_video

    small = tmp_path / "small.mp4"
    write_video(small, np.zeros((6, 32, 32, 3), np.uint8))
    good = vf.write_index_clip(tmp_path / "good.mp4", 6, "h264", width=176, height=144)
    idx = VideoIndex.from_paths([str(small), str(good)])
    src = VideoSampleSource(idx, num_frames=2, train=False, seed=0, gpu_decoder=True)
    item = src[(0, 0)]
    assert item["entry"] == 1 and not item["failed"]  # the deterministic replacement
    assert item["bad"] and {tuple(b) for b in item["bad"]} == {(str(small), "the GPU decoder cannot take it: NVDEC "
                                                                "(DALI) does not decode mpeg4 (it takes h264, hevc, "
                                                                "vp8, vp9, av1, mjpeg)")}
    cpu = VideoSampleSource(idx, num_frames=2, train=False, seed=0)  # DALI's CPU variant: no NVDEC limits
    assert cpu[(0, 0)]["entry"] == 0


@pytest.mark.parametrize("prefetch", [1, 2])
def test_a_decoder_error_on_one_file_is_a_bad_file_not_a_dead_pipeline(tmp_path, prefetch):
    """DALI's CPU variant refuses H.264 inside the run (as NVDEC refuses what it cannot take): the failing batch is
    decoded one sample at a time, the H.264 file becomes a counted bad file with DALI's reason, every other clip
    arrives, in order, and the next epoch runs on a fresh pipeline."""
    pytest.importorskip("nvidia.dali")
    from rest_fast.data.dali import DALIClipLoader
    from rest_fast.data.index import VideoIndex

    vp9 = [str(vf.write_index_clip(tmp_path / f"{i}.webm", 6, "vp9", width=65, height=49)) for i in range(3)]
    h264 = str(vf.write_index_clip(tmp_path / "x.mp4", 6, "h264", width=66, height=50))
    idx = VideoIndex.from_paths([vp9[0], h264, vp9[1], vp9[2]])
    ld = DALIClipLoader(idx, batch_size=2, mean=(0.5,) * 3, std=(0.25,) * 3, num_frames=2, size=16,
                        decoder_device="cpu", num_threads=1, prefetch=prefetch, max_bad_fraction=0.5)
    for epoch in range(2):
        ld.set_epoch(epoch)
        got = [b.index.tolist() for b in ld]
        assert got == [[0], [2, 3]], got
    rows = ld.bad_files.rows()
    assert len(rows) == 1 and rows[0][0] == h264 and rows[0][2] == 2
    assert rows[0][1].startswith("the video decoder failed on it: RuntimeError: ") and "\n" not in rows[0][1]
    assert "no longer valid" not in rows[0][1] and "Critical error" not in rows[0][1], rows[0][1]
