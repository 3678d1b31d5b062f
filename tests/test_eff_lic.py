"""The efficient-LIC family (codecs/eff_lic.py): registration, exact round trips, real
bitstream rate vs the estimate, checkpoints and one-line errors. Tiny models only."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from codec_fixtures import (  # noqa: E402, F401
    forward_and_coded,
    smooth_image,
    torch_one_thread,
    write_pngs,
)

from clbench.codecs import get_codec  # noqa: E402
from clbench.codecs.cli import main  # noqa: E402
from clbench.codecs.eff_lic import CONTEXTS, TRANSFORMS, parse_groups  # noqa: E402
from clbench.codecs.train import TrainConfig, train  # noqa: E402
from clbench.errors import ClbenchError  # noqa: E402

TINY = "N=8,M=16,groups=2/2/4,slices=3,window=4"


def spec(transform: str, context: str, extra: str = TINY) -> str:
    return f"eff-lic:pretrained=false,transform={transform},context={context},{extra}"


def test_the_study_grid_is_registered():
    assert {"resnet", "convnext", "swin"} <= set(TRANSFORMS.names())
    assert {"hyperprior", "channel", "space-channel"} <= set(CONTEXTS.names())


@pytest.mark.parametrize("transform", ["conv", "resnet", "convnext", "swin"])
@pytest.mark.parametrize("context", ["hyperprior", "channel", "space-channel"])
def test_decoding_is_bit_exact_against_the_quantised_forward_pass(transform, context):
    """decompress(compress(x)) == forward(x) in eval mode (dequantised y_hat), bit for bit,
    and the codec's bytes decode to that image rounded to uint8."""
    torch.manual_seed(0)
    codec = get_codec(spec(transform, context))
    m = codec.model
    img = smooth_image(64, 64, 3)
    ref, enc, dec = forward_and_coded(m, img)
    assert torch.equal(ref, dec)
    back = codec.decode(codec.encode([img]))[0]
    np.testing.assert_array_equal(back, (ref[0] * 255).round().byte().permute(1, 2, 0).numpy())
    assert codec.spec.startswith("eff-lic:") and f"context={context}" in codec.spec


def test_encoder_sees_the_decoders_memory_layout():
    """The encoder's input is contiguous NCHW, like every tensor on the decoder side: a
    channels_last input (a permuted HWC array) made convolutions round differently in the
    encoder, so a context model's scale indexes could differ at the decoder, which then
    lost sync (Kodak at 512x768: 6 dB instead of 30 on some images)."""
    codec = get_codec(spec("resnet", "channel"))
    seen = []
    codec.model.g_a.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
    imgs = [smooth_image(64, 64, 1), smooth_image(64, 64, 2)]
    both = codec.decode(codec.encode(imgs))
    assert seen and all(seen)
    for img, b in zip(imgs, both, strict=True):
        np.testing.assert_array_equal(codec.decode(codec.encode([img]))[0], b)


def test_complexity_after_coding_a_masked_conv_model():
    """The evaluation wing codes first (inference mode), then counts MACs: the checkerboard
    context's masked conv rewrites its weight while coding, which must not break the count."""
    from clbench.codecs.evaluation import complexity

    codec = get_codec(spec("conv", "space-channel"))
    codec.decode(codec.encode([smooth_image(64, 64, 1)]))
    got = complexity(codec, [64, 64], latency_size=[32, 32], repeats=1)
    assert got["params"] > 0 and got["dec_kmacs_px"] > 0


@pytest.fixture(scope="module")
def noisy_pngs(tmp_path_factory):
    """Textured 64x64 training images: a rate high enough that fixed coder overheads are
    small."""
    root = tmp_path_factory.mktemp("noisy")
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(8):
        img = smooth_image(64, 64, i).astype(float) + rng.normal(0, 20, (64, 64, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"{i}.png")
    return root


@pytest.mark.parametrize("context", ["hyperprior", "channel", "space-channel"])
def test_bitstream_rate_is_within_one_percent_of_the_estimate(context, noisy_pngs, tmp_path):
    """The real entropy-coded size against -log2 of forward's likelihoods, on a 512x512
    mosaic of the training images. The model must be past its first steps: an untrained
    entropy model predicts scales far outside the coder's table (or floors likelihoods)
    and the comparison then says nothing about the coder."""
    from PIL import Image

    cfg = TrainConfig(
        codec=spec("conv", context, "N=16,M=48,groups=4/4/8/16,slices=3"),
        train_dir=str(noisy_pngs),
        out=str(tmp_path / "run"),
        lmbda=3.0,
        patch=128,
        mosaic=True,
        batch_size=4,
        lr=3e-3,
        aux_lr=1e-2,
        steps=150,
        val_every=1000,
        ckpt_every=1000,
    )
    train(cfg, progress=False)
    codec = get_codec(f"eff-lic:checkpoint={tmp_path / 'run' / 'last.pth'}")
    pick = np.random.default_rng(1).integers(0, 8, 64)
    tiles = [np.asarray(Image.open(noisy_pngs / f"{j}.png")) for j in pick]
    img = np.concatenate([np.concatenate(tiles[r * 8 : r * 8 + 8], axis=1) for r in range(8)])
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        est = sum(-torch.log2(v).sum().item() for v in codec.model(x)["likelihoods"].values())
        real = 8 * sum(len(s[0]) for s in codec.model.compress(x)["strings"])
    assert est > 50_000, "enough bits that the coder's fixed overheads do not dominate"
    assert abs(real / est - 1) < 0.01, (real, est)


def test_unknown_transform_or_context_is_one_line_listing_the_valid_ones(capsys):
    assert main(["info", "eff-lic:pretrained=false,transform=mlp"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown eff-lic transform 'mlp'" in err
    assert all(t in err for t in ("convnext", "resnet", "swin"))
    assert main(["info", "eff-lic:pretrained=false,context=raster"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(c in err for c in ("channel", "hyperprior", "space-channel"))


def test_bad_options_are_one_line_errors():
    with pytest.raises(ClbenchError, match="groups=16/16/32/64 use 128 channels.*M=16"):
        get_codec("eff-lic:pretrained=false,context=space-channel,N=8,M=16")
    with pytest.raises(ClbenchError, match="groups='a/b' is invalid"):
        parse_groups("a/b", 64)
    assert parse_groups("16/16/32/64", 192) == [16, 16, 32, 64, 64]
    with pytest.raises(ClbenchError, match="slices=0 must be between 1 and M=16"):
        get_codec(spec("conv", "channel", "N=8,M=16,slices=0"))
    with pytest.raises(ClbenchError, match="depth=-1 must be an integer >= 0"):
        get_codec(spec("conv", "hyperprior", "N=8,M=16,depth=-1"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step checkpoint of one architecture, written by the training engine."""
    root = tmp_path_factory.mktemp("ckpt")
    write_pngs(root / "imgs", [(64, 64)] * 2)
    cfg = TrainConfig(
        codec=spec("convnext", "hyperprior"),
        train_dir=str(root / "imgs"),
        out=str(root / "run"),
        lmbda=0.01,
        patch=64,
        batch_size=2,
        steps=2,
    )
    train(cfg, progress=False)
    return root / "run" / "best.pth"


def test_checkpoint_loads_weights_only_and_recreates_its_architecture(trained):
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    assert ckpt["clbench"]["arch"] == "eff-lic"
    assert ckpt["clbench"]["arch_kwargs"]["transform"] == "convnext"
    codec = get_codec(f"eff-lic:checkpoint={trained}")
    assert codec.arch_kwargs["context"] == "hyperprior" and codec.lmbda == 0.01
    # architecture options next to a checkpoint are an assertion, met here
    get_codec(f"eff-lic:checkpoint={trained},transform=convnext,N=8")


def test_checkpoint_of_another_architecture_is_one_line_naming_both(trained, capsys):
    assert main(["info", f"eff-lic:checkpoint={trained},transform=swin,context=channel"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "transform=convnext,context=hyperprior" in err
    assert "not the requested eff-lic:transform=swin,context=channel" in err
    with pytest.raises(ClbenchError, match="is a eff-lic model; use eff-lic:checkpoint="):
        get_codec(f"mbt2018-mean:checkpoint={trained}")
