"""What the GPU video decoder (NVDEC, through DALI's ``fn.decoders.video``) can take, decided from a PyAV probe.

NVDEC refuses streams outside per-codec limits, and DALI then fails the whole batch ("Video is too small in at
least one dimension", "Codec configuration not supported on this GPU"). Such a file must never reach the GPU
pipeline: :func:`nvdec_rejects` gives the reason from the codec, profile, pixel format and coded size that
:func:`~rest_fast.data.decode.probe_video` reads, so the DALI loader counts the file as a bad file with that reason
(before decoding anything) and ``--decoder auto`` keeps data sets the GPU cannot decode on the CPU path.

Limits (coded size, per codec, the decoder capabilities ``cuvidGetDecoderCaps`` reports on Turing to Hopper GPUs;
e.g. ``nvdecinfo`` on an RTX 3050 prints 48x16 for MPEG-1/2/4, VC-1 and H.264, 64x64 for MJPEG; NVIDIA's decoder
programming guide lists 144x144 for HEVC and 128x128 for VP9 and AV1). Formats: 8-bit 4:2:0 only (DALI's video
decoder writes 8-bit RGB; H.264 High 10 / High 4:2:2 / High 4:4:4 are Blackwell-only; HEVC 4:4:4 and 10-bit exist
on some GPUs but are not taken here), MJPEG also as 4:2:2 / 4:4:4 / grey.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["NvdecLimits", "NVDEC_LIMITS", "nvdec_rejects"]


class NvdecLimits(NamedTuple):
    """Smallest and largest coded size (pixels) NVDEC decodes for one codec."""

    min_w: int
    min_h: int
    max_w: int
    max_h: int


# PyAV / FFmpeg codec name -> limits, for the codecs DALI's GPU video decoder takes. NVDEC also decodes MPEG-1/2/4
# part 2 and VC-1, but DALI's decoder is not known to parse them: such files (e.g. the XviD AVIs of UCF-101 and
# HMDB-51, the demo's MPEG-4 clips) stay on the CPU path rather than risk the GPU pipeline.
NVDEC_LIMITS: dict[str, NvdecLimits] = {
    "h264": NvdecLimits(48, 16, 4096, 4096),
    "hevc": NvdecLimits(144, 144, 8192, 8192),
    "vp8": NvdecLimits(48, 16, 4096, 4096),
    "vp9": NvdecLimits(128, 128, 8192, 8192),
    "av1": NvdecLimits(128, 128, 8192, 8192),
    "mjpeg": NvdecLimits(64, 64, 32768, 16384),
}

_FORMATS_420 = ("yuv420p", "yuvj420p", "nv12")
_FORMATS_MJPEG = _FORMATS_420 + ("yuvj422p", "yuv422p", "yuvj444p", "yuv444p", "gray")
# profiles named by FFmpeg that NVDEC (before Blackwell) does not decode, whatever the pixel format says
_BAD_PROFILES = {
    "h264": ("High 10", "High 10 Intra", "High 4:2:2", "High 4:2:2 Intra", "High 4:4:4", "High 4:4:4 Predictive",
             "High 4:4:4 Intra", "CAVLC 4:4:4"),
    "vp9": ("Profile 1", "Profile 3"),
}


def nvdec_rejects(codec: str, width: int, height: int, *, profile: str | None = None,
                  pix_fmt: str | None = None) -> str | None:
    """Why DALI's video decoder cannot take this stream (one line), or ``None`` when it can.

    Args:
        codec: FFmpeg codec name (``stream.codec_context.name``: ``h264``, ``hevc``, ``vp9``, ``mpeg4`` ...).
        width, height: coded frame size in pixels.
        profile: FFmpeg profile name (``"High"``, ``"High 10"``, ``"Main 10"`` ...), ``None`` if unknown.
        pix_fmt: FFmpeg pixel format (``"yuv420p"``, ``"yuv420p10le"`` ...), ``None`` if unknown.
    """
    codec = (codec or "").lower()
    lim = NVDEC_LIMITS.get(codec)
    if lim is None:
        return f"NVDEC (DALI) does not decode {codec or 'this codec'} (it takes {', '.join(NVDEC_LIMITS)})"
    if profile is not None and profile in _BAD_PROFILES.get(codec, ()):
        return f"NVDEC does not decode {codec} profile {profile}"
    if pix_fmt is not None and pix_fmt not in (_FORMATS_MJPEG if codec == "mjpeg" else _FORMATS_420):
        return f"NVDEC (DALI) decodes 8-bit 4:2:0 {codec}, not pixel format {pix_fmt}"
    if width < lim.min_w or height < lim.min_h:
        return f"{codec} {width}x{height} is below NVDEC's minimum size {lim.min_w}x{lim.min_h}"
    if width > lim.max_w or height > lim.max_h:
        return f"{codec} {width}x{height} is above NVDEC's maximum size {lim.max_w}x{lim.max_h}"
    return None
