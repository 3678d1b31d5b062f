"""Tiny-ImageNet-200 in its original layout (lazy paths; 64x64, so ``materialize()`` is cheap).

torchvision has no Tiny-ImageNet dataset class, hence this loader. Layout::

    tiny-imagenet-200/wnids.txt, words.txt
    tiny-imagenet-200/train/<wnid>/images/<wnid>_<i>.JPEG
    tiny-imagenet-200/val/images/val_<i>.JPEG + val/val_annotations.txt

The official val split is the test split (the official test split has no labels). Classes
are the wnids sorted, which is what ImageFolder-based code (PyCIL-style loaders over
``train/``) gets; PODNet uses ``os.listdir`` order, which depends on the file system.
Loading only lists directories; nothing is decoded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from clbench.data import ImageSet
from clbench.datasets import register_dataset
from clbench.datasets._common import IMG_EXTENSIONS, locate, not_found, read_lines
from clbench.errors import ClbenchError, DataNotFoundError

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
_REQUIRED = ("wnids.txt", "train", "val/images", "val/val_annotations.txt")


def _class_names(words: Path, wnids: list[str]) -> list[str]:
    """Readable names from words.txt ("n02124075<TAB>Egyptian cat"); the wnid if absent."""
    names = {}
    if words.is_file():
        wanted = set(wnids)
        with open(words, encoding="utf-8") as f:
            for line in f:
                wnid, _, name = line.rstrip("\n").partition("\t")
                if wnid in wanted:
                    names[wnid] = name
    return [names.get(w, w) for w in wnids]


@register_dataset("tinyimagenet", "tiny-imagenet", "tinyimagenet200")
def load_tinyimagenet(root: Path, *, download: bool = False) -> tuple[ImageSet, ImageSet]:
    """Tiny-ImageNet-200 (100,000 train / 10,000 val as test, 64x64, 200 classes)."""
    base = locate(root, ("tiny-imagenet-200", "."), _REQUIRED)
    if base is None and download:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(TINY_URL, download_root=str(root), md5=TINY_MD5)
        base = locate(root, ("tiny-imagenet-200", "."), _REQUIRED)
    if base is None:
        raise not_found(
            "Tiny-ImageNet-200",
            (root / "tiny-imagenet-200").absolute()
            / "{wnids.txt,train/<wnid>/images/,val/images/,val/val_annotations.txt}",
            f"Pass download=True (benchmark YAML: download: true) to fetch {TINY_URL}, or "
            "unzip it into the data root.",
            root,
        )
    classes = sorted(read_lines(base / "wnids.txt"))
    index = {w: i for i, w in enumerate(classes)}

    train_paths: list[str] = []
    train_targets: list[np.ndarray] = []
    for label, wnid in enumerate(classes):
        folder = base / "train" / wnid / "images"
        try:
            names = sorted(
                e.name for e in os.scandir(folder) if e.name.lower().endswith(IMG_EXTENSIONS)
            )
        except FileNotFoundError:
            raise DataNotFoundError(
                f"Tiny-ImageNet-200: class folder {folder.absolute()} is missing "
                f"({wnid} is listed in wnids.txt); re-extract the archive"
            ) from None
        if not names:
            raise DataNotFoundError(f"Tiny-ImageNet-200: no images in {folder.absolute()}")
        prefix = os.fspath(folder) + os.sep
        train_paths += [prefix + n for n in names]
        train_targets.append(np.full(len(names), label, dtype=np.int64))

    annotations = base / "val" / "val_annotations.txt"
    val_dir = os.fspath(base / "val" / "images") + os.sep
    val_paths, val_targets = [], []
    with open(annotations, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split("\t")  # file, wnid, x0, y0, x1, y1 (boxes unused)
            if len(fields) < 2 or fields[1] not in index:
                raise ClbenchError(
                    f"{annotations}:{lineno}: expected '<file>\\t<wnid>\\t...' with a wnid from "
                    f"wnids.txt, got {line.strip()[:80]!r}"
                )
            val_paths.append(val_dir + fields[0])
            val_targets.append(index[fields[1]])

    meta = {"root": str(base), "class_names": _class_names(base / "words.txt", classes)}
    train = ImageSet(
        targets=np.concatenate(train_targets),
        paths=train_paths,
        classes=classes,
        name="tinyimagenet/train",
        meta={**meta, "split": "train"},
    )
    test = ImageSet(
        targets=np.asarray(val_targets, dtype=np.int64),
        paths=val_paths,
        classes=classes,
        name="tinyimagenet/test",
        meta={**meta, "split": "test"},
    )
    return train, test
