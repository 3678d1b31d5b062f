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
from dataclasses import dataclass, field
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


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode one image file to uint8 HWC RGB; a corrupt or unreadable file names itself."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataNotFoundError(f"image file {path} is missing; re-extract the dataset") from None
    except Exception as e:  # PIL raises several types for truncated/corrupt files
        raise ClbenchError(
            f"cannot decode image {path}: {e}; delete or replace the corrupt file"
        ) from None


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
