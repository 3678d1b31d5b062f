"""CompressAI codecs: every family round-trips with real entropy coding, weights
resolution, and the container's length/CRC checks. Random-init tiny models only."""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from codec_fixtures import batch, smooth_image, torch_one_thread  # noqa: E402, F401

from clbench.codecs import (  # noqa: E402
    CorruptDataError,
    container,  # noqa: E402
    get_codec,
)
from clbench.codecs.learned import learned_config, zoo_cache_path, zoo_filename  # noqa: E402
from clbench.errors import ClbenchError  # noqa: E402

# Tiny architectures so that every family runs in well under a second.
TINY = {
    "bmshj2018-factorized": "N=8,M=8",
    "bmshj2018-factorized-relu": "N=8,M=8",
    "bmshj2018-hyperprior": "N=8,M=8",
    "mbt2018-mean": "N=8,M=8",
    "mbt2018": "N=8,M=8",
    "cheng2020-anchor": "N=8",
    "cheng2020-attn": "N=8",
    "cheng2020-anchor-checkerboard": "N=8",
    "elic2022-official": "N=8,M=136",
    "elic2022-chandelier": "N=8,M=136",
}


def tiny(family: str, extra: str = "") -> str:
    return f"{family}:pretrained=false,{TINY[family]}{',' + extra if extra else ''}"


def test_every_family_is_registered_and_covered():
    assert set(learned_config()["families"]) == set(TINY)


# Autoregressive / channel-group context models decode serially: one image is enough.
SERIAL = {
    "mbt2018",
    "cheng2020-anchor",
    "cheng2020-attn",
    "elic2022-official",
    "elic2022-chandelier",
}


@pytest.mark.parametrize("family", sorted(TINY))
def test_every_family_roundtrips_with_entropy_coding(family):
    torch.manual_seed(0)
    codec = get_codec(tiny(family))
    imgs = [smooth_image(33, 40, 1)]
    if family not in SERIAL:
        imgs += [smooth_image(64, 64, 2), smooth_image(33, 40, 3)]
    data = codec.encode(imgs)
    together = codec.decode(data)
    for a, b in zip(imgs, together, strict=True):
        assert b.shape == a.shape and b.dtype == np.uint8
    if family not in SERIAL:
        assert data == codec.encode(imgs), "encoding is deterministic"
        for b, d in zip(together, data, strict=True):
            np.testing.assert_array_equal(b, codec.decode([d])[0])  # batched == single decoding
    packet = container.unpack(data[0])
    assert (packet.model, packet.height, packet.width, packet.device) == (family, 33, 40, "cpu")
    assert codec.payload_size(data[0]) == packet.payload_bytes < len(data[0])


def test_decoding_equals_the_quantized_forward_pass():
    """Real entropy coding is exact: decode == g_s(quantized latents), cropped and rounded."""
    import torch.nn.functional as F
    from compressai.ops import compute_padding

    torch.manual_seed(0)
    codec = get_codec(tiny("bmshj2018-factorized"))
    x = batch(2, 40, 56)
    decoded = codec.decode_array(codec.encode(x))
    m = codec.model
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    pad, unpad = compute_padding(40, 56, min_div=64)
    with torch.inference_mode():
        y = m.g_a(F.pad(t, pad))
        y_hat = m.entropy_bottleneck.quantize(y, "dequantize", m.entropy_bottleneck._get_medians())
        ref = F.pad(m.g_s(y_hat).clamp(0, 1), unpad)
    ref = (ref * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(decoded, ref)


def test_batch_size_and_pad_options():
    torch.manual_seed(0)
    a = get_codec(tiny("bmshj2018-factorized", "batch=1"))
    b = get_codec(tiny("bmshj2018-factorized", "pad=16"))
    b.model.load_state_dict(a.model.state_dict())
    x = batch(3, 20, 20)
    assert len(a.encode(x)[0]) > len(b.encode(x)[0])  # less padding, fewer bytes
    assert a.decode(b.encode(x))[0].shape == (20, 20, 3)  # pad is not needed to decode
    with pytest.raises(ClbenchError, match="multiple of 64"):
        get_codec(tiny("bmshj2018-hyperprior", "pad=16"))


def test_models_with_network_derived_cdfs_code_one_image_per_call():
    """A batch is not computed bit-exactly as its images alone; where the decoder takes CDFs
    from network outputs that can desynchronise the range decoder, so such models code one
    image per network call and decoding depends on the bytes alone."""
    fact = get_codec(tiny("bmshj2018-factorized"))
    hyper = get_codec(tiny("bmshj2018-hyperprior"))
    assert (fact.batch, hyper.batch) == (16, 1)
    assert "batch" not in fact.options() and "batch" not in hyper.options()
    forced = get_codec(tiny("bmshj2018-hyperprior", "batch=4"))
    assert forced.batch == 4 and forced.options()["batch"] == 4
    seen: list[int] = []
    for name in ("compress", "decompress"):
        inner = getattr(hyper.model, name)

        def spy(*a, _inner=inner, **k):
            seen.append(a[0].shape[0] if torch.is_tensor(a[0]) else len(a[0][0]))
            return _inner(*a, **k)

        setattr(hyper.model, name, spy)
    x = batch(3, 24, 24)
    data = hyper.encode(x)
    together = hyper.decode(data)
    assert seen == [1] * 6
    for d, t in zip(data, together, strict=True):
        np.testing.assert_array_equal(hyper.decode([d])[0], t)


# -- weights -----------------------------------------------------------------------------------


def test_zoo_files_for_every_family_and_quality():
    from compressai.zoo.image import cfgs

    for family, cfg in learned_config()["families"].items():
        if not cfg["zoo"]:
            continue
        for q in cfgs[family]:
            assert zoo_filename(family, q).endswith(".pth.tar")
        with pytest.raises(ClbenchError, match="q=9 is invalid"):
            get_codec(f"{family}:q=9")


def test_no_weights_is_an_error_not_a_random_model(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(
        ClbenchError, match=r"no weights.*checkpoint=PATH.*download=true.*pretrained=false"
    ):
        get_codec("bmshj2018-hyperprior:q=3")
    with pytest.raises(ClbenchError, match="has no zoo weights"):
        get_codec("elic2022-official")
    with pytest.raises(ClbenchError, match="only apply to a random-init"):
        get_codec("bmshj2018-hyperprior:q=3,N=8")


def test_weights_from_the_torch_hub_cache(tmp_path, monkeypatch):
    from compressai.models import FactorizedPrior

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    torch.manual_seed(1)
    ref = FactorizedPrior(128, 192)
    path = zoo_cache_path("bmshj2018-factorized", 1)
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    codec = get_codec("bmshj2018-factorized:q=1")
    assert codec.spec == "bmshj2018-factorized:q=1"
    assert torch.equal(codec.model.g_a[0].weight, ref.g_a[0].weight)
    assert codec.lmbda == learned_config()["lambdas"]["mse"][0]


def test_bad_checkpoints(tmp_path):
    with pytest.raises(ClbenchError, match="does not exist"):
        get_codec(f"bmshj2018-factorized:checkpoint={tmp_path / 'none.pth'}")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ClbenchError, match="cannot load checkpoint"):
        get_codec(f"bmshj2018-factorized:checkpoint={bad}")
    other = tmp_path / "hyper.pth"
    torch.save(get_codec(tiny("bmshj2018-hyperprior")).model.state_dict(), other)
    with pytest.raises(ClbenchError, match="does not fit"):
        get_codec(f"bmshj2018-factorized:checkpoint={other}")


# -- container -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coded():
    torch.manual_seed(0)
    codec = get_codec(tiny("bmshj2018-hyperprior"))
    return codec, codec.encode(batch(2, 24, 24))


def test_flipped_bit_fails_crc_naming_codec_and_item(coded):
    codec, data = coded
    bad = bytearray(data[1])
    bad[-6] ^= 0x01
    with pytest.raises(CorruptDataError, match=r"codec bmshj2018-hyperprior.*item 1.*CRC32"):
        codec.decode([data[0], bytes(bad)])


@pytest.mark.parametrize("cut", [1, 2, 5, 20])
def test_truncated_or_extended_streams(coded, cut):
    codec, data = coded
    with pytest.raises(CorruptDataError, match="item 0"):
        codec.decode([data[0][:-cut]])
    with pytest.raises(CorruptDataError, match="header says"):
        codec.decode([data[0] + b"\0" * cut])


def test_foreign_streams(coded):
    codec, data = coded
    with pytest.raises(CorruptDataError, match="bad magic"):
        codec.decode([get_codec("jpeg").encode(batch(1, 8, 8))[0]])
    other = get_codec(tiny("bmshj2018-factorized")).encode(batch(1, 24, 24))
    with pytest.raises(CorruptDataError, match="encoded by bmshj2018-factorized"):
        codec.decode(other)
    p = container.unpack(data[0])
    p.device = "cuda"
    with pytest.raises(CorruptDataError, match="encoded on cuda.*device=cuda"):
        codec.decode([container.pack(p)])


def test_random_mutations_never_hang_or_pass_silently(coded):
    codec, data = coded
    rng = np.random.default_rng(0)
    for _ in range(200):
        b = bytearray(data[0])
        for _ in range(rng.integers(1, 4)):
            b[rng.integers(0, len(b))] ^= int(rng.integers(1, 256))
        with pytest.raises(CorruptDataError):
            codec.decode([bytes(b)])


def test_container_layout_roundtrip():
    p = container.Packet(
        "m", 3, 0.0067, 300, 200, "cpu", {"y": [[16, 4, 4]], "z": [1, 1]}, [b"abc", b"", b"x" * 300]
    )
    raw = container.pack(p)
    assert raw[:2] == b"CL" and struct.unpack("<I", raw[-4:])[0] == zlib.crc32(raw[:-4])
    q = container.unpack(raw)
    assert (q.model, q.quality, q.height, q.width, q.strings) == ("m", 3, 300, 200, p.strings)
    assert abs(q.lmbda - 0.0067) < 1e-9 and q.payload_bytes == 303
    assert container.shape_from_json(q.shape) == {"y": [(16, 4, 4)], "z": (1, 1)}
