"""scikit-learn's bundled 8x8 handwritten digits: the embedded default, no download."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clbench.data import ImageSet
from clbench.datasets import register_dataset


@register_dataset("digits")
def load_digits(
    root: Path, *, download: bool = False, test_size: float = 0.2, split_seed: int = 0
) -> tuple[ImageSet, ImageSet]:
    """8x8 digits (1,797 images, 10 classes) bundled with scikit-learn, in memory.

    Grey levels 0..16 become uint8 0..255 replicated to RGB (N, 8, 8, 3). The test split is
    a fixed stratified ``test_size`` fraction (sklearn ``train_test_split``, ``split_seed``),
    so every run and every strategy sees the same split. ``root`` and ``download`` are unused.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    grey = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), 0..255
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    targets = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(targets)), test_size=test_size, stratify=targets, random_state=split_seed
    )
    classes = [str(c) for c in bunch.target_names]
    meta = {"source": "sklearn.datasets.load_digits"}
    return tuple(  # type: ignore[return-value]
        ImageSet(
            targets=targets[np.sort(idx)],
            classes=classes,
            images=np.ascontiguousarray(rgb[np.sort(idx)]),
            name=f"digits/{split}",
            meta={**meta, "split": split},
        )
        for split, idx in (("train", idx_train), ("test", idx_test))
    )
