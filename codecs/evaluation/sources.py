"""What a codec evaluation codes: item sources found by name in :data:`SOURCES`.

A source turns the benchmark's ``images`` value (plus ``source_options``) into an
:class:`~clbench.codecs.evaluation.metrics.ItemSet`. Built-ins:

- ``images``: every image file under a folder (recursive, sorted), unlabelled; Kodak.
- ``dataset``: one split of any dataset in clbench's registry (``clbench list datasets``),
  labelled, e.g. Tiny-ImageNet val for machine-vision accuracy.

A video source (clips as multi-frame items) registers the same way:
``@register_source("video")`` on a function ``(spec, data_root, limit, **options) -> ItemSet``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

from clbench.codecs._io import data_path, find_images
from clbench.codecs.evaluation.metrics import Item, ItemSet
from clbench.data import load_rgb
from clbench.errors import ClbenchError
from clbench.registry import Registry

SourceFn = Callable[..., ItemSet]
SOURCES: Registry[SourceFn] = Registry(
    "evaluation source",
    group="clbench.codec_sources",
    builtins=(
        "clbench.codecs.evaluation.sources",
        "clbench.codecs.evaluation.video",  # clips (issue 17)
    ),
)


def register_source(name: str, *aliases: str) -> Callable[[SourceFn], SourceFn]:
    """Decorator: ``@register_source("video")`` makes ``source: video`` work."""
    return SOURCES.register(name, *aliases)


def load_items(
    source: str,
    spec: str,
    data_root: str | None,
    limit: int | None = None,
    options: dict[str, Any] | None = None,
) -> ItemSet:
    """Load the items of ``source`` (with its options); fails before any coding."""
    fn = SOURCES.get(source)
    options = dict(options or {})
    try:
        inspect.signature(fn).bind(spec, data_root, limit, **options)
    except TypeError as e:
        params = list(inspect.signature(fn).parameters)[3:]
        raise ClbenchError(
            f"source {source}: source_options {options} do not fit ({e}); it takes: "
            f"{', '.join(params) or 'no options'}"
        ) from None
    items = fn(spec, data_root, limit, **options)
    if not items.items:
        raise ClbenchError(f"source {source} {spec!r} yielded no items")
    return items


@register_source("images")
def image_folder(spec: str, data_root: str | None, limit: int | None = None) -> ItemSet:
    """Every image file under the folder ``spec`` (relative: under the data root)."""
    folder = data_path(spec, data_root)
    files = find_images(folder, "image folder")
    if limit:
        files = files[:limit]
    return ItemSet([Item(p.name, [load_rgb(p)]) for p in files], str(folder))


@register_source("dataset")
def dataset_split(
    spec: str,
    data_root: str | None,
    limit: int | None = None,
    split: str = "test",
    variant: str | None = None,
    **options: Any,
) -> ItemSet:
    """Split ``split`` (test or train) of the registered dataset ``spec``, with labels."""
    from clbench.datasets import load_dataset

    if split not in ("test", "train"):
        raise ClbenchError(f"source dataset: split {split!r} is invalid; use test or train")
    train, test = load_dataset(spec, data_root, variant=variant, **options)
    s = test if split == "test" else train
    n = min(len(s), limit) if limit else len(s)
    items = []
    for i in range(n):
        name = (
            os.path.basename(os.fspath(s.paths[i])) if s.paths is not None else f"{split}-{i:06d}"
        )
        items.append(Item(name, [s.image(i)], label=int(s.targets[i])))
    return ItemSet(items, f"{spec} ({split}, {n} of {len(s)})", classes=list(s.classes))
