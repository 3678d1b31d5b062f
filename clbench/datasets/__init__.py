"""Dataset loaders: one module per on-disk format family, found by name through a registry.

``load_dataset(name, root)`` returns ``(train, test)`` :class:`~clbench.data.ImageSet` pairs
whose labels are 0..C-1 in the dataset's own class order (``classes`` holds the class names
or wnids). Choosing a class order, remapping labels and splitting into experiences is the
scenario's job; :mod:`clbench.datasets.class_order` provides the conventions papers use.

A loader is a function ``(root: Path, *, download: bool, variant: str | None, **options)``
registered with :func:`register_dataset`. Its keyword-only parameters after ``variant`` are
the dataset's options; :func:`load_dataset` checks names against them so that a typo fails
with the list of valid ones. Third-party packages add datasets through the
``clbench.datasets`` entry-point group (pointing at such a function or a
:class:`DatasetLoader`). See docs/datasets.md for the layouts and how to obtain each dataset.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from clbench.data import ImageSet, resolve_data_root
from clbench.errors import ConfigError
from clbench.registry import Registry

__all__ = [
    "DATASETS",
    "DatasetLoader",
    "get_loader",
    "list_datasets",
    "load_dataset",
    "register_dataset",
]

LoaderFn = Callable[..., tuple[ImageSet, ImageSet]]

# The loader's own parameters; every other keyword-only parameter is a dataset option.
_RESERVED = ("root", "download", "variant")


@dataclass(frozen=True)
class DatasetLoader:
    """A registered dataset: its loader function and the variants it accepts.

    ``variants`` empty means the dataset has none. With variants and no ``default_variant``
    the caller must choose one (ImageNet-100: the two published subsets share few classes,
    so silently picking one would make results incomparable).
    """

    name: str
    fn: LoaderFn
    variants: tuple[str, ...] = ()
    default_variant: str | None = None

    @property
    def options(self) -> tuple[str, ...]:
        """Names of the options the loader accepts (its extra keyword-only parameters)."""
        params = inspect.signature(self.fn).parameters.values()
        return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _RESERVED)

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self.fn) or "").split("\n", 1)[0]

    def check_variant(self, variant: str | None) -> str | None:
        if variant is None:
            variant = self.default_variant
        if not self.variants:
            if variant is not None:
                raise ConfigError(f"dataset {self.name!r} has no variants (got {variant!r})")
            return None
        if variant not in self.variants:
            what = "needs a variant" if variant is None else f"has no variant {variant!r}"
            raise ConfigError(
                f"dataset {self.name!r} {what}; valid variants: {', '.join(self.variants)}"
            )
        return variant

    def check_options(self, options: dict) -> None:
        valid = self.options
        unknown = sorted(set(options) - set(valid))
        if unknown:
            listing = ", ".join(valid) if valid else "none"
            raise ConfigError(
                f"dataset {self.name!r} has no option {unknown[0]!r}; valid options: {listing}"
            )


DATASETS: Registry[DatasetLoader | LoaderFn] = Registry(
    "dataset",
    group="clbench.datasets",
    builtins=(
        "clbench.datasets.digits",
        "clbench.datasets.cifar",
        "clbench.datasets.imagenet",
        "clbench.datasets.food",
        "clbench.datasets.tinyimagenet",
        "clbench.datasets.folder",
        "clbench.datasets.video",
    ),
)


def register_dataset(
    name: str,
    *aliases: str,
    variants: tuple[str, ...] = (),
    default_variant: str | None = None,
) -> Callable[[LoaderFn], LoaderFn]:
    """Decorator registering a loader function under ``name`` (and ``aliases``)."""

    def deco(fn: LoaderFn) -> LoaderFn:
        if default_variant is not None and default_variant not in variants:
            raise ValueError(f"{name}: default variant {default_variant!r} not in {variants}")
        DATASETS.register(name, *aliases)(DatasetLoader(name, fn, tuple(variants), default_variant))
        return fn

    return deco


def get_loader(name: str) -> DatasetLoader:
    """The registered loader ``name``; an unknown name raises one line listing valid names."""
    entry = DATASETS.get(name)
    # A plug-in may register a bare function: it then has no declared variants.
    return entry if isinstance(entry, DatasetLoader) else DatasetLoader(name, entry)


def list_datasets() -> list[str]:
    """Registered dataset names, without aliases."""
    return [n for n in DATASETS.names() if get_loader(n).name == n]


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    download: bool = False,
    variant: str | None = None,
    class_range: tuple[int, int] | list[int] | None = None,
    **options,
) -> tuple[ImageSet, ImageSet]:
    """Load dataset ``name`` as ``(train, test)`` image sets, labels 0..C-1 in its own order.

    Args:
        name: a registered dataset name (``list_datasets()``).
        root: the data root holding the datasets; ``None`` means ``$CLBENCH_DATA_ROOT`` or
            ``./data`` (:func:`clbench.data.resolve_data_root`).
        download: fetch the dataset into ``root`` when the format has a public download
            (CIFAR, Food-101, Tiny-ImageNet). Off by default: nothing is fetched silently.
        variant: which published version (e.g. ImageNet-100 ``podnet`` or ``lucir``).
        class_range: ``[lo, hi)``: keep classes lo..hi-1, relabelled 0..hi-lo-1.
        **options: dataset-specific options (see docs/datasets.md).

    Raises:
        DataNotFoundError: the files are missing; the message names the expected path and
            how to obtain the data.
        ClbenchError: image files that are missing or empty, all named in one message.
        ConfigError: unknown variant or option, or a class range outside the dataset.
    """
    loader = get_loader(name)
    variant = loader.check_variant(variant)
    loader.check_options(options)
    kwargs = dict(download=download, **options)
    if loader.variants or "variant" in inspect.signature(loader.fn).parameters:
        kwargs["variant"] = variant
    train, test = loader.fn(resolve_data_root(root), **kwargs)
    _check_pair(name, train, test)
    if class_range is not None:
        lo, hi = class_range
        if not 0 <= lo < hi <= len(train.classes):
            raise ConfigError(
                f"dataset.class_range [{lo}, {hi}] does not fit the {len(train.classes)} "
                f"classes of {name}: use 0 <= lo < hi <= {len(train.classes)}"
            )
        train, test = train.keep_classes(lo, hi), test.keep_classes(lo, hi)
    for split in (train, test):
        split.check_files()
    return train, test


def _check_pair(name: str, train: ImageSet, test: ImageSet) -> None:
    """Contract checks that catch a broken loader (ours or a plug-in) before a long run."""
    if list(train.classes) != list(test.classes):
        raise AssertionError(f"{name}: train and test class lists differ")
    n = len(train.classes)
    for split in (train, test):
        t = split.targets
        if len(t) and (t.min() < 0 or t.max() >= n):
            raise AssertionError(f"{name}: labels outside 0..{n - 1}")
    missing = np.setdiff1d(np.arange(n), train.targets)
    if len(missing):
        raise AssertionError(f"{name}: classes without training images: {missing[:5].tolist()}")
