"""CIFAR-10/100 in torchvision's on-disk format (the python-pickle batches), in memory.

We parse the pickles ourselves instead of instantiating ``torchvision.datasets.CIFAR100``
because torchvision md5-checks every file on load, which rejects anything but the official
archive (including small fixtures in the same format); torchvision is used for downloading.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clbench.data import ImageSet
from clbench.datasets import register_dataset
from clbench.datasets._common import locate, not_found
from clbench.errors import ClbenchError


@dataclass(frozen=True)
class _CifarFormat:
    title: str
    folder: str  # what torchvision extracts under root
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str  # per-batch labels
    names_key: str  # class names in the meta file
    url: str
    tv_class: str  # torchvision.datasets class used for download=True


CIFAR10 = _CifarFormat(
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    tv_class="CIFAR10",
)
CIFAR100 = _CifarFormat(
    title="CIFAR-100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    tv_class="CIFAR100",
)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            # latin1: the batches were pickled by Python 2 (byte strings), as torchvision reads them
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ClbenchError(f"cannot read CIFAR batch {path}: {e}; re-extract the archive") from None


def _load_split(base: Path, files: tuple[str, ...], fmt: _CifarFormat) -> tuple[np.ndarray, ...]:
    data, labels = [], []
    for name in files:
        entry = _unpickle(base / name)
        try:
            data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(entry[fmt.label_key], dtype=np.int64))
        except KeyError as e:
            raise ClbenchError(
                f"{base / name} has no key {e}; is it a {fmt.title} batch?"
            ) from None
    # Stored channel-first (N, 3, 32, 32); the ImageSet contract is NHWC.
    images = np.ascontiguousarray(np.concatenate(data).transpose(0, 2, 3, 1))
    return images, np.concatenate(labels)


def _load_cifar(root: Path, fmt: _CifarFormat, download: bool) -> tuple[ImageSet, ImageSet]:
    required = (*fmt.train_files, *fmt.test_files, fmt.meta_file)
    candidates = (fmt.folder, ".")
    base = locate(root, candidates, required)
    if base is None and download:
        import torchvision.datasets

        root.mkdir(parents=True, exist_ok=True)
        # One archive holds both splits; train=True fetches and extracts it once.
        getattr(torchvision.datasets, fmt.tv_class)(str(root), train=True, download=True)
        base = locate(root, candidates, required)
    if base is None:
        listed = ",".join(required).replace(",".join(CIFAR10.train_files), "data_batch_{1..5}")
        expected = (root / fmt.folder).absolute() / f"{{{listed}}}"
        raise not_found(
            fmt.title,
            expected,
            f"Pass download=True (benchmark YAML: download: true) to fetch it with torchvision, "
            f"or extract {fmt.url} into the data root.",
            root,
        )
    classes = list(_unpickle(base / fmt.meta_file)[fmt.names_key])
    out = []
    for split, files in (("train", fmt.train_files), ("test", fmt.test_files)):
        images, targets = _load_split(base, files, fmt)
        if len(targets) and (targets.min() < 0 or targets.max() >= len(classes)):
            raise ClbenchError(f"{base}: labels outside 0..{len(classes) - 1} in {split}")
        out.append(
            ImageSet(
                targets=targets,
                classes=classes,
                images=images,
                name=f"{fmt.title.lower()}/{split}",
                meta={"root": str(base), "split": split},
            )
        )
    return out[0], out[1]


@register_dataset("cifar100")
def load_cifar100(root: Path, *, download: bool = False) -> tuple[ImageSet, ImageSet]:
    """CIFAR-100 (50,000 train / 10,000 test, 32x32, 100 fine classes) from cifar-100-python/."""
    return _load_cifar(root, CIFAR100, download)


@register_dataset("cifar10")
def load_cifar10(root: Path, *, download: bool = False) -> tuple[ImageSet, ImageSet]:
    """CIFAR-10 (50,000 train / 10,000 test, 32x32, 10 classes) from cifar-10-batches-py/."""
    return _load_cifar(root, CIFAR10, download)
