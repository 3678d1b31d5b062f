"""Classic video codecs through PyAV (its wheels bundle FFmpeg with libx264, libx265,
libsvtav1 and libvpx-vp9): the anchors neural video codecs are compared against.

Every anchor is configured low-delay as video-codec papers do: no B-frames and no frame
reordering, an intra frame every ``gop`` frames, no scene-cut intra frames, constant
quality (``crf``) rate control. Frames go RGB -> ``pix_fmt`` (yuv420p by default, as the
sources were) -> codec -> RGB through swscale, the same conversion the video reader uses.

Per-frame bytes are the encoder's packets exactly; the first one carries 4 more bytes
(height, width, for the crop back from the even size 4:2:0 needs), counted in the rate.
"""

from __future__ import annotations

import struct
from fractions import Fraction
from functools import cache
from typing import Any

import numpy as np

from clbench.codecs.base import CorruptDataError
from clbench.codecs.video import VideoCodec, register_video_codec
from clbench.config import yaml_beside
from clbench.errors import ClbenchError


@cache
def classic_config() -> dict[str, Any]:
    return yaml_beside(__file__, "video_classic.yaml")


class PyAVCodec(VideoCodec):
    """One FFmpeg encoder/decoder pair; subclasses give the codec names and options."""

    encoder = ""
    decoder = ""
    rate_knob = "crf"

    def __init__(
        self,
        crf: int | None = None,
        preset: str | int | None = None,
        gop: int | None = None,
        pix_fmt: str = "yuv420p",
        threads: int = 0,
    ):
        import av

        d = classic_config()["codecs"][self.name]
        self.crf = int(crf if crf is not None else d["crf"])
        self.preset = str(preset if preset is not None else d["preset"])
        self.gop = int(gop if gop is not None else classic_config()["gop"])
        self.pix_fmt, self.threads = str(pix_fmt), int(threads)
        lo, hi = d["crf_range"]
        if not lo <= self.crf <= hi:
            raise ClbenchError(f"video codec {self.name}: crf={crf} outside {lo}..{hi}")
        if self.gop < 1:
            raise ClbenchError(f"video codec {self.name}: gop={gop} must be >= 1")
        if self.encoder not in av.codecs_available:
            raise ClbenchError(
                f"video codec {self.name}: this PyAV build has no {self.encoder} encoder"
            )

    def options(self) -> dict[str, Any]:
        opts = {"crf": self.crf, "preset": self.preset, "gop": self.gop}
        if self.pix_fmt != "yuv420p":
            opts["pix_fmt"] = self.pix_fmt
        return opts

    def ffmpeg_options(self) -> dict[str, str]:
        """The encoder's private options (FFmpeg ``-x264-params`` and friends)."""
        raise NotImplementedError

    def _encode(self, frames: np.ndarray) -> list[bytes]:
        import av

        t, h, w = frames.shape[:3]
        even = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        ctx = av.CodecContext.create(self.encoder, "w")
        ctx.width, ctx.height = even.shape[2], even.shape[1]
        ctx.pix_fmt = self.pix_fmt
        ctx.time_base = Fraction(1, 25)
        ctx.framerate = Fraction(25, 1)
        ctx.gop_size = self.gop
        ctx.max_b_frames = 0
        ctx.thread_count = self.threads
        ctx.options = self.ffmpeg_options()
        packets: list[bytes] = []
        try:
            for i, f in enumerate(even):
                vf = av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format=self.pix_fmt)
                vf.pts = i
                packets += [bytes(p) for p in ctx.encode(vf)]
            packets += [bytes(p) for p in ctx.encode(None)]
        except av.error.FFmpegError as e:
            raise ClbenchError(f"video codec {self.spec}: {self.encoder} failed: {e}") from None
        if len(packets) != t:
            raise ClbenchError(
                f"video codec {self.spec}: {len(packets)} packets for {t} frames; "
                "the encoder is not configured one packet per frame"
            )
        packets[0] = struct.pack("<HH", h, w) + packets[0]
        return packets

    def _decode(self, data: list[bytes]) -> np.ndarray:
        import av

        if len(data[0]) < 4:
            raise CorruptDataError(f"video codec {self.spec}: frame 0 is truncated")
        h, w = struct.unpack_from("<HH", data[0])
        ctx = av.CodecContext.create(self.decoder, "r")
        # one decoding thread: dav1d's frame threads deadlocked on damaged packets
        ctx.thread_count = 1
        out = []
        try:
            for i, b in enumerate([data[0][4:], *data[1:]]):
                try:
                    out += ctx.decode(av.Packet(b))
                except av.error.FFmpegError as e:
                    raise CorruptDataError(
                        f"video codec {self.spec}: frame {i} cannot be decoded ({e}); "
                        "the bitstream is truncated, corrupt or from another codec"
                    ) from None
            out += ctx.decode(None)
        except av.error.FFmpegError as e:
            raise CorruptDataError(f"video codec {self.spec}: decoding failed ({e})") from None
        if len(out) != len(data):
            raise CorruptDataError(
                f"video codec {self.spec}: {len(data)} frames in, {len(out)} decoded; "
                f"frame {len(out)} is missing or damaged"
            )
        return np.stack([f.to_ndarray(format="rgb24")[:h, :w] for f in out])


def _params(d: dict[str, Any]) -> str:
    return ":".join(f"{k}={v}" for k, v in d.items())


@register_video_codec("x264")
class X264(PyAVCodec):
    """H.264 / AVC with libx264 (low-delay P, crf)."""

    encoder, decoder = "libx264", "h264"

    def ffmpeg_options(self) -> dict[str, str]:
        params = {"bframes": 0, "keyint": self.gop, "min-keyint": self.gop, "scenecut": 0}
        return {"preset": self.preset, "crf": str(self.crf), "x264-params": _params(params)}


@register_video_codec("x265")
class X265(PyAVCodec):
    """H.265 / HEVC with libx265 (low-delay P, crf)."""

    encoder, decoder = "libx265", "hevc"

    def ffmpeg_options(self) -> dict[str, str]:
        params = {
            "bframes": 0,
            "keyint": self.gop,
            "min-keyint": self.gop,
            "scenecut": 0,
            "log-level": "error",
        }
        return {"preset": self.preset, "crf": str(self.crf), "x265-params": _params(params)}


@register_video_codec("svtav1")
class SVTAV1(PyAVCodec):
    """AV1 with SVT-AV1 (low-delay prediction structure, crf); decoded by dav1d."""

    encoder, decoder = "libsvtav1", "libdav1d"

    def ffmpeg_options(self) -> dict[str, str]:
        params = {"pred-struct": 1, "keyint": self.gop, "scd": 0}
        return {"preset": self.preset, "crf": str(self.crf), "svtav1-params": _params(params)}


@register_video_codec("vp9")
class VP9(PyAVCodec):
    """VP9 with libvpx (no alt-ref lag: low delay; constant quality)."""

    encoder, decoder = "libvpx-vp9", "vp9"

    def ffmpeg_options(self) -> dict[str, str]:
        return {
            "crf": str(self.crf),
            "b": "0",
            "lag-in-frames": "0",
            "auto-alt-ref": "0",
            "deadline": "good",
            "cpu-used": self.preset,
            "row-mt": "1",
        }
