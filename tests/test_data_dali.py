"""DALI loader on CPU (VP9 / MJPEG): same indices as PyAV, pixels within a tolerance, bad files survive."""

from __future__ import annotations

import pytest
import torch
import video_fixtures as vf

pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed (pip install -e .[dali])")

from rest_fast.data import PyAVClipLoader, TooManyBadFiles, VideoIndex  # noqa: E402
from rest_fast.data.dali import DALIClipLoader  # noqa: E402

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


@pytest.fixture(scope="session")
def vids(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali_videos")
    out = {}
    for codec in ("vp9", "mjpeg"):
        ext = vf.CODECS[codec][2]
        out[f"{codec}_index"] = str(vf.write_index_clip(root / f"i.{ext}", 24, codec, width=65, height=49))
        out[f"{codec}_tex"] = str(vf.write_video(root / f"t.{ext}", (vf.textured_frame(i, 90, 66) for i in range(20)),
                                                 codec))
    (root / "bad.webm").write_text("garbage")
    out["bad"] = str(root / "bad.webm")
    return out


def _levels(clips):
    """Normalised float [B, T, 3, S, S] back to 0..255."""
    m = torch.tensor(MEAN).view(1, 1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 1, 3, 1, 1)
    return (clips * s + m) * 255.0


def _pair(paths, **kw):
    idx = VideoIndex.from_paths(paths)
    common = dict(batch_size=len(paths), mean=MEAN, std=STD, **kw)
    d = list(DALIClipLoader(idx, decoder_device="cpu", num_threads=1, **common))
    p = list(PyAVClipLoader(idx, num_workers=0, **common))
    return d, p


@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
def test_dali_cpu_eval_matches_pyav(vids, codec):
    d, p = _pair([vids[f"{codec}_tex"], vids[f"{codec}_index"]], num_frames=5, size=32)
    (a,), (b,) = d, p
    assert a.clips.shape == b.clips.shape == (2, 5, 3, 32, 32) and a.clips.dtype == torch.float32
    assert torch.equal(a.frame_indices, b.frame_indices) and torch.equal(a.index, b.index)
    diff = (_levels(a.clips) - _levels(b.clips)).abs()
    print(f"{codec}: DALI cpu vs PyAV mean |delta| {diff.mean():.2f}, max {diff.max():.1f} grey levels")
    assert diff.mean() < 4.0, f"mean |delta| {diff.mean():.2f} grey levels"
    # the index clip proves DALI decoded exactly the requested frames
    lv = _levels(a.clips)[1].permute(0, 2, 3, 1).numpy()
    assert [vf.decode_index(f) for f in lv] == a.frame_indices[1].tolist()


def test_dali_cpu_train_same_indices_and_deterministic(vids):
    paths = [vids["vp9_tex"], vids["mjpeg_tex"], vids["vp9_index"]]
    kw = dict(num_frames=4, size=24, train=True, seed=7, drop_last=False, shuffle=False)
    d, p = _pair(paths, **kw)
    assert torch.equal(d[0].frame_indices, p[0].frame_indices)
    idx = VideoIndex.from_paths(paths)
    again = list(DALIClipLoader(idx, batch_size=3, mean=MEAN, std=STD, decoder_device="cpu", num_threads=1, **kw))
    assert torch.equal(again[0].clips, d[0].clips)
    assert torch.isfinite(d[0].clips).all()


def test_dali_bad_file_resampled(vids):
    idx = VideoIndex.from_paths([vids["vp9_index"], vids["bad"], vids["mjpeg_index"]])
    ld = DALIClipLoader(idx, batch_size=3, num_frames=2, size=16, mean=MEAN, std=STD, decoder_device="cpu",
                        num_threads=1, max_bad_fraction=0.5)
    (b,) = list(ld)
    assert b.clips.shape == (3, 2, 3, 16, 16) and int(b.index[1]) != 1
    assert [r[0] for r in ld.bad_files.rows()] == [vids["bad"]]
    strict = DALIClipLoader(idx, batch_size=3, num_frames=2, size=16, mean=MEAN, std=STD, decoder_device="cpu",
                            num_threads=1)
    with pytest.raises(TooManyBadFiles, match="max_bad_fraction"):
        list(strict)


def test_dali_argument_errors(vids):
    idx = VideoIndex.from_paths([vids["vp9_index"]])
    with pytest.raises(ValueError, match="decoder_device"):
        DALIClipLoader(idx, batch_size=1, mean=MEAN, std=STD, decoder_device="gpu")
    with pytest.raises(ValueError, match="mean and std"):
        DALIClipLoader(idx, batch_size=1, mean=(0.5,), std=STD, decoder_device="cpu")


# the NVDEC test clips (index clip, textured clip): above every codec's minimum (HEVC 144x144, VP9 128x128)
NVDEC_CLIP_SIZES = ((176, 144), (192, 144))


@pytest.mark.parametrize("codec", ["h264", "hevc", "vp9"])
def test_nvdec_test_clips_are_above_the_codec_minimums(tmp_path, codec):
    from rest_fast.data.decode import probe_format

    ext = vf.CODECS[codec][2]
    for k, (w, h) in enumerate(NVDEC_CLIP_SIZES):
        p = probe_format(vf.write_index_clip(tmp_path / f"{k}.{ext}", 2, codec, width=w, height=h))
        assert p.type_key[1] == codec and p.gpu_rejects() is None, p


@pytest.mark.gpu
@pytest.mark.parametrize("codec", ["h264", "hevc", "vp9"])
def test_dali_mixed_nvdec_matches_pyav(tmp_path, codec):
    """NVDEC decoding (decoder_device="mixed") on the GPU: same indices as PyAV, pixels within tolerance."""
    ext = vf.CODECS[codec][2]
    (iw, ih), (tw, th) = NVDEC_CLIP_SIZES
    paths = [str(vf.write_index_clip(tmp_path / f"i.{ext}", 30, codec, width=iw, height=ih)),
             str(vf.write_video(tmp_path / f"t.{ext}", (vf.textured_frame(i, tw, th) for i in range(20)), codec))]
    idx = VideoIndex.from_paths(paths)
    common = dict(batch_size=2, mean=MEAN, std=STD, num_frames=5, size=32)
    (a,) = list(DALIClipLoader(idx, decoder_device="mixed", device="cuda", **common))
    (b,) = list(PyAVClipLoader(idx, num_workers=0, device="cuda", **common))
    assert a.clips.is_cuda and a.clips.shape == b.clips.shape
    assert torch.equal(a.frame_indices, b.frame_indices)
    diff = (_levels(a.clips.cpu()) - _levels(b.clips.cpu())).abs()
    assert diff.mean() < 4.0, f"mean |delta| {diff.mean():.2f} grey levels"
    lv = _levels(a.clips.cpu())[0].permute(0, 2, 3, 1).numpy()
    assert [vf.decode_index(f) for f in lv] == a.frame_indices[0].tolist()


def _doubler(depth):
    import numpy as np
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, exec_pipelined=True, exec_async=True,
                  prefetch_queue_depth=depth)
    def pipe():
        return fn.external_source(name="x", dtype=types.INT32, ndim=1) * 2

    p = pipe()
    p.build()

    def feed(pp, batch):
        pp.feed_input("x", [np.array([v], dtype=np.int32) for v in batch])

    def fetch(outs):
        return [int(np.array(outs[0][i])[0]) for i in range(len(outs[0]))]

    return p, feed, fetch


def test_prefetcher_keeps_order_pads_short_first_epoch_and_realigns():
    from rest_fast.data.dali import Prefetcher

    p, feed, fetch = _doubler(3)
    pf = Prefetcher(p, 3)
    first = [[1, 2, 3, 4], [5, 6]]  # fewer batches than the depth: padded, padding dropped
    assert [got for _, got in pf.run(first, feed, fetch)] == [[2, 4, 6, 8], [10, 12]]
    second = [[k, k + 1] for k in range(0, 20, 2)]
    gen = pf.run(second, feed, fetch)
    assert [next(gen)[1] for _ in range(2)] == [[0, 2], [4, 6]]
    gen.close()  # an abandoned epoch drains what it had scheduled
    third = [[100, 101, 102], [103]]
    assert [got for _, got in pf.run(third, feed, fetch)] == [[200, 202, 204], [206]]


def test_dali_workers_and_prefetch_give_the_same_batches(vids):
    paths = [vids["vp9_tex"], vids["mjpeg_tex"], vids["vp9_index"], vids["mjpeg_index"]]
    idx = VideoIndex.from_paths(paths)
    kw = dict(batch_size=2, mean=MEAN, std=STD, num_frames=3, size=16, train=True, seed=2, decoder_device="cpu",
              num_threads=1)
    sync = DALIClipLoader(idx, num_workers=0, prefetch=1, **kw)
    fast = DALIClipLoader(idx, num_workers=1, prefetch=3, **kw)
    for epoch in (0, 1):
        sync.set_epoch(epoch)
        fast.set_epoch(epoch)
        for a, b in zip(list(sync), list(fast), strict=True):
            assert torch.equal(a.index, b.index) and torch.equal(a.frame_indices, b.frame_indices)
            assert torch.equal(a.clips, b.clips)
        if epoch == 0:
            pids = [w.pid for w in fast._loader._iterator._workers]
    assert [w.pid for w in fast._loader._iterator._workers] == pids  # workers persist across epochs


def test_dali_train_colour_matches_pyav_formulas(vids):
    """Flip/jitter/grayscale run as the PyAV path's torch ops (batched), so a train batch differs from PyAV's
    by the decoder/resampler only: the same tolerance as eval."""
    paths = [vids["vp9_tex"], vids["mjpeg_tex"]]
    d, p = _pair(paths, num_frames=3, size=24, train=True, seed=11, shuffle=False, drop_last=False)
    diff = (_levels(d[0].clips) - _levels(p[0].clips)).abs()
    assert diff.mean() < 6.0, f"mean |delta| {diff.mean():.2f} grey levels"


def test_dali_skip_bad_and_hung_probe(vids, monkeypatch):
    import rest_fast.data.dali as dali_mod

    idx = VideoIndex.from_paths([vids["vp9_index"], vids["bad"], vids["mjpeg_index"]])
    ld = DALIClipLoader(idx, batch_size=3, num_frames=2, size=16, mean=MEAN, std=STD, decoder_device="cpu",
                        num_threads=1, skip_bad=True, max_retries=0, max_bad_fraction=1.0)
    (b,) = list(ld)
    assert b.index.tolist() == [0, 2] and b.clips.shape[0] == 2  # dropped, not replaced
    real = dali_mod.probe_video

    def probe(path):
        if str(path).endswith("i.webm"):
            import time

            while True:
                time.sleep(0.05)
        return real(path)

    monkeypatch.setattr(dali_mod, "probe_video", probe)
    idx = VideoIndex.from_paths([vids["vp9_index"], vids["mjpeg_index"], vids["mjpeg_tex"]])
    ld = DALIClipLoader(idx, batch_size=3, num_frames=2, size=16, mean=MEAN, std=STD, decoder_device="cpu",
                        num_threads=1, decode_timeout_s=0.3, max_bad_fraction=0.5)
    (b,) = list(ld)
    assert b.clips.shape[0] == 3 and int(b.index[0]) != 0
    assert ld.bad_files.rows()[0][:2] == (vids["vp9_index"], "decoding took longer than decode_timeout_s=0.3")


@pytest.mark.gpu
def test_dali_mixed_async_prefetch_on_the_ranks_gpu(tmp_path):
    """On a GPU: auto picks DALI on the current device; NVDEC + prefetch + persistent workers give the same
    batches as the synchronous settings, on the GPU, over two epochs."""
    from rest_fast.data.select import choose_decoder

    c = choose_decoder("auto", "cuda")
    assert c.name == "dali" and c.device_id == torch.cuda.current_device()
    paths = [str(vf.write_video(tmp_path / f"t{i}.mp4", (vf.textured_frame(i + k, 96, 72) for k in range(20)), "h264"))
             for i in range(5)]
    idx = VideoIndex.from_paths(paths)
    kw = dict(batch_size=2, mean=MEAN, std=STD, num_frames=4, size=32, train=True, seed=1, device="cuda")
    sync = DALIClipLoader(idx, num_workers=0, prefetch=1, **kw)
    fast = DALIClipLoader(idx, num_workers=2, prefetch=3, **kw)
    assert fast.decoder_device == "mixed" and fast.device_id == torch.cuda.current_device()
    for epoch in (0, 1):
        sync.set_epoch(epoch)
        fast.set_epoch(epoch)
        for a, b in zip(list(sync), list(fast), strict=True):
            assert b.clips.is_cuda and torch.equal(a.index, b.index)
            torch.testing.assert_close(a.clips, b.clips, atol=1e-5, rtol=0)
