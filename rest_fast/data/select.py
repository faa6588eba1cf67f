"""Which decoder reads the clips: ``--decoder auto|dali|pyav`` (config field ``decoder``).

* ``pyav`` — the CPU path: PyAV decoding (or the CPU JPEG reader of a prepared directory) in DataLoader
  worker processes.
* ``dali`` — NVIDIA DALI: NVDEC for videos, nvJPEG for prepared shards, on this rank's own GPU
  (``device_id`` = the local rank's CUDA device); without a CUDA device DALI runs its CPU variant
  (libjpeg-turbo for shards; for videos only VP8/VP9/MJPEG), which is how CPU CI tests the same pipelines.
* ``auto`` — DALI when the run computes on a CUDA device and ``nvidia.dali`` imports, else ``pyav``.

:func:`choose_decoder` returns the choice *and the reason*, which ``rest-fast info`` and the run log print.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["DECODERS", "DecoderChoice", "validate_decoder", "choose_decoder", "dali_status"]

DECODERS = ("auto", "dali", "pyav")


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


def _cuda_device(device: torch.device | str | None) -> torch.device | None:
    """The CUDA device the run computes on, or None (CPU run, or CUDA absent)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def choose_decoder(requested: str = "auto", device: torch.device | str | None = None) -> DecoderChoice:
    """Resolve ``requested`` (``auto``, ``dali`` or ``pyav``) for a run computing on ``device``.

    ``dali`` without ``nvidia.dali`` raises ``ValueError`` (one line: what to install); ``auto`` never
    raises and says in ``reason`` why it fell back to the CPU path.
    """
    req = validate_decoder(requested)
    if req == "pyav":
        return DecoderChoice("pyav", "requested (--decoder pyav): PyAV / CPU shard reader in worker processes")
    cuda = _cuda_device(device)
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
        return DecoderChoice("pyav", f"auto: {dali}, so the CPU path (PyAV / CPU shard reader)")
    return DecoderChoice("dali", f"auto: CUDA device {cuda} and {dali} present (NVDEC / nvJPEG)", cuda.index)
