"""The codec registry and ``get_codec``: the only way the rest of clbench finds a codec.

Built-in families register themselves with :func:`register_codec` when their module is
imported (lazily, on the first lookup). Codecs in other installed packages are found
through the ``clbench.codecs`` entry-point group, so they need no edit to clbench.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from clbench.codecs.base import Codec, parse_spec
from clbench.errors import ClbenchError
from clbench.registry import Registry

CODECS: Registry[Callable[..., Codec]] = Registry(
    "codec",
    group="clbench.codecs",
    builtins=(
        "clbench.codecs.classic",
        "clbench.codecs.raw",
        "clbench.codecs.learned",
        "clbench.codecs.eff_lic",  # efficient-LIC family (issue 14)
        "clbench.codecs.bgvae",  # bound-guided variable-rate hierarchical VAE (issue 15)
        "clbench.codecs.continual",
        "clbench.codecs.feature_vr",  # image coding for machines (issue 16)
        "clbench.codecs.icm_lora",
        "clbench.codecs.split_front",  # pixels through a frozen front: feature replay's control
        "clbench.codecs.video_classic",  # video anchors through PyAV (issue 17)
        "clbench.codecs.dhvc",  # hierarchical predictive video codec (issue 17)
    ),
)

C = TypeVar("C")


def register_codec(name: str, *aliases: str) -> Callable[[C], C]:
    """Class decorator: ``@register_codec("mine")`` makes ``get_codec("mine:...")`` work."""
    return CODECS.register_named(name, *aliases)  # type: ignore[return-value]


def codec_names() -> list[str]:
    """Every registered codec name (built-ins and plug-ins)."""
    return CODECS.names()


def _accepted(factory: Callable[..., Any]) -> str:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return "?"
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        names.append("...")
    return ", ".join(names) or "no options"


def get_codec(spec: str | Codec) -> Codec:
    """Return a ready codec for a spec such as ``"jpeg:q=30"`` (a Codec passes through)."""
    if isinstance(spec, Codec):
        return spec
    name, opts = parse_spec(spec)
    lists = [k for k, v in opts.items() if isinstance(v, list)]
    if lists:
        raise ClbenchError(
            f"codec spec {spec!r}: option {lists[0]} has a list of values, which names a sweep, "
            "not one codec; use it with `clbench codec eval`"
        )
    factory = CODECS.get(name)
    try:
        inspect.signature(factory).bind(**opts)
    except TypeError as e:
        raise ClbenchError(
            f"codec spec {spec!r}: {e}; {name} takes: {_accepted(factory)}"
        ) from None
    except ValueError:  # no introspectable signature: let the call decide
        pass
    codec = factory(**opts)
    if not isinstance(codec, Codec):
        raise ClbenchError(
            f"codec {name!r} built a {type(codec).__name__}, not a clbench.codecs.Codec"
        )
    if not codec.name:
        codec.name = name
    return codec
