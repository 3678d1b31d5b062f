"""Class orders: the conventions papers use to decide which classes arrive in which task.

A loader's labels follow the dataset's own class order; a benchmark states the order in
which classes are learned as a name (``icarl``, ``identity``) or an explicit list, and the
scenario remaps labels with :func:`resolve_class_order`'s result.

``icarl`` is the order of iCaRL's code and everything derived from it (PyCIL, LAMDA-PILOT,
PODNet's option files, LUCIR): ``np.random.seed(seed); np.random.permutation(C)`` with
seed 1993. PyCIL's ``DataManager`` seeds with the run's seed (default 1993), so its order
changes with the seed; pass the seed you want to reproduce.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from clbench.errors import ConfigError
from clbench.registry import Registry

ICARL_SEED = 1993

# A named order: (num_classes, seed) -> permutation of range(num_classes).
CLASS_ORDERS: Registry[Callable[[int, int], list[int]]] = Registry("class order")


@CLASS_ORDERS.register("icarl", "pycil")
def icarl_class_order(num_classes: int, seed: int = ICARL_SEED) -> list[int]:
    """iCaRL/PyCIL's order: ``np.random.seed(seed); np.random.permutation(num_classes)``.

    A private ``RandomState(seed)`` draws the same numbers as seeding the global legacy
    generator (same Mersenne Twister stream) without clobbering the caller's global RNG.
    For 100 classes and seed 1993 it starts 68, 56, 78, 8, 23, 84, 90, 65, 74, 76.
    """
    return np.random.RandomState(seed).permutation(num_classes).tolist()


@CLASS_ORDERS.register("identity", "sorted")
def identity_class_order(num_classes: int, seed: int = ICARL_SEED) -> list[int]:
    """The dataset's own order 0..C-1 (an unshuffled benchmark, e.g. VTAB in CL-LoRA)."""
    return list(range(num_classes))


def check_class_order(spec: Any, where: str = "scenario.class_order") -> None:
    """Config-time check, before any data is loaded: a registered order name, or a
    non-empty list of class ids or names (checked against the dataset by
    :func:`resolve_class_order`)."""
    if isinstance(spec, str) and spec in CLASS_ORDERS:
        return
    if (
        isinstance(spec, list)
        and spec
        and all(isinstance(c, (int, str)) and not isinstance(c, bool) for c in spec)
    ):
        return
    raise ConfigError(
        f"{where} {spec!r}: valid values: {', '.join(CLASS_ORDERS.names())}, or a list of "
        "class ids or class names"
    )


def resolve_class_order(
    spec: str | Sequence[int | str], classes: int | Sequence[str], seed: int = ICARL_SEED
) -> list[int]:
    """The order in which labels are learned, as a permutation of ``range(C)``.

    Args:
        spec: a registered order name (``icarl``, ``identity``), or an explicit list of
            label indices, or of class names (e.g. wnids) taken from ``classes``.
        classes: the dataset's class names (``ImageSet.classes``) or just their number C.
        seed: the seed of a seeded order (``icarl``).

    Raises:
        ConfigError: unknown name, or a list that is not a permutation of all C classes
            (no class may be silently dropped or repeated).
    """
    names = None if isinstance(classes, int) else list(classes)
    n = classes if isinstance(classes, int) else len(names)
    if isinstance(spec, str):
        return CLASS_ORDERS.get(spec)(n, seed)
    order = list(spec)
    if any(isinstance(c, str) for c in order):
        if names is None:
            raise ConfigError("a class order given by name needs the dataset's class names")
        index = {c: i for i, c in enumerate(names)}
        unknown = [c for c in order if c not in index]
        if unknown:
            raise ConfigError(f"class order names unknown classes: {unknown[:5]}")
        order = [index[c] for c in order]
    try:
        order = [int(c) for c in order]
    except (TypeError, ValueError):
        raise ConfigError(f"class order must list integers or class names, got {spec!r}") from None
    if sorted(order) != list(range(n)):
        missing = sorted(set(range(n)) - set(order))
        dup = sorted({c for c in order if order.count(c) > 1})
        raise ConfigError(
            f"class order must be a permutation of 0..{n - 1} ({n} classes): got {len(order)} "
            f"entries, missing {missing[:10]}, repeated {dup[:10]}, "
            f"out of range {sorted(c for c in set(order) if not 0 <= c < n)[:10]}"
        )
    return order
