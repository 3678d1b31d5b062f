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


def load_weights_file(path: str | os.PathLike, who: str, fix: str) -> Any:
    """``torch.load(path, weights_only=True)`` of a codec checkpoint, every failure one line:
    ``codec WHO: checkpoint P does not exist; FIX`` or ``... cannot load checkpoint P: why``."""
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise ClbenchError(f"codec {who}: checkpoint {p} does not exist; {fix}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ClbenchError(
            f"codec {who}: cannot load checkpoint {p}: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None
