"""Tiny generated images for the codec tests (no test reads real data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A natural-ish uint8 RGB image: gradients, a few sinusoids, an edge and mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for c in range(3):
        fx, fy, ph = rng.uniform(0.02, 0.15, 2).tolist() + [rng.uniform(0, 6.28)]
        v = (
            128
            + 60 * np.sin(fx * xx + fy * yy + ph)
            + 40 * (xx / w - 0.5)
            + 30 * (yy / h - 0.5) * (c - 1)
        )
        v += np.where(xx > w * 0.6, 25.0, -25.0)
        chans.append(v)
    img = np.stack(chans, -1) + rng.normal(0, 2.0, (h, w, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def batch(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.stack([smooth_image(h, w, seed + i) for i in range(n)])


def write_pngs(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    """Write one PNG per (h, w) size into ``folder`` and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        p = folder / f"img{i:02d}.png"
        Image.fromarray(smooth_image(h, w, seed + i)).save(p)
        paths.append(p)
    return paths


def forward_and_coded(model, img: np.ndarray):
    """(forward x_hat clamped to [0, 1], compress() output, decompress() x_hat) of a
    CompressAI-style model on one uint8 HWC image, in inference mode; a learned codec must
    decode to exactly its forward pass."""
    import torch

    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        ref = model(x)["x_hat"].clamp(0, 1)
        enc = model.compress(x)
        dec = model.decompress(enc["strings"], enc["shape"])["x_hat"]
    return ref, enc, dec


@pytest.fixture(autouse=True, scope="module")
def torch_one_thread():
    """One torch thread per test module: CI has 2 shared cores, and oversubscribed OpenMP
    threads spin-wait, which makes small-model tests minutes slower under load."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def smooth_images(n: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    """Natural-ish images (smooth gradients + noise) so that JPEG has something to do."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 1, 3)
        base = np.stack([a * xx + b * yy, b * xx + c * yy, c * xx + a * yy], -1) * 200
        out.append(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
    return out


def smooth_scenario(dataset: str, name: str, **train):
    """(config, scenario) of 4 classes of 80 smooth 32x32 images (60 train, 20 test) in two
    experiences, a tiny CNN and one epoch; ``dataset`` is registered only while loading."""
    from clbench.config import load_config
    from clbench.data import ImageSet
    from clbench.datasets import DATASETS, register_dataset
    from clbench.scenarios import build_scenario

    @register_dataset(dataset)
    def _load(root, *, download=False, variant=None):
        imgs = np.stack(smooth_images(80))
        labels = np.arange(80) % 4
        classes = ["a", "b", "c", "d"]
        return (
            ImageSet(labels[:60], classes, images=imgs[:60]),
            ImageSet(labels[60:], classes, images=imgs[60:]),
        )

    cfg = load_config(
        {
            "name": name,
            "dataset": {"name": dataset},
            "scenario": {"split": "B2Inc2", "class_order": "sorted"},
            "backbone": {"name": "small_cnn", "kwargs": {"width": 8}},
            "train": {"epochs": 1, "threads": 1, "amp": "off", **train},
        }
    )
    try:
        return cfg, build_scenario(cfg)
    finally:  # the data is loaded: leave the global registry as the other tests expect it
        DATASETS._items.pop(dataset, None)
