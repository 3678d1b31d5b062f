"""The image-set contract every dataset loader returns, and the data-root lookup.

A loader returns a :class:`ImageSet` per split. Images are either held in memory as one
uint8 array (N, H, W, 3) (small sets: digits, CIFAR, Tiny-ImageNet) or as file paths that
are decoded lazily (ImageNet, Food-101, VFN-74, ImageNet-R/A, VTAB). Labels are the
dataset's own class indices 0..C-1 in ``classes`` order; the scenario remaps them to the
benchmark's class order.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from clbench.errors import ClbenchError, DataNotFoundError

DATA_ROOT_ENV = "CLBENCH_DATA_ROOT"


# How many unreadable files one error message lists (the rest are counted).
MAX_LISTED = 10


def resolve_data_root(root: str | os.PathLike | None) -> Path:
    """The data root: the explicit option, else ``$CLBENCH_DATA_ROOT``, else ``./data``.

    A root that is a file is refused here, before the loader reports "not found" for
    every dataset under it."""
    env = os.environ.get(DATA_ROOT_ENV)
    path = Path(root or env or "data").expanduser()
    if path.is_file():
        source = "--data-root (or dataset.root)" if root else f"${DATA_ROOT_ENV}"
        raise DataNotFoundError(
            f"data root {path.absolute()} is a file, not a folder; point {source} at the "
            "folder that holds the datasets"
        )
    return path


def _listing(problems: list[tuple[str, str]]) -> str:
    """``a.jpg (empty file), b.jpg (cannot identify ...)``, at most MAX_LISTED of them."""
    shown = "; ".join(f"{p} ({why})" for p, why in problems[:MAX_LISTED])
    more = len(problems) - MAX_LISTED
    return shown + (f"; and {more} more" if more > 0 else "")


def load_rgb(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one image file to uint8 HWC RGB; a corrupt or unreadable file names itself.

    ``size`` = (height, width) resizes with bilinear filtering (antialiased when shrinking).
    """
    try:
        return _read(path, size)
    except FileNotFoundError:
        raise DataNotFoundError(f"image file {path} is missing; re-extract the dataset") from None
    except Exception as e:  # PIL raises several types for truncated/corrupt files
        raise ClbenchError(
            f"cannot decode image {path}: {_why(path, e)}; delete or replace the corrupt file"
        ) from None


def _read(path: str | os.PathLike, size: tuple[int, int] | None) -> np.ndarray:
    with Image.open(path) as im:
        return _resize(im.convert("RGB"), size)


def _why(path: str | os.PathLike, e: Exception) -> str:
    """Why a file did not decode; an empty file says so instead of PIL's generic message."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _resize(im: Image.Image, size: tuple[int, int] | None) -> np.ndarray:
    """``im`` as a uint8 array, resized to ``size`` = (height, width) when given and different.

    ``np.array`` copies into a writable array: ``np.asarray`` would wrap Pillow's read-only
    buffer, and ``torch.from_numpy`` warns about every such array."""
    if size is not None and im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.array(im)


VERIFY_CACHE_MIN = 20_000  # lazy sets at least this large remember a passed file check


def _verified_marker(paths: list[str], stats: list[os.stat_result | None]) -> Path:
    """The cache file that says this exact set of files (paths, sizes, mtimes) passed
    :meth:`ImageSet.check_files`: ``$CLBENCH_CACHE`` or ``~/.cache/clbench``."""
    h = hashlib.sha256()
    for p, st in zip(paths, stats, strict=True):
        h.update(f"{p}\0{st.st_size if st else -1}\0{st.st_mtime_ns if st else -1}\n".encode())
    root = Path(os.environ.get("CLBENCH_CACHE") or Path.home() / ".cache" / "clbench")
    return root / "verified-files" / h.hexdigest()


@dataclass
class ImageSet:
    """A labelled set of RGB images.

    Exactly one of ``images`` (uint8 array N,H,W,3) or ``paths`` (N file paths) is set.
    ``targets`` are int64 labels into ``classes``.
    """

    targets: np.ndarray
    classes: list[str]
    images: np.ndarray | None = None
    paths: Sequence[str] | None = None
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.targets = np.asarray(self.targets, dtype=np.int64)
        if (self.images is None) == (self.paths is None):
            raise ValueError("ImageSet needs exactly one of images= or paths=")
        n = len(self.images) if self.images is not None else len(self.paths)
        if n != len(self.targets):
            raise ValueError(f"{self.name}: {n} images but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, i: int) -> np.ndarray:
        """uint8 HWC RGB image ``i``."""
        if self.images is not None:
            return self.images[i]
        return load_rgb(self.paths[i])

    def materialize(
        self, num_workers: int | None = None, size: int | tuple[int, int] | None = None
    ) -> ImageSet:
        """This set with every image decoded into one in-memory uint8 array (N, H, W, 3).

        Lazy paths are decoded by a thread pool: Pillow releases the GIL while decoding, so
        threads scale without pickling pixels between processes. All images must share one
        size, or ``size`` (an int for square, or (height, width)) resizes each image as it
        is decoded. An in-memory set is returned unchanged, or resized when ``size`` differs.
        Every file is tried: unreadable ones are named together in one :class:`ClbenchError`.
        """
        hw = None if size is None else ((size, size) if isinstance(size, int) else tuple(size))
        if self.images is not None:
            if hw is None or self.images.shape[1:3] == hw:
                return self
            out = np.empty((len(self.images), *hw, 3), dtype=np.uint8)
            for i, im in enumerate(self.images):
                out[i] = _resize(Image.fromarray(im), hw)
            return replace(self, images=out, paths=None)

        paths = [os.fspath(p) for p in self.paths]
        if not paths:
            return replace(self, images=np.zeros((0, *(hw or (0, 0)), 3), np.uint8), paths=None)
        out: np.ndarray | None = None
        shape0: tuple[int, ...] | None = None
        problems: list[tuple[int, str]] = []  # (index, why) of files that do not decode

        def decode(i: int) -> np.ndarray | None:
            try:
                return _read(paths[i], hw)
            except FileNotFoundError:
                problems.append((i, "missing"))
            except Exception as e:  # collected, so one message names every bad file
                problems.append((i, _why(paths[i], e)))
            return None

        i0 = 0  # the first readable image fixes the shape (and allocates the array)
        while out is None and i0 < len(paths):
            first = decode(i0)
            if first is not None:
                shape0 = first.shape
                out = np.empty((len(paths), *shape0), dtype=np.uint8)
                out[i0] = first
            i0 += 1

        def decode_chunk(chunk: range) -> None:
            for i in chunk:
                im = decode(i)
                if im is None:
                    continue
                if im.shape != shape0:
                    raise ClbenchError(
                        f"{self.name or 'image set'}: {paths[i]} is {im.shape[1]}x{im.shape[0]}"
                        f" but {paths[i0 - 1]} is {shape0[1]}x{shape0[0]}; pass size= to "
                        "materialize() to resize every image to one size"
                    )
                out[i] = im

        # One task per chunk keeps the number of futures small for 100k+ images.
        chunks = [range(i, min(i + 256, len(paths))) for i in range(i0, len(paths), 256)]
        workers = min(num_workers or min(8, os.cpu_count() or 1), max(len(chunks), 1))
        if workers <= 1:
            for chunk in chunks:
                decode_chunk(chunk)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for future in [pool.submit(decode_chunk, c) for c in chunks]:
                    future.result()  # re-raises a size mismatch here
        if problems:
            listed = _listing([(paths[i], why) for i, why in sorted(problems)])
            raise ClbenchError(
                f"{self.name or 'image set'}: {len(problems)} of {len(paths)} image files "
                f"cannot be read: {listed}; delete or replace them"
            )
        return replace(self, images=out, paths=None)

    def check_files(self) -> None:
        """Refuse missing, zero-byte and unidentifiable files of a lazy set, all named in
        one message, before any training.

        Per file a ``stat`` and Pillow's header parse plus ``verify()`` (no pixel decode:
        PNG chunk CRCs are checked, a JPEG's entropy-coded data is not), run by a thread
        pool. Damage that only a full decode finds is named by ``materialize`` (all files
        at once) or, for sets decoded per batch, by the batch that reaches the file."""
        if self.paths is None:
            return
        paths = [os.fspath(p) for p in self.paths]
        # Header parses cost ~0.15 ms a file: seconds for Tiny-ImageNet, minutes for
        # ImageNet on a network disk. A set verified once is remembered by the hash of its
        # paths, sizes and mtimes, so later runs only stat.
        marker = None
        if len(paths) >= VERIFY_CACHE_MIN:  # small sets: the check below is cheap enough
            stats: list[os.stat_result | None] = []
            for p in paths:
                try:
                    stats.append(os.stat(p))
                except OSError:
                    stats.append(None)
            marker = _verified_marker(paths, stats)
            if marker.exists() and all(st and st.st_size for st in stats):
                return

        def check(p: str) -> tuple[str, str] | None:
            try:
                if os.stat(p).st_size == 0:
                    return p, "empty file (0 bytes)"
                with Image.open(p) as im:
                    im.verify()
            except OSError as e:
                if isinstance(e, FileNotFoundError) or not os.path.exists(p):
                    return p, e.strerror or "missing"
                return p, _why(p, e)
            except Exception as e:  # Pillow raises several types for damaged headers
                return p, _why(p, e)
            return None

        workers = min(8, os.cpu_count() or 1)
        if len(paths) < 256 or workers <= 1:
            found = [check(p) for p in paths]
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                found = list(pool.map(check, paths, chunksize=256))
        problems = [f for f in found if f is not None]
        if problems:
            raise ClbenchError(
                f"{self.name or 'image set'}: {len(problems)} of {len(paths)} image files "
                f"cannot be read: {_listing(problems)}; re-extract or replace them"
            )
        if marker is not None:
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
            except OSError:  # a read-only cache only costs the check next time
                pass

    def keep_classes(self, lo: int, hi: int) -> ImageSet:
        """Only classes ``lo..hi-1``, relabelled ``0..hi-lo-1`` (``dataset.class_range``)."""
        keep = np.flatnonzero((self.targets >= lo) & (self.targets < hi))
        sub = self.subset(keep)
        sub.targets = sub.targets - lo
        sub.classes = list(self.classes[lo:hi])
        return sub

    def subset(self, indices: np.ndarray) -> ImageSet:
        indices = np.asarray(indices, dtype=np.int64)
        return ImageSet(
            targets=self.targets[indices],
            classes=self.classes,
            images=None if self.images is None else self.images[indices],
            paths=None if self.paths is None else [self.paths[i] for i in indices],
            name=self.name,
            meta=self.meta,
        )
