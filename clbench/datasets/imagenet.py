"""ImageNet-1k and its 100-class subsets from an ImageNet train/val folder (lazy paths).

Expected: ``<root>/imagenet/{train,val}/<wnid>/*.JPEG`` (val sorted into wnid folders, as
every ImageFolder-based code base expects). The data root may also point straight at the
folder holding ``train/`` and ``val/``, and an already extracted subset folder
(``imagenet100/``, LUCIR's ``seed_1993_subset_100_imagenet/data/``) works for the subsets.

ImageNet-100 has two published class subsets; see ``splits/*.txt`` for their provenance:

* ``podnet``: the first 100 sorted wnids (PODNet, DER).
* ``lucir``: LUCIR's seed-1993 random subset (LUCIR, Mnemonics, PyCIL, FOSTER).

Both papers' code then learns classes in the seed-1993 order over the subset's sorted
wnids, which is ``class_order: icarl``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clbench.data import ImageSet
from clbench.datasets import register_dataset
from clbench.datasets._common import SPLITS_DIR, list_class_folder, not_found, read_lines
from clbench.errors import ConfigError, DataNotFoundError

IMAGENET100_VARIANTS = {
    "podnet": SPLITS_DIR / "imagenet100_podnet.txt",
    "lucir": SPLITS_DIR / "imagenet100_lucir.txt",
}
_CANDIDATES = ("imagenet", "imagenet100", "seed_1993_subset_100_imagenet/data", "ILSVRC2012", ".")
_HOW = (
    "ImageNet cannot be downloaded automatically: get ILSVRC-2012 from "
    "https://image-net.org/download.php and extract train/ and val/ with one folder per wnid "
    "(sort val/ into wnid folders, e.g. with the common valprep.sh)."
)


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids, sorted (= torchvision ImageFolder label order)."""
    return read_lines(SPLITS_DIR / "imagenet1k_wnids.txt")


def _find_base(root: Path, wnids: Sequence[str], what: str) -> Path:
    """The first candidate folder whose train/ and val/ hold every wnid's folder."""
    best: tuple[int, Path] | None = None
    for candidate in _CANDIDATES:
        base = root / candidate
        if not ((base / "train").is_dir() and (base / "val").is_dir()):
            continue
        present = sum((base / "train" / w).is_dir() and (base / "val" / w).is_dir() for w in wnids)
        if present == len(wnids):
            return base
        if best is None or present > best[0]:
            best = (present, base)
    if best is None:
        expected = (root / "imagenet").absolute() / "{train,val}/<wnid>/*.JPEG"
        raise not_found(what, expected, _HOW, root)
    base = best[1]
    missing = [
        f"{split}/{w}"
        for w in wnids
        for split in ("train", "val")
        if not (base / split / w).is_dir()
    ]
    raise DataNotFoundError(
        f"{what}: {base.absolute()} lacks {len(missing)} of the {len(wnids)} classes' folders "
        f"(e.g. {', '.join(missing[:3])}). {_HOW}"
    )


def _load_wnids(root: Path, wnids: list[str], what: str, meta: dict) -> tuple[ImageSet, ImageSet]:
    base = _find_base(root, wnids, what)
    out = []
    for split, folder in (("train", "train"), ("test", "val")):
        paths: list[str] = []
        targets = []
        for label, wnid in enumerate(wnids):
            files = list_class_folder(base / folder / wnid)
            paths += files
            targets.append(np.full(len(files), label, dtype=np.int64))
        out.append(
            ImageSet(
                targets=np.concatenate(targets),
                paths=paths,
                classes=list(wnids),
                name=f"{meta['dataset']}/{split}",
                meta={**meta, "root": str(base), "split": split},
            )
        )
    return out[0], out[1]


@register_dataset("imagenet100", variants=(*IMAGENET100_VARIANTS, "custom"))
def load_imagenet100(
    root: Path,
    *,
    download: bool = False,
    variant: str | None = None,
    class_list: str | Path | None = None,
) -> tuple[ImageSet, ImageSet]:
    """ImageNet-100 (~130k train / 5,000 val) as a published subset of an ImageNet folder.

    ``variant`` picks the subset: ``podnet`` or ``lucir``, or ``custom`` with ``class_list``
    naming a text file of wnids (one per line, ``#`` comments) for any other subset. Labels
    follow the subset's sorted wnids, as both papers' code does.
    """
    if (variant == "custom") != (class_list is not None):
        raise ConfigError(
            "imagenet100: class_list goes with variant 'custom' (and only with it); "
            "variants podnet and lucir use the lists shipped in clbench/datasets/splits/"
        )
    path = Path(class_list) if class_list is not None else IMAGENET100_VARIANTS[variant]
    if not path.is_file():
        raise DataNotFoundError(f"imagenet100: class list {path.absolute()} does not exist")
    wnids = read_lines(path)
    unknown = sorted(set(wnids) - set(imagenet_wnids()))
    if unknown or len(set(wnids)) != len(wnids) or not wnids:
        raise ConfigError(
            f"imagenet100: class list {path} must hold distinct ImageNet-1k wnids, one per "
            f"line; not ImageNet-1k wnids: {unknown[:3]}"
        )
    meta = {"dataset": "imagenet100", "variant": variant, "class_list": str(path)}
    return _load_wnids(root, sorted(wnids), f"ImageNet-100 ({variant})", meta)


@register_dataset("imagenet1k", "imagenet1000")
def load_imagenet1k(root: Path, *, download: bool = False) -> tuple[ImageSet, ImageSet]:
    """ImageNet-1k (ILSVRC-2012: 1.28M train / 50,000 val), 1000 sorted wnids."""
    return _load_wnids(root, imagenet_wnids(), "ImageNet-1k", {"dataset": "imagenet1k"})
