"""The codec zoo: one contract for classic (Pillow) and learned (CompressAI) codecs.

>>> from clbench.codecs import get_codec
>>> codec = get_codec("jpeg:q=30")
>>> data = codec.encode(images_nhwc_uint8)        # list[bytes], one per image
>>> images = codec.decode(data)                    # list of uint8 HWC arrays

See docs/codecs.md for the spec syntax, the registry and the CLI (``clbench codec``).
"""

import warnings

from clbench.codecs.base import (
    Codec,
    CorruptDataError,
    as_image_list,
    expand_spec,
    format_spec,
    parse_spec,
)
from clbench.codecs.registry import CODECS, codec_names, get_codec, register_codec

# CompressAI 1.2.8 imports torch_geometric, whose module level calls ``torch.jit.script``
# (deprecated in torch 2.10+). Every codec module here may be the first to import
# CompressAI, so exactly that message is silenced once for the codec zoo, here; no other
# warning is filtered (see also learned.import_compressai).
warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
)

__all__ = [
    "CODECS",
    "Codec",
    "CorruptDataError",
    "as_image_list",
    "codec_names",
    "expand_spec",
    "format_spec",
    "get_codec",
    "parse_spec",
    "register_codec",
]
