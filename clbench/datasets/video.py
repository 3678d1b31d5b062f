"""Video clips: decoding, clip sampling and padding for video codecs.

Layouts (each one a reader in ``READERS``, chosen by the file suffix or by being a folder):

- ``container``: mp4, mkv, avi, mov, webm and y4m files, decoded with PyAV (FFmpeg is in
  its wheels; y4m is read by FFmpeg's yuv4mpegpipe demuxer, as UVG and MCL-JCV ship it);
- ``raw``: raw YUV 4:2:0 (``.yuv``), as the HEVC class B sequences are distributed. The size
  comes from the name (``BasketballDrive_1920x1080_50.yuv``); ``10bit`` in the name reads
  ``yuv420p10le``;
- ``frames``: a folder of PNG frames (sorted by name) is one clip, as Vimeo-90k's
  ``sequences/00001/0001/im1.png..im7.png`` are.

Every frame becomes uint8 RGB through the same swscale conversion (PyAV ``rgb24``), so
the learned and the classic codecs start from identical pixels.

:class:`VideoClips` samples clips of ``frames`` frames ``stride`` apart, randomly cropped
for training or whole; :class:`PseudoVideo` makes clips by sliding a crop window across
still images (training data when no video set is at hand); :func:`pad_frames` pads whole
frames to a model's multiple and :func:`crop_frames` undoes it. The ``video`` entry of the
dataset registry exposes the frames of clips as an image set.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clbench.data import ImageSet, load_rgb
from clbench.datasets import register_dataset
from clbench.datasets._common import IMG_EXTENSIONS, not_found
from clbench.errors import ClbenchError, DataNotFoundError

__all__ = [
    "READERS",
    "PseudoVideo",
    "VideoClips",
    "crop_frames",
    "find_videos",
    "layout_of",
    "pad_frames",
    "read_video",
]

CONTAINER_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".y4m")
RAW_SUFFIXES = (".yuv",)
FRAME_SUFFIXES = (".png",)


def _container(path: Path, fmt: str | None = None, options: dict | None = None) -> np.ndarray:
    import av

    frames = []
    try:
        with av.open(str(path), format=fmt, options=options or {}) as c:
            if not c.streams.video:
                raise ClbenchError(f"video file {path} has no video stream")
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in c.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
    except ClbenchError:
        raise
    except FileNotFoundError:
        raise DataNotFoundError(f"video file {path} does not exist") from None
    except Exception as e:  # PyAV raises its own error types for each FFmpeg failure
        raise ClbenchError(
            f"cannot decode video file {path}: {type(e).__name__}: {e}; replace the file"
        ) from None
    if not frames:
        raise ClbenchError(f"video file {path} holds no decodable frames; replace the file")
    return np.stack(frames)


_SIZE_RE = re.compile(r"(\d{2,5})x(\d{2,5})")


def _raw(path: Path) -> np.ndarray:
    m = _SIZE_RE.search(path.name)
    if not m:
        raise ClbenchError(
            f"raw YUV file {path}: its name does not give the frame size; rename it "
            "NAME_WIDTHxHEIGHT.yuv (e.g. BasketballDrive_1920x1080_50.yuv)"
        )
    w, h = int(m.group(1)), int(m.group(2))
    ten = "10bit" in path.name.lower()
    frame_bytes = w * h * 3 // 2 * (2 if ten else 1)
    if path.is_file() and path.stat().st_size % frame_bytes:
        raise ClbenchError(
            f"raw YUV file {path} is {path.stat().st_size} bytes, not a whole number of "
            f"{w}x{h} 4:2:0 frames ({frame_bytes} bytes each): truncated, or the size in its name is wrong"
        )
    fmt = "yuv420p10le" if ten else "yuv420p"
    return _container(path, "rawvideo", {"video_size": f"{w}x{h}", "pixel_format": fmt})


def _frames(path: Path) -> np.ndarray:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise DataNotFoundError(f"frame folder {path} holds no PNG frames")
    frames = [load_rgb(p) for p in files]
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise ClbenchError(f"frame folder {path}: frames differ in size ({sorted(sizes)})")
    return np.stack(frames)


# Layout name -> reader; ``layout_of`` picks one. A new format is one more entry.
READERS: dict[str, Callable[[Path], np.ndarray]] = {
    "container": _container,
    "raw": _raw,
    "frames": _frames,
}
_SUFFIX_LAYOUT = {s: "container" for s in CONTAINER_SUFFIXES} | {s: "raw" for s in RAW_SUFFIXES}


def layout_of(path: str | os.PathLike) -> str:
    """The reader layout of ``path``: a folder is ``frames``, a file goes by its suffix."""
    p = Path(path)
    if p.is_dir():
        return "frames"
    layout = _SUFFIX_LAYOUT.get(p.suffix.lower())
    if layout is None:
        raise ClbenchError(
            f"video file {p}: unknown suffix {p.suffix!r}; use one of "
            f"{', '.join(sorted(_SUFFIX_LAYOUT))} or a folder of PNG frames"
        )
    return layout


def read_video(
    path: str | os.PathLike, max_frames: int | None = None, start: int = 0
) -> np.ndarray:
    """All frames of a clip as uint8 (T, H, W, 3) RGB (frames ``start`` .. ``start+max_frames``).

    A missing file or an undecodable one raises a one-line error naming it.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataNotFoundError(f"video file {p} does not exist")
    frames = READERS[layout_of(p)](p)
    end = None if max_frames is None else start + max_frames
    return frames[start:end]


def find_videos(root: str | os.PathLike) -> list[Path]:
    """Clips under ``root``: itself if it is a video file or a PNG-frame folder, else every
    video file and every folder holding PNG frames below it (sorted)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataNotFoundError(f"video path {root} does not exist")
    if root.is_file():
        layout_of(root)
        return [root]
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        d = Path(dirpath)
        if any(f.lower().endswith(FRAME_SUFFIXES) for f in filenames):
            out.append(d)
        out.extend(d / f for f in sorted(filenames) if Path(f).suffix.lower() in _SUFFIX_LAYOUT)
    if not out:
        raise DataNotFoundError(
            f"no videos under {root} ({', '.join(sorted(_SUFFIX_LAYOUT))}, or folders of PNG frames)"
        )
    return sorted(out)


# ---------------------------------------------------------------------------------------
# padding


def pad_frames(frames: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad (T, H, W, 3) or (H, W, 3) frames at the bottom/right by edge replication to a
    multiple of ``multiple``; returns the padded frames and the original (H, W)."""
    h, w = frames.shape[-3:-1]
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        pad = [(0, 0)] * (frames.ndim - 3) + [(0, ph), (0, pw), (0, 0)]
        frames = np.pad(frames, pad, mode="edge")
    return frames, (h, w)


def crop_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Undo :func:`pad_frames`: keep the top-left (H, W)."""
    h, w = size
    return frames[..., :h, :w, :]


# ---------------------------------------------------------------------------------------
# clip datasets


def _randint(high: int) -> int:
    """A draw from torch's RNG, so that DataLoader seeding makes runs repeatable."""
    import torch

    return int(torch.randint(0, high, ()).item()) if high > 1 else 0


class VideoClips:
    """Clips of ``frames`` frames, ``stride`` frames apart, from one or more videos.

    Clip starts are every ``hop`` frames. With ``crop`` each item is a random
    ``crop`` x ``crop`` window (the same for all its frames; smaller frames are edge-padded):
    training. Without it items are whole frames: evaluation, padded later by the codec.
    Items are uint8 (T, H, W, 3) arrays. Videos are decoded once and kept in memory.
    """

    def __init__(
        self,
        sources: Sequence[str | os.PathLike],
        frames: int,
        stride: int = 1,
        hop: int = 1,
        crop: int | None = None,
        max_frames: int | None = None,
    ):
        if frames < 1 or stride < 1 or hop < 1:
            raise ClbenchError("video clips: frames, stride and hop must be >= 1")
        self.frames, self.stride, self.crop = frames, stride, crop
        span = (frames - 1) * stride + 1
        self.videos: list[np.ndarray] = []
        self.names: list[str] = []
        self.index: list[tuple[int, int]] = []
        for src in sources:
            v = read_video(src, max_frames)
            if len(v) < span:
                raise ClbenchError(
                    f"video {src} has {len(v)} frames, fewer than a clip of {frames} frames "
                    f"{stride} apart needs ({span}); lower the clip length or stride"
                )
            k = len(self.videos)
            self.videos.append(v)
            self.names.append(Path(src).name)
            self.index.extend((k, s) for s in range(0, len(v) - span + 1, hop))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        k, s = self.index[i]
        clip = self.videos[k][s : s + (self.frames - 1) * self.stride + 1 : self.stride]
        if self.crop is None:
            return clip
        p = self.crop
        h, w = clip.shape[1:3]
        if h < p or w < p:
            clip = np.pad(clip, ((0, 0), (0, max(0, p - h)), (0, max(0, p - w)), (0, 0)), "edge")
            h, w = clip.shape[1:3]
        top, left = _randint(h - p + 1), _randint(w - p + 1)
        return np.ascontiguousarray(clip[:, top : top + p, left : left + p])


class PseudoVideo:
    """Clips made by sliding a ``crop`` window across a still image at a random constant
    velocity of up to ``max_speed`` pixels per frame (limited so the window stays inside).

    Pure translation is the simplest motion a temporal prior must learn; stills give the
    content variety that the three clips here lack (see docs/video.md). Items are uint8
    (T, crop, crop, 3).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        frames: int,
        crop: int,
        max_speed: float = 2.0,
        limit: int | None = None,
        seed: int = 0,
    ):
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise DataNotFoundError(f"image folder {root} does not exist")
        files = sorted(
            Path(d) / f
            for d, _, names in os.walk(root)
            for f in names
            if f.lower().endswith(IMG_EXTENSIONS)
        )
        if not files:
            raise DataNotFoundError(f"image folder {root} holds no images")
        if limit and len(files) > limit:
            pick = np.random.default_rng(seed).choice(len(files), limit, replace=False)
            files = [files[i] for i in sorted(pick)]
        self.files, self.frames, self.crop, self.max_speed = files, frames, crop, max_speed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        import torch

        img = load_rgb(self.files[i])
        p, t = self.crop, self.frames
        h, w = img.shape[:2]
        if h < p or w < p:
            img = np.pad(img, ((0, max(0, p - h)), (0, max(0, p - w)), (0, 0)), "edge")
            h, w = img.shape[:2]
        pos = []
        for room in (h - p, w - p):
            vmax = min(self.max_speed, room / max(t - 1, 1))
            v = (float(torch.rand(())) * 2 - 1) * vmax
            travel = abs(v) * (t - 1)
            start = float(torch.rand(())) * (room - travel) + (travel if v < 0 else 0)
            pos.append([int(round(start + v * k)) for k in range(t)])
        out = [img[y : y + p, x : x + p] for y, x in zip(*pos, strict=True)]
        return np.ascontiguousarray(np.stack(out))


# ---------------------------------------------------------------------------------------
# the registry entry: frames of clips as an image set


@dataclass(frozen=True)
class _Split:
    images: np.ndarray
    clips: list[dict]


def _frames_of(root: Path, paths: Sequence[str], size: int | None, max_frames: int | None):
    from PIL import Image

    arrays, clips, start = [], [], 0
    for rel in paths:
        p = Path(rel) if os.path.isabs(rel) else root / rel
        v = read_video(p, max_frames)
        if size is not None:  # center square crop, then resize: the usual image-set view
            h, w = v.shape[1:3]
            s = min(h, w)
            top, left = (h - s) // 2, (w - s) // 2
            v = np.stack(
                [
                    np.asarray(
                        Image.fromarray(f[top : top + s, left : left + s]).resize(
                            (size, size), Image.Resampling.BILINEAR
                        )
                    )
                    for f in v
                ]
            )
        arrays.append(v)
        clips.append({"clip": p.name, "first": start, "frames": len(v)})
        start += len(v)
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        raise ClbenchError(
            f"dataset video: clips {', '.join(c['clip'] for c in clips)} differ in frame size; "
            "set the dataset option size=N to center-crop and resize every frame to N x N"
        )
    return _Split(np.concatenate(arrays), clips)


@register_dataset("video")
def load_video(
    root: Path,
    *,
    download: bool = False,
    train: Sequence[str] = ("video/bigbuckbunny.mp4",),
    test: Sequence[str] = ("video/carphone_pristine.mp4", "video/bikes.mp4"),
    size: int | None = 144,
    max_frames: int | None = None,
) -> tuple[ImageSet, ImageSet]:
    """Frames of video clips (mp4/mkv/avi/y4m via PyAV, raw YUV 4:2:0, PNG-frame folders)."""
    if download:
        raise ClbenchError("dataset video has no download; put the clips under the data root")
    if isinstance(train, str):
        train = [train]
    if isinstance(test, str):
        test = [test]
    missing = [p for p in [*train, *test] if not (Path(root) / p).exists()]
    if missing:
        raise not_found(
            f"video clip(s) {', '.join(missing)}",
            Path(root).absolute() / missing[0],
            "Put the clips (mp4/mkv/avi/y4m/.yuv or PNG-frame folders) there, or name others "
            "with the train/test options; see docs/video.md.",
            Path(root),
        )
    splits = [_frames_of(Path(root), paths, size, max_frames) for paths in (train, test)]
    return tuple(
        ImageSet(
            targets=np.zeros(len(s.images), np.int64),
            classes=["frame"],
            images=s.images,
            name=f"video/{split}",
            meta={"clips": s.clips},
        )
        for split, s in zip(("train", "test"), splits, strict=True)
    )
