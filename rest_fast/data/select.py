"""Which decoder reads the clips: ``--decoder auto|dali|pyav`` (config field ``decoder``).

* ``pyav`` — the CPU path: PyAV decoding (or the CPU JPEG reader of a prepared directory) in DataLoader
  worker processes.
* ``dali`` — NVIDIA DALI: NVDEC for videos, nvJPEG for prepared shards, on this rank's own GPU
  (``device_id`` = the local rank's CUDA device); without a CUDA device DALI runs its CPU variant
  (libjpeg-turbo for shards; for videos only VP8/VP9/MJPEG), which is how CPU CI tests the same pipelines.
* ``nvjpeg`` — prepared shards decoded on this rank's GPU by torchvision's nvJPEG
  (:class:`~rest_fast.data.shards.nvjpeg.NvJpegShardLoader`; the GPU path where DALI is absent); videos by PyAV.
* ``auto`` — DALI when the run computes on a CUDA device and ``nvidia.dali`` imports; else ``nvjpeg`` when it
  computes on a CUDA device and torchvision imports; else ``pyav``; given the
  run's videos, also ``pyav`` when a probed one is a file NVDEC cannot decode (:func:`gpu_decode_check`: the demo's
  32x32 MPEG-4 clips, 10-bit or 4:4:4 H.264, HEVC under 144x144 ...).

:func:`choose_decoder` returns the choice *and the reason*, which ``rest-fast info`` and the run log print.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

__all__ = ["DECODERS", "DecoderChoice", "validate_decoder", "choose_decoder", "dali_status", "nvjpeg_status",
           "gpu_decode_check"]

DECODERS = ("auto", "dali", "pyav", "nvjpeg")


class DecoderChoice(NamedTuple):
    """``name``: "dali" or "pyav"; ``reason``: one line saying why; ``device_id``: the GPU DALI decodes on
    (``None`` = DALI's CPU variant, or not DALI)."""

    name: str
    reason: str
    device_id: int | None = None


def validate_decoder(value: str) -> str:
    """``value`` lower-cased when it is one of :data:`DECODERS`, else ``ValueError`` (one line)."""
    v = str(value).strip().lower()
    if v not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}; got {value!r}")
    return v


def dali_status() -> tuple[bool, str]:
    """``(True, "nvidia-dali X.Y")`` when ``nvidia.dali`` imports, else ``(False, why)``."""
    from rest_fast.data.dali import dali_available

    ok, why = dali_available()
    return (True, f"nvidia-dali {why}") if ok else (False, f"nvidia-dali is not importable ({why})")


def nvjpeg_status() -> tuple[bool, str]:
    """``(True, "torchvision X nvJPEG")`` when torchvision's batched ``decode_jpeg`` imports, else ``(False, why)``."""
    from rest_fast.data.shards.nvjpeg import nvjpeg_available

    return nvjpeg_available()


def _cuda_device(device: torch.device | str | None) -> torch.device | None:
    """The CUDA device the run computes on, or None (CPU run, or CUDA absent)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def gpu_decode_check(videos: Sequence[str], max_files: int = 8, probe: Callable | None = None) -> str | None:
    """Why the GPU video decoder should not read ``videos`` (one line naming a file and the limit), or ``None``.

    Probes the stream headers of the first ``max_files`` readable files (``probe``: default
    :func:`rest_fast.data.decode.probe_format`; unreadable files are skipped, the loader reports them) and
    rejects the set when any of them is a file NVDEC cannot take: a data set is one encoding in practice, so one
    such file stands for all, and each would otherwise be a bad file (``--decoder dali`` still does that).
    """
    from rest_fast.data.decode import VideoDecodeError

    if probe is None:
        from rest_fast.data.decode import probe_format as probe
    seen = 0
    for path in videos:
        if seen >= max_files:
            break
        try:
            p = probe(path)
        except (VideoDecodeError, OSError):
            continue
        seen += 1
        why = p.gpu_rejects()
        if why is not None:
            return f"{os.path.basename(str(path))}: {why}"
    return None


def choose_decoder(requested: str = "auto", device: torch.device | str | None = None, *,
                   videos: Sequence[str] | None = None) -> DecoderChoice:
    """Resolve ``requested`` (``auto``, ``dali`` or ``pyav``) for a run computing on ``device``.

    ``dali`` without ``nvidia.dali`` raises ``ValueError`` (one line: what to install); ``auto`` never
    raises and says in ``reason`` why it fell back to the CPU path. ``videos``: the run's video files (not a
    prepared directory's), probed by ``auto`` before it picks DALI (:func:`gpu_decode_check`).
    """
    req = validate_decoder(requested)
    if req == "pyav":
        return DecoderChoice("pyav", "requested (--decoder pyav): PyAV / CPU shard reader in worker processes")
    cuda = _cuda_device(device)
    if req == "nvjpeg":
        ok, tv = nvjpeg_status()
        if not ok:
            raise ValueError(f"--decoder nvjpeg: {tv} (or use --decoder pyav)")
        where = f"on {cuda}" if cuda is not None else "on the CPU (no CUDA device: libjpeg-turbo)"
        return DecoderChoice("nvjpeg", f"requested (--decoder nvjpeg), {tv} {where} for prepared shards; videos "
                             "by PyAV", None if cuda is None else cuda.index)
    ok, dali = dali_status()
    if req == "dali":
        if not ok:
            raise ValueError(f"--decoder dali: {dali}; install it with pip install -e '.[dali]' "
                             "(or use --decoder pyav)")
        if cuda is None:
            return DecoderChoice("dali", f"requested (--decoder dali), {dali}; no CUDA device, so DALI's CPU "
                                 "variant (videos: VP8/VP9/MJPEG only; shards: libjpeg-turbo)")
        return DecoderChoice("dali", f"requested (--decoder dali), {dali} on {cuda} (NVDEC / nvJPEG)", cuda.index)
    if cuda is None:
        why = "no CUDA device" if not torch.cuda.is_available() else f"the run computes on {device}"
        return DecoderChoice("pyav", f"auto: {why}, so the CPU path (PyAV / CPU shard reader)")
    if not ok:
        tv_ok, tv = nvjpeg_status()
        if tv_ok:
            return DecoderChoice("nvjpeg", f"auto: {dali}; CUDA device {cuda} and {tv} present, so prepared shards "
                                 "are decoded on the GPU by nvJPEG (videos by PyAV)", cuda.index)
        return DecoderChoice("pyav", f"auto: {dali}, so the CPU path (PyAV / CPU shard reader)")
    if videos is not None:
        why = gpu_decode_check(videos)
        if why is not None:
            return DecoderChoice("pyav", f"auto: the GPU decoder cannot take the videos ({why}), so the CPU path "
                                 "(PyAV in worker processes)")
    return DecoderChoice("dali", f"auto: CUDA device {cuda} and {dali} present (NVDEC / nvJPEG)", cuda.index)
