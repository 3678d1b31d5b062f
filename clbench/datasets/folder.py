"""Train/test ImageFolder trees (lazy paths): the PTM benchmarks as LAMDA-PILOT distributes
them (ImageNet-R, ImageNet-A, VTAB) and a generic ``folder`` dataset for anything else.

Layout: ``<dir>/train/<class>/<image>`` and ``<dir>/test/<class>/<image>``; classes are the
sorted folder names (torchvision ImageFolder, which PILOT uses), and the test folder must
hold the same classes, matched by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clbench.data import ImageSet
from clbench.datasets import register_dataset
from clbench.datasets._common import list_image_folder, locate, not_found

PILOT_URL = "https://github.com/LAMDA-CL/LAMDA-PILOT#-datasets"


def _load_train_test(base: Path, name: str, train: str, test: str) -> tuple[ImageSet, ImageSet]:
    classes = None  # the train folder's; the test folder must hold the same
    sets = []
    for split, folder in (("train", train), ("test", test)):
        paths, targets, classes = list_image_folder(base / folder, classes)
        meta = {"root": str(base), "split": split}
        sets.append(ImageSet(targets, classes, paths=paths, name=f"{name}/{split}", meta=meta))
    return sets[0], sets[1]


@dataclass(frozen=True)
class _PilotFolder:
    title: str
    candidates: tuple[str, ...]  # folders under the data root, PILOT's path first
    summary: str


PILOT_FOLDERS = {
    "imagenet-r": _PilotFolder(
        "ImageNet-R",
        ("imagenet-r", "imagenet_r", "imagenetr"),
        "ImageNet-R (200 ImageNet classes as renditions), LAMDA-PILOT's train/test split.",
    ),
    "imagenet-a": _PilotFolder(
        "ImageNet-A",
        ("imagenet-a", "imagenet_a", "imageneta"),
        "ImageNet-A (200 classes of natural adversarial examples), LAMDA-PILOT's split.",
    ),
    "vtab": _PilotFolder(
        "VTAB",
        ("vtab-cil/vtab", "vtab"),
        "VTAB-CIL (50 classes from 5 VTAB tasks), LAMDA-PILOT's split.",
    ),
}


def _pilot_loader(name: str, spec: _PilotFolder) -> Callable[..., tuple[ImageSet, ImageSet]]:
    def load(root: Path, *, download: bool = False) -> tuple[ImageSet, ImageSet]:
        base = locate(root, (*spec.candidates, "."), ("train", "test"))
        if base is None:
            raise not_found(
                spec.title,
                (root / spec.candidates[0]).absolute() / "{train,test}/<class>/<image>",
                f"{spec.title} cannot be downloaded automatically: get LAMDA-PILOT's split "
                f"(Google Drive / OneDrive links at {PILOT_URL}) and extract it into the data root.",
                root,
            )
        return _load_train_test(base, name, "train", "test")

    load.__name__ = f"load_{name.replace('-', '_')}"
    load.__doc__ = spec.summary
    return load


for _name, _spec in PILOT_FOLDERS.items():
    # PILOT's own names ("imagenetr", "imageneta") work as aliases.
    _aliases = {_name.replace("-", "")} - {_name}
    register_dataset(_name, *_aliases)(_pilot_loader(_name, _spec))


@register_dataset("folder")
def load_folder(
    root: Path,
    *,
    download: bool = False,
    path: str | Path | None = None,
    train: str = "train",
    test: str = "test",
) -> tuple[ImageSet, ImageSet]:
    """Any dataset as two ImageFolder trees: ``<path>/<train>/<class>/*``, ``<path>/<test>/...``.

    ``path`` is relative to the data root (or absolute); default: the data root itself.
    """
    base = root if path is None else root / path  # an absolute path replaces root
    if locate(base, (".",), (train, test)) is None:
        raise not_found(
            "Image folder dataset",
            base.absolute() / f"{{{train},{test}}}/<class>/<image>",
            "Point the folder dataset's path option (and train/test options) at a folder "
            "holding one ImageFolder tree per split.",
            root,
        )
    return _load_train_test(base, f"folder:{base.name}", train, test)
