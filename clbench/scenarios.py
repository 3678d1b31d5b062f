"""Benchmark config -> Avalanche ``CLScenario`` (train/test streams of experiences).

Flow: load the dataset (clbench.datasets, which keeps ``dataset.class_range``) -> resolve the
class order through the class-order registry -> remap labels to 0..C-1 *in learning order* (Avalanche needs contiguous labels, and
learning-order labels make "seen classes" simply ``range(n_seen)``) -> split with
Avalanche's ``class_incremental_benchmark(num_classes_per_exp=...)`` (never
``num_experiences``, which drops remainder classes).

Every experience dataset carries three Avalanche transform groups: ``train`` (augmented,
normalised float CHW), ``eval`` (normalised, no augmentation) and ``raw`` (uint8 CHW, what a
replay buffer stores or compresses).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from clbench.config import BenchmarkConfig
from clbench.data import ImageSet, resolve_data_root
from clbench.datasets.class_order import resolve_class_order
from clbench.errors import ConfigError

SPLIT_RE = re.compile(r"^B(\d+)Inc(\d+)$")


def split_sizes(split: str, num_classes: int, num_experiences: int | None = None) -> list[int]:
    """Classes per experience for ``B{base}Inc{inc}``.

    PyCIL convention: a base experience of ``base`` classes (if > 0), then ``inc`` each; a
    remainder that ``inc`` does not divide becomes a final smaller experience, so no class
    is ever dropped (Avalanche's ``num_experiences`` would drop it).
    """
    m = SPLIT_RE.match(split)
    if not m:
        raise ConfigError(
            f"scenario.split {split!r}: expected the form B<base>Inc<inc>, e.g. B0Inc10"
        )
    base, inc = int(m.group(1)), int(m.group(2))
    if inc <= 0:
        raise ConfigError(f"scenario.split {split!r}: the increment must be > 0")
    if base >= num_classes or (base == 0 and inc > num_classes):
        raise ConfigError(
            f"scenario.split {split!r}: base {base} + increments of {inc} do not fit "
            f"{num_classes} classes; use a base < {num_classes} and an increment <= {num_classes}"
        )
    sizes = [base] if base else []
    while sum(sizes) < num_classes:
        sizes.append(min(inc, num_classes - sum(sizes)))
    if num_experiences is not None and num_experiences != len(sizes):
        raise ConfigError(
            f"scenario.split {split!r} on {num_classes} classes gives {len(sizes)} experiences "
            f"({'+'.join(map(str, sizes))}), but scenario.num_experiences is {num_experiences}; "
            "fix one of them"
        )
    return sizes


class ImageSetDataset(Dataset):
    """Torch view of an :class:`ImageSet`: ``(uint8 CHW tensor, label)``, labels remapped."""

    def __init__(
        self,
        images: ImageSet,
        label_map: np.ndarray,
        size: int | None = None,
        interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
    ):
        self.images = images
        self.targets = label_map[images.targets].tolist()
        self.size = size
        self.interpolation = interpolation

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(np.ascontiguousarray(self.images.image(i))).permute(2, 0, 1)
        if self.size is not None and img.shape[-2:] != (self.size, self.size):
            # file-based sets have mixed sizes: bring them to one size for batching
            img = v2.functional.resize(img, self.size, self.interpolation, antialias=True)
            img = v2.functional.center_crop(img, self.size)
        return img, self.targets[i]


def build_transforms(cfg: BenchmarkConfig, size: int) -> dict[str, Callable | None]:
    """The train / eval / raw transform groups for uint8 CHW tensors."""
    t = cfg.transforms
    tail: list = [v2.ToDtype(torch.float32, scale=True)]
    if t.normalize:
        tail.append(v2.Normalize(t.mean, t.std))
    augment = {
        "none": [],
        "crop_flip": [v2.RandomCrop(size, padding=t.crop_padding), v2.RandomHorizontalFlip()],
        "flip": [v2.RandomHorizontalFlip()],
        "resized_crop_flip": [
            v2.RandomResizedCrop(size, scale=tuple(t.rrc_scale), antialias=True),
            v2.RandomHorizontalFlip(),
        ],
    }
    if t.augment not in augment:
        raise ConfigError(f"transforms.augment {t.augment!r}: valid values: {', '.join(augment)}")
    geometry: list = []
    if t.eval_resize is not None:
        if t.eval_resize < size:
            raise ConfigError(
                f"transforms.eval_resize {t.eval_resize} is smaller than the input size {size}: "
                f"set it to at least {size} (PILOT: 256 for 224), or null to evaluate at {size}"
            )
        bicubic = v2.InterpolationMode.BICUBIC
        geometry = [v2.Resize(t.eval_resize, bicubic, antialias=True), v2.CenterCrop(size)]
    return {
        "train": v2.Compose([*augment[t.augment], *tail]),
        "eval": v2.Compose([*geometry, *tail]),
        "raw": None,
    }


@dataclass
class Scenario:
    """An Avalanche CLScenario plus what the runner and strategies need to know."""

    benchmark: object  # avalanche CLScenario
    class_order: list[int]  # dataset class ids (after class_range) in learning order
    class_names: list[str]  # names in learning order (index = remapped label)
    experience_classes: list[list[int]]  # remapped labels of each experience
    image_size: int
    transforms: dict[str, Callable | None] = field(repr=False, default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    @property
    def train_stream(self):
        return self.benchmark.train_stream

    @property
    def test_stream(self):
        return self.benchmark.test_stream


def load_images(cfg: BenchmarkConfig, data_root: str | Path | None) -> tuple[ImageSet, ImageSet]:
    """Load the configured dataset's (train, test) sets, class range applied."""
    from clbench.datasets import load_dataset

    d = cfg.dataset
    root = resolve_data_root(d.root or data_root)
    return load_dataset(
        d.name,
        root,
        download=d.download,
        variant=d.variant,
        class_range=d.class_range,
        **d.options,
    )


def build_scenario(cfg: BenchmarkConfig, data_root: str | Path | None = None) -> Scenario:
    """Build the class-incremental scenario described by ``cfg``."""
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import _make_taskaware_classification_dataset

    train, test = load_images(cfg, data_root)
    num_classes = len(train.classes)
    sizes = split_sizes(cfg.scenario.split, num_classes, cfg.scenario.num_experiences)
    try:
        order = resolve_class_order(
            cfg.scenario.class_order, train.classes, seed=cfg.scenario.class_order_seed
        )
    except ConfigError as e:
        raise ConfigError(f"scenario.class_order: {e}") from None
    label_map = np.empty(num_classes, dtype=np.int64)
    label_map[order] = np.arange(num_classes)

    size = cfg.dataset.image_size
    sets = {"train": train, "test": test}
    for key, s in sets.items():
        small = s.images is not None or cfg.dataset.in_memory
        if s.paths is not None and (
            cfg.dataset.in_memory or (cfg.dataset.in_memory is None and small)
        ):
            sets[key] = s = s.materialize(size=size)
        if size is None and s.images is not None:
            size = int(s.images.shape[1])
    if size is None:
        raise ConfigError(
            f"dataset.image_size: {cfg.dataset.name} has images of mixed sizes; set an input size, "
            "e.g. --set dataset.image_size=224"
        )
    transforms = build_transforms(cfg, size)
    groups = {k: (v, None) for k, v in transforms.items()}
    av = {}
    # a lazy test set is decoded straight to the evaluation resize, so its eval geometry is
    # one resample of the original file, as in PILOT (the eval Resize is then a no-op)
    lazy = dict.fromkeys(sets, (size, v2.InterpolationMode.BILINEAR))
    if cfg.transforms.eval_resize is not None:
        lazy["test"] = (cfg.transforms.eval_resize, v2.InterpolationMode.BICUBIC)
    for key, s in sets.items():
        lazy_size, interp = lazy[key]
        ds = ImageSetDataset(s, label_map, None if s.images is not None else lazy_size, interp)
        av[key] = _make_taskaware_classification_dataset(
            ds, targets=ds.targets, transform_groups=groups, initial_transform_group="train"
        )
    benchmark = class_incremental_benchmark(
        av, class_order=list(range(num_classes)), num_classes_per_exp=sizes
    )
    bounds = np.cumsum([0, *sizes])
    return Scenario(
        benchmark=benchmark,
        class_order=order,
        class_names=[train.classes[c] for c in order],
        experience_classes=[list(range(bounds[i], bounds[i + 1])) for i in range(len(sizes))],
        image_size=size,
        transforms=transforms,
    )
