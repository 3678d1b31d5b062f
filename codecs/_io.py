"""Small file helpers shared by eval and train: image discovery and atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clbench.errors import ClbenchError

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


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write through a temp file in the same folder, then os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give them the usual mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, allow_nan=True))


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def data_path(path: str | None, data_root: str | None) -> str | None:
    """A user path: absolute or existing as given, else under the data root
    (``--data-root``, else ``$CLBENCH_DATA_ROOT``, else ./data)."""
    from clbench.data import resolve_data_root

    if path is None or os.path.isabs(path) or Path(path).exists():
        return path
    return str(resolve_data_root(data_root) / path)
