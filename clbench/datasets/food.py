"""Food datasets (lazy paths): Food-101 in torchvision's layout and VFN-74 in ours.

Food-101's file list is read from its meta JSON like ``torchvision.datasets.Food101`` does
(which keeps the list in private attributes, so we do not build on it); torchvision is used
to download. VFN is distributed on request only, so clbench defines its layout (below and
in docs/datasets.md) rather than guessing one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from clbench.data import ImageSet
from clbench.datasets import register_dataset
from clbench.datasets._common import locate, not_found, read_lines
from clbench.errors import ClbenchError, DataNotFoundError

FOOD101_URL = "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/"
VFN_URL = "https://lorenz.ecn.purdue.edu/~vfn/"


def _image_set(
    paths: list[str], targets: list[int], classes: list[str], name: str, meta: dict
) -> ImageSet:
    return ImageSet(
        targets=np.asarray(targets, dtype=np.int64),
        paths=paths,
        classes=classes,
        name=name,
        meta=meta,
    )


@register_dataset("food101")
def load_food101(root: Path, *, download: bool = False) -> tuple[ImageSet, ImageSet]:
    """Food-101 (75,750 train / 25,250 test, 101 classes) from food-101/meta/{train,test}.json."""
    required = ("meta/train.json", "meta/test.json", "images")
    base = locate(root, ("food-101", "."), required)
    if base is None and download:
        import torchvision.datasets

        root.mkdir(parents=True, exist_ok=True)
        torchvision.datasets.Food101(str(root), split="train", download=True)
        base = locate(root, ("food-101", "."), required)
    if base is None:
        raise not_found(
            "Food-101",
            (root / "food-101").absolute() / "{meta/train.json,meta/test.json,images/}",
            "Pass download=True (benchmark YAML: download: true) to fetch it (5 GB) with "
            f"torchvision, or extract food-101.tar.gz from {FOOD101_URL} into the data root.",
            root,
        )
    splits = {}
    for split in ("train", "test"):
        try:
            with open(base / "meta" / f"{split}.json", encoding="utf-8") as f:
                splits[split] = json.load(f)  # {class: ["class/image_id", ...]}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ClbenchError(f"cannot parse {base / 'meta' / f'{split}.json'}: {e}") from None
    classes = sorted(splits["train"])  # torchvision's Food101 label order
    if sorted(splits["test"]) != classes:
        raise ClbenchError(f"{base / 'meta'}: train.json and test.json name different classes")
    missing = [c for c in classes if not (base / "images" / c).is_dir()]
    if missing:
        raise DataNotFoundError(
            f"Food-101: {len(missing)} class folders missing under "
            f"{(base / 'images').absolute()} (e.g. {missing[0]}); re-extract the archive"
        )
    # meta/labels.txt holds readable names ("Apple pie") line by line with meta/classes.txt.
    classes_txt, labels_txt = base / "meta" / "classes.txt", base / "meta" / "labels.txt"
    readable = {}
    if classes_txt.is_file() and labels_txt.is_file():
        keys, names = read_lines(classes_txt), read_lines(labels_txt)
        if len(keys) == len(names):
            readable = dict(zip(keys, names, strict=True))
    class_names = [readable.get(c, c) for c in classes]
    images_dir = os.fspath(base / "images")
    out = []
    for split in ("train", "test"):
        paths, targets = [], []
        index = {c: i for i, c in enumerate(classes)}
        for cls, rels in splits[split].items():  # file order, as torchvision lists them
            label = index[cls]
            paths += [os.path.join(images_dir, *f"{rel}.jpg".split("/")) for rel in rels]
            targets += [label] * len(rels)
        meta = {"root": str(base), "split": split, "class_names": class_names}
        out.append(_image_set(paths, targets, classes, f"food101/{split}", meta))
    return out[0], out[1]


VFN74_LAYOUT = (
    "vfn74/<class>/<image> plus vfn74/train.txt and vfn74/test.txt listing one <class>/<image> "
    "path per line (optional vfn74/classes.txt: one class per line, fixes the label order)"
)


@register_dataset("vfn74")
def load_vfn74(root: Path, *, download: bool = False) -> tuple[ImageSet, ImageSet]:
    """VFN-74 (VIPER-FoodNet, 74 classes) in clbench's layout: class folders + list files.

    Each line of train.txt / test.txt is an image path relative to ``vfn74/`` whose first
    component is its class. Labels follow ``classes.txt`` if present, else the sorted class
    names found in train.txt. Every listed file must exist (checked here, cheaply, because
    hand-arranged copies are where mistakes happen).
    """
    base = locate(root, ("vfn74", "VFN74", "vfn-74", "."), ("train.txt", "test.txt"))
    if base is None:
        raise not_found(
            "VFN-74",
            (root / "vfn74").absolute() / "{train.txt,test.txt,<class>/<image>}",
            f"VFN is distributed on request by Purdue's VIPER lab ({VFN_URL}); it cannot be "
            f"downloaded automatically. Arrange it as {VFN74_LAYOUT}; see docs/datasets.md.",
            root,
        )
    lists = {split: read_lines(base / f"{split}.txt") for split in ("train", "test")}
    for split, lines in lists.items():
        bad = [line for line in lines if len(Path(line).parts) < 2]
        if bad:
            raise ClbenchError(
                f"{base / f'{split}.txt'}: line {bad[0]!r} is not a <class>/<image> path"
            )
    classes_txt = base / "classes.txt"
    if classes_txt.is_file():
        classes = read_lines(classes_txt)
    else:
        classes = sorted({Path(line).parts[0] for line in lists["train"]})
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for split, lines in lists.items():
        unknown = sorted({Path(line).parts[0] for line in lines} - set(index))
        if unknown:
            source = "classes.txt" if classes_txt.is_file() else "train.txt"
            raise ClbenchError(
                f"{base / f'{split}.txt'} uses classes not in {source}: {unknown[:3]}"
            )
        paths = [os.path.join(base, *Path(line).parts) for line in lines]
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
            raise DataNotFoundError(
                f"VFN-74: {len(absent)} files listed in {base / f'{split}.txt'} are missing "
                f"(e.g. {absent[0]}); expected layout: {VFN74_LAYOUT}"
            )
        targets = [index[Path(line).parts[0]] for line in lines]
        meta = {"root": str(base), "split": split}
        out.append(_image_set(paths, targets, classes, f"vfn74/{split}", meta))
    empty = sorted(set(classes) - {Path(line).parts[0] for line in lists["train"]})
    if empty:
        raise ClbenchError(f"VFN-74: classes without training images in train.txt: {empty[:3]}")
    return out[0], out[1]
