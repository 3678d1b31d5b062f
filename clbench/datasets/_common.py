"""Helpers shared by the loaders: locating a dataset folder, listing image folders, the
one-line not-found message, and the class lists shipped with the package."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clbench.data import DATA_ROOT_ENV
from clbench.errors import ClbenchError, DataNotFoundError

# torchvision's IMG_EXTENSIONS, matched case-insensitively as ImageFolder does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

SPLITS_DIR = Path(__file__).with_name("splits")


def locate(root: Path, candidates: Sequence[str], required: Sequence[str]) -> Path | None:
    """The first ``root / candidate`` holding every ``required`` relative path, else None.

    Candidates let one loader accept the usual places a dataset ends up: its conventional
    sub-folder of the data root, or the data root pointing at the dataset folder itself (".").
    """
    for candidate in candidates:
        base = root / candidate
        if all((base / r).exists() for r in required):
            return base
    return None


def not_found(what: str, expected: str | os.PathLike, how: str, root: Path) -> DataNotFoundError:
    """The one-line missing-data error: what, the full expected path, how to get it, root."""
    return DataNotFoundError(
        f"{what} not found: expected {expected}. {how} The data root is "
        f"{Path(root).absolute()} (set it with --data-root or ${DATA_ROOT_ENV}; default ./data)."
    )


def list_class_folder(class_dir: Path) -> list[str]:
    """Image files under ``class_dir`` (recursively, sorted) exactly as torchvision's
    ``make_dataset`` lists them; a class folder without images is an error naming it."""
    files = [
        os.path.join(dirpath, name)
        for dirpath, _, names in sorted(os.walk(class_dir, followlinks=True))
        for name in sorted(names)
        if name.lower().endswith(IMG_EXTENSIONS)
    ]
    if not files:
        raise DataNotFoundError(
            f"no images ({', '.join(IMG_EXTENSIONS)}) in class folder {class_dir.absolute()}"
        )
    return files


def list_image_folder(
    directory: Path, classes: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray, list[str]]:
    """(paths, targets, classes) of an ImageFolder tree ``directory/<class>/**/<image>``.

    Same listing as torchvision's ``ImageFolder`` (classes = sorted sub-folder names, files
    sorted, its extensions) but through ``os.scandir`` with our own errors, and hidden
    folders (``.ipynb_checkpoints``) are not classes. With ``classes`` given (the train
    split's), the folder must hold exactly those classes, so train and test labels agree by
    name rather than by position.
    """
    found = sorted(e.name for e in os.scandir(directory) if e.is_dir() and e.name[0] != ".")
    if classes is None:
        classes = found
        if not classes:
            raise DataNotFoundError(f"no class folders in {directory.absolute()}")
    elif found != sorted(classes):
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        detail = "; ".join(
            s
            for s in (
                f"missing {len(missing)} (e.g. {', '.join(missing[:3])})" if missing else "",
                f"unexpected {len(extra)} (e.g. {', '.join(extra[:3])})" if extra else "",
            )
            if s
        )
        raise ClbenchError(
            f"class folders of {directory.absolute()} differ from the train split's: {detail}"
        )
    paths: list[str] = []
    targets: list[np.ndarray] = []
    for label, name in enumerate(classes):
        files = list_class_folder(directory / name)
        paths += files
        targets.append(np.full(len(files), label, dtype=np.int64))
    return paths, np.concatenate(targets), list(classes)


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a text list, without ``#`` comment lines."""
    with open(path, encoding="utf-8") as f:
        lines = (line.strip() for line in f)
        return [line for line in lines if line and not line.startswith("#")]
