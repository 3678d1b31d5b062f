"""Small file helpers shared by eval and train: image discovery and atomic writes (through
clbench.records' single atomic-write primitive)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict
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


def write_train_log(
    out: str | os.PathLike,
    cfg: Any,
    history: list[dict[str, Any]],
    complete: bool,
    best_val: float | None = None,
    provenance: Mapping[str, Any] | None = None,
    **extra: Any,
) -> None:
    """``OUT/train_log.json``, the small committable record of every codec training (the
    weights are not committed): its config (a dataclass), whether it finished and its best
    validation loss (a driver skips a finished run from the log alone, its weights may be
    gone), where it ran (git commit, CPU, packages), then ``extra`` and the history."""
    best = best_val if best_val is not None and math.isfinite(best_val) else None
    doc = {"config": asdict(cfg), "complete": complete, "best_val": best, **extra}
    if provenance is not None:
        doc["provenance"] = dict(provenance)
    write_json(Path(out) / "train_log.json", {**doc, "history": history})


def train_log_cpu(doc: Mapping[str, Any]) -> str | None:
    """The CPU model a ``train_log.json`` says its run trained on (None: a log from before
    logs said so)."""
    return ((doc.get("provenance") or {}).get("cpu") or {}).get("model")


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
