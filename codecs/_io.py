"""Small file helpers shared by eval and train: image discovery and atomic writes (through
clbench.records' single atomic-write primitive)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from clbench.errors import ClbenchError
from clbench.records import write_text_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def find_images(root: str | os.PathLike, what: str = "image folder") -> list[Path]:
    """Image files under ``root`` (recursive, sorted, case-insensitive suffixes)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ClbenchError(
            f"{what} {root} does not exist; pass an existing folder (or set --data-root)"
        )
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files.extend(Path(dirpath) / f for f in filenames if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise ClbenchError(f"{what} {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(files)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    # allow_nan: a lossless codec's PSNR is inf, which eval results keep as written
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=True))


def write_text(path: str | os.PathLike, text: str) -> None:
    write_text_atomic(path, text)


def data_path(path: str | None, data_root: str | None) -> str | None:
    """A user path: absolute or existing as given, else under the data root
    (``--data-root``, else ``$CLBENCH_DATA_ROOT``, else ./data)."""
    from clbench.data import resolve_data_root

    if path is None or os.path.isabs(path) or Path(path).exists():
        return path
    return str(resolve_data_root(data_root) / path)
