"""Tiny datasets written in each format's REAL on-disk layout, for tests/test_datasets.py.

Every writer takes a data root (a pytest tmp_path) and writes the dataset where clbench
expects it. Images are real JPEG/PNG files; file listing never decodes, so most trees reuse
one encoded image's bytes.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(h: int = 8, w: int = 8, value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_image(path: Path, data: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes() if data is None else data)
    return path


def cifar_images(n: int, seed: int) -> np.ndarray:
    """n random NHWC uint8 32x32 images."""
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_batch(images: np.ndarray, labels: Sequence[int], label_key: str) -> dict:
    # The archive stores rows of 3072 bytes: 1024 red, 1024 green, 1024 blue (CHW order).
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return {
        "batch_label": "fixture",
        "filenames": [f"img_{i}.png" for i in range(len(images))],
        "data": data,
        label_key: list(labels),
    }


def write_cifar100(root: Path, classes: Sequence[str], per_class: tuple[int, int] = (2, 1)):
    """cifar-100-python/{train,test,meta} with the real keys; returns the NHWC arrays."""
    base = root / "cifar-100-python"
    out = {}
    for split, k, seed in (("train", per_class[0], 0), ("test", per_class[1], 1)):
        labels = np.repeat(np.arange(len(classes)), k)[::-1].copy()  # not sorted
        images = cifar_images(len(labels), seed)
        batch = _cifar_batch(images, labels, "fine_labels")
        batch["coarse_labels"] = [0] * len(labels)
        _dump(base / split, batch)
        out[split] = (images, labels)
    _dump(base / "meta", {"fine_label_names": list(classes), "coarse_label_names": ["all"]})
    return out


def write_cifar10(root: Path, classes: Sequence[str]):
    """cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}; returns the arrays."""
    base = root / "cifar-10-batches-py"
    train_images, train_labels = [], []
    for i in range(1, 6):
        labels = np.arange(len(classes))
        images = cifar_images(len(labels), 10 + i)
        _dump(base / f"data_batch_{i}", _cifar_batch(images, labels, "labels"))
        train_images.append(images)
        train_labels.append(labels)
    test_labels = np.arange(len(classes))
    test_images = cifar_images(len(test_labels), 99)
    _dump(base / "test_batch", _cifar_batch(test_images, test_labels, "labels"))
    _dump(base / "batches.meta", {"label_names": list(classes), "num_cases_per_batch": 10})
    return {
        "train": (np.concatenate(train_images), np.concatenate(train_labels)),
        "test": (test_images, test_labels),
    }


def write_imagenet(base: Path, wnids: Sequence[str], per_class: tuple[int, int] = (2, 1)) -> None:
    """An ImageNet-style tree base/{train,val}/<wnid>/*.JPEG."""
    data = jpeg_bytes()
    for wnid in wnids:
        for i in range(per_class[0]):
            write_image(base / "train" / wnid / f"{wnid}_{i}.JPEG", data)
        for i in range(per_class[1]):
            write_image(base / "val" / wnid / f"ILSVRC2012_val_{wnid}_{i:08d}.JPEG", data)


def write_food101(root: Path, classes: Sequence[str], per_class: tuple[int, int] = (2, 1)):
    """food-101/{images/<class>/<id>.jpg, meta/{train,test}.json, classes.txt, labels.txt}."""
    base = root / "food-101"
    data = jpeg_bytes()
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    n = 0
    for cls in classes:
        for split, k in (("train", per_class[0]), ("test", per_class[1])):
            for _ in range(k):
                n += 1
                write_image(base / "images" / cls / f"{1000 + n}.jpg", data)
                splits[split].setdefault(cls, []).append(f"{cls}/{1000 + n}")
    (base / "meta").mkdir(parents=True, exist_ok=True)
    for split, content in splits.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(content))
    (base / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    labels = [c.replace("_", " ").capitalize() for c in classes]
    (base / "meta" / "labels.txt").write_text("\n".join(labels) + "\n")
    return splits


def write_vfn74(
    root: Path, classes: Sequence[str], per_class: tuple[int, int] = (2, 1), classes_txt=True
) -> dict[str, list[str]]:
    """vfn74/<class>/<image>.jpg + train.txt/test.txt (+ classes.txt) in clbench's layout."""
    base = root / "vfn74"
    data = jpeg_bytes()
    lists: dict[str, list[str]] = {"train": [], "test": []}
    for cls in classes:
        for split, k in (("train", per_class[0]), ("test", per_class[1])):
            for i in range(k):
                rel = f"{cls}/{split}_{i}.jpg"
                write_image(base / rel, data)
                lists[split].append(rel)
    for split, lines in lists.items():
        (base / f"{split}.txt").write_text("# fixture\n" + "\n".join(lines) + "\n\n")
    if classes_txt:
        (base / "classes.txt").write_text("\n".join(classes) + "\n")
    return lists


def write_tinyimagenet(
    root: Path, wnids: Sequence[str], per_class: tuple[int, int] = (3, 2)
) -> list[tuple[str, str]]:
    """tiny-imagenet-200/{wnids.txt, words.txt, train/<wnid>/images, val/...}; returns the
    (val file, wnid) annotations in file order."""
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")  # unsorted, as shipped
    words = [f"{w}\tname of {w}, alias" for w in wnids] + ["n00000000\tentity"]
    (base / "words.txt").write_text("\n".join(words) + "\n")
    data = jpeg_bytes(64, 64)
    for wnid in wnids:
        for i in range(per_class[0]):
            write_image(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", data)
        boxes = base / "train" / wnid / f"{wnid}_boxes.txt"
        boxes.write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    annotations = []
    for i in range(per_class[1] * len(wnids)):
        wnid = wnids[(i * 7) % len(wnids)]
        name = f"val_{i}.JPEG"
        write_image(base / "val" / "images" / name, data)
        annotations.append((name, wnid))
    lines = [f"{n}\t{w}\t0\t1\t62\t63" for n, w in annotations]
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return annotations


def write_image_folder(
    base: Path, classes: Sequence[str], per_class: tuple[int, int] = (2, 1), test: str = "test"
) -> None:
    """base/train/<class>/* and base/<test>/<class>/* with mixed extensions and a nested dir."""
    data = jpeg_bytes()
    for cls in classes:
        for split, k in (("train", per_class[0]), (test, per_class[1])):
            for i in range(k):
                ext = ".JPEG" if i % 2 else ".png"
                write_image(base / split / cls / f"{cls}_{i}{ext}", data)
        (base / "train" / cls / "notes.txt").write_text("not an image")
        write_image(base / "train" / cls / "sub" / "nested.jpg", data)
