"""The image-set contract every dataset loader returns, and the data-root lookup.

A loader returns a :class:`ImageSet` per split. Images are either held in memory as one
uint8 array (N, H, W, 3) (small sets: digits, CIFAR, Tiny-ImageNet) or as file paths that
are decoded lazily (ImageNet, Food-101, VFN-74, ImageNet-R/A, VTAB). Labels are the
dataset's own class indices 0..C-1 in ``classes`` order; the scenario remaps them to the
benchmark's class order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from clbench.errors import ClbenchError, DataNotFoundError

DATA_ROOT_ENV = "CLBENCH_DATA_ROOT"


def resolve_data_root(root: str | os.PathLike | None) -> Path:
    """The data root: the explicit option, else ``$CLBENCH_DATA_ROOT``, else ``./data``."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else Path("data")


def load_rgb(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one image file to uint8 HWC RGB; a corrupt or unreadable file names itself.

    ``size`` = (height, width) resizes with bilinear filtering (antialiased when shrinking).
    """
    try:
        with Image.open(path) as im:
            return _resize(im.convert("RGB"), size)
    except FileNotFoundError:
        raise DataNotFoundError(f"image file {path} is missing; re-extract the dataset") from None
    except Exception as e:  # PIL raises several types for truncated/corrupt files
        raise ClbenchError(
            f"cannot decode image {path}: {e}; delete or replace the corrupt file"
        ) from None


def _resize(im: Image.Image, size: tuple[int, int] | None) -> np.ndarray:
    """``im`` as a uint8 array, resized to ``size`` = (height, width) when given and different."""
    if size is not None and im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(im)


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
        A corrupt file raises :class:`ClbenchError` naming it.
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
        first = load_rgb(paths[0], hw)
        out = np.empty((len(paths), *first.shape), dtype=np.uint8)
        out[0] = first

        def decode(chunk: range) -> None:
            for i in chunk:
                im = load_rgb(paths[i], hw)
                if im.shape != first.shape:
                    raise ClbenchError(
                        f"{self.name or 'image set'}: {paths[i]} is {im.shape[1]}x{im.shape[0]}"
                        f" but {paths[0]} is {first.shape[1]}x{first.shape[0]}; pass size= to "
                        "materialize() to resize every image to one size"
                    )
                out[i] = im

        # One task per chunk keeps the number of futures small for 100k+ images.
        chunks = [range(i, min(i + 256, len(paths))) for i in range(1, len(paths), 256)]
        workers = min(num_workers or min(8, os.cpu_count() or 1), max(len(chunks), 1))
        if workers <= 1:
            for chunk in chunks:
                decode(chunk)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for future in [pool.submit(decode, c) for c in chunks]:
                    future.result()  # re-raises the first error (e.g. a corrupt file) here
        return replace(self, images=out, paths=None)

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
