"""Codec contract, specs, registry and plug-ins, classic and raw codecs, corrupt input."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from codec_fixtures import batch, smooth_image, torch_one_thread, write_pngs  # noqa: E402, F401

from clbench.codecs import (  # noqa: E402
    Codec,
    CorruptDataError,
    codec_names,
    expand_spec,
    format_spec,
    get_codec,
    parse_spec,
    register_codec,
)
from clbench.codecs.classic import availability  # noqa: E402
from clbench.errors import ClbenchError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


# -- specs ---------------------------------------------------------------------------------


def test_parse_spec_values_and_roundtrip():
    assert parse_spec("jpeg") == ("jpeg", {})
    name, opts = parse_spec(
        "bmshj2018-factorized:q=1,checkpoint=runs/a b.pth,pretrained=false,x=0.5"
    )
    assert name == "bmshj2018-factorized"
    assert opts == {"q": 1, "checkpoint": "runs/a b.pth", "pretrained": False, "x": 0.5}
    assert parse_spec(format_spec(name, opts)) == (name, opts)
    assert expand_spec("jpeg:q=[10,50],subsampling=0") == [
        "jpeg:q=10,subsampling=0",
        "jpeg:q=50,subsampling=0",
    ]


@pytest.mark.parametrize("bad", ["", ":q=1", "jpeg:q", "jpeg:q=1,q=2", "jpeg:=3", "jp eg"])
def test_bad_specs_are_one_line_errors(bad):
    with pytest.raises(ClbenchError) as e:
        get_codec(bad)
    assert "\n" not in str(e.value)


def test_unknown_codec_and_option_messages():
    with pytest.raises(ClbenchError, match=r"unknown codec 'jpg'.*did you mean 'jpeg'"):
        get_codec("jpg:q=3")
    with pytest.raises(ClbenchError, match=r"unknown option.*quality.*valid: q"):
        get_codec("jpeg:quality=3")
    with pytest.raises(ClbenchError, match=r"q=500 is invalid"):
        get_codec("jpeg:q=500")
    with pytest.raises(ClbenchError, match="sweep"):
        get_codec("jpeg:q=[1,2]")


def test_spec_recreates_codec():
    for spec in ["jpeg:q=30", "webp:q=50,method=6", "png:level=1", "raw", "jpeg2000:q=30"]:
        codec = get_codec(spec)
        assert get_codec(codec.spec).spec == codec.spec
    assert get_codec("jpeg:q=30").rate == 30 and get_codec("jpeg:q=30").rate_knob == "q"


# -- contract --------------------------------------------------------------------------------

CLASSIC_LOSSY = ["jpeg:q=90", "webp:q=90", "avif:q=90", "jpeg2000:q=40", "jpegxl:q=90"]
LOSSLESS = ["png", "raw", "webp:lossless=true", "png:level=0"]


def _available(spec: str) -> bool:
    return availability(parse_spec(spec)[0]) is None if not spec.startswith("raw") else True


@pytest.mark.parametrize("spec", CLASSIC_LOSSY + LOSSLESS)
def test_roundtrip_every_classic_codec(spec):
    if not _available(spec):
        pytest.skip(f"{spec} is not available in this Pillow build")
    codec = get_codec(spec)
    imgs = [smooth_image(32, 32, 1), smooth_image(48, 64, 2), smooth_image(17, 23, 3)]
    data = codec.encode(imgs)
    assert len(data) == 3 and all(isinstance(b, bytes) for b in data)
    back = codec.decode(data)
    for a, b in zip(imgs, back, strict=True):
        assert b.shape == a.shape and b.dtype == np.uint8
        if codec.lossless:
            np.testing.assert_array_equal(a, b)
        else:
            assert psnr(a, b) > 28, f"{spec}: {psnr(a, b):.1f} dB"
    assert codec.lossless == (spec in LOSSLESS)


def test_encode_accepts_nhwc_array_tensor_and_list():
    import torch

    codec = get_codec("raw")
    x = batch(3, 8, 12)
    from_np = codec.encode(x)
    assert from_np == codec.encode(torch.from_numpy(x)) == codec.encode(list(x))
    np.testing.assert_array_equal(codec.decode_array(from_np), x)
    with pytest.raises(ClbenchError, match="different shapes"):
        codec.decode_array(codec.encode([x[0], x[1, :4]]))


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 8, 8, 3), np.float32), "dtype float32"),
        (np.zeros((2, 3, 8, 8), np.uint8), "channels first"),
        (np.zeros((8, 8, 3), np.uint8), "for one image"),
        ([np.zeros((0, 8, 3), np.uint8)], "empty"),
        ("image.png", "cannot encode a str"),
    ],
)
def test_bad_encoder_input(bad, match):
    with pytest.raises(ClbenchError, match=match):
        get_codec("png").encode(bad)


def test_decode_takes_a_list_of_bytes():
    with pytest.raises(ClbenchError, match=r"wrap one in \[\.\.\.\]"):
        get_codec("jpeg").decode(b"\xff\xd8")


# -- corrupt input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["jpeg:q=50", "webp:q=50", "png", "jpeg2000:q=35", "avif:q=50", "jpegxl:q=50"]
)
def test_truncated_classic_bytes_name_codec_and_item(spec):
    if not _available(spec):
        pytest.skip(f"{spec} is not available")
    codec = get_codec(spec)
    data = codec.encode(batch(2, 32, 32))
    with pytest.raises(CorruptDataError, match=rf"codec {re.escape(codec.spec)}.*item 1"):
        codec.decode([data[0], data[1][: len(data[1]) // 2]])


def test_classic_rejects_other_formats_and_garbage():
    png = get_codec("png").encode(batch(1, 16, 16))
    with pytest.raises(CorruptDataError, match="PNG, not JPEG"):
        get_codec("jpeg").decode(png)
    with pytest.raises(CorruptDataError, match="item 0"):
        get_codec("webp").decode([b"not an image at all"])


def test_png_detects_a_flipped_bit():
    data = bytearray(get_codec("png").encode(batch(1, 16, 16))[0])
    data[len(data) // 2] ^= 0x10  # inside the IDAT chunk: its CRC no longer matches
    with pytest.raises(CorruptDataError, match="item 0"):
        get_codec("png").decode([bytes(data)])


def test_raw_layout_and_truncation():
    x = batch(1, 5, 7)
    (data,) = get_codec("raw").encode(x)
    assert len(data) == 7 + 5 * 7 * 3  # 7-byte header, then the pixels
    # a replay buffer charges the pixels only (exemplars share one shape); others all bytes
    assert get_codec("raw").charged_bytes(data) == 5 * 7 * 3
    (png,) = get_codec("png").encode(x)
    assert get_codec("png").charged_bytes(png) == len(png)
    with pytest.raises(CorruptDataError, match="truncated"):
        get_codec("raw").decode([data, data[:-1]])
    with pytest.raises(CorruptDataError, match="bad magic"):
        get_codec("raw").decode([b"XX" + data[2:]])


def test_missing_optional_codec_is_a_clear_error(monkeypatch):
    import clbench.codecs.classic as classic

    monkeypatch.setattr(classic.features, "check", lambda feature: False)
    with pytest.raises(ClbenchError, match="built without avif"):
        get_codec("avif:q=50")


# -- registry and plug-ins -------------------------------------------------------------------


def test_builtin_names():
    names = codec_names()
    for n in [
        "jpeg",
        "webp",
        "avif",
        "jpeg2000",
        "jpegxl",
        "png",
        "raw",
        "bmshj2018-factorized",
        "bmshj2018-hyperprior",
        "mbt2018-mean",
        "mbt2018",
        "cheng2020-anchor",
        "cheng2020-attn",
        "elic2022-official",
        "continual",
    ]:
        assert n in names


def test_register_decorator_in_process():
    @register_codec("test-invert")
    class Invert(Codec):
        lossless = True

        def encode_one(self, image):
            return bytes([image.shape[0], image.shape[1]]) + (255 - image).tobytes()

        def decode_one(self, data):
            return 255 - np.frombuffer(data[2:], np.uint8).reshape(data[0], data[1], 3)

    codec = get_codec("test-invert")
    assert codec.name == "test-invert" and codec.spec == "test-invert"
    x = batch(2, 4, 6)
    np.testing.assert_array_equal(codec.decode_array(codec.encode(x)), x)
    with pytest.raises(CorruptDataError, match="codec test-invert: cannot decode item 0"):
        codec.decode([b"\x09\x09abc"])


def _readme_blocks() -> tuple[str, str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("<!-- BEGIN codecs section") : text.index("<!-- END codecs section")]
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    toml = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    return python, toml


def test_readme_plugin_example_works_by_name_from_cli_and_config(tmp_path):
    """The README's complete plug-in example, installed as an entry point of a package."""
    python, toml = _readme_blocks()
    assert len(python.strip().splitlines()) <= 30
    ep = re.search(r'^(\S+)\s*=\s*"([\w.]+):(\w+)"', toml, re.M)
    name, module, attr = ep.groups()
    site = tmp_path / "site"
    site.mkdir()
    (site / f"{module}.py").write_text(python)
    dist = site / "clbench_mine-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: clbench-mine\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[clbench.codecs]\n{name} = {module}:{attr}\n")
    write_pngs(tmp_path / "imgs", [(24, 32), (16, 16)])
    bench = tmp_path / "bench.yaml"
    bench.write_text(
        textwrap.dedent(f"""\
        name: mine-bench
        images: {tmp_path / "imgs"}
        anchor: PNG
        curves:
          Mine: "{name}:level=[1,2,3]"
          PNG: png
        """)
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "clbench.codecs.cli"]

    def run(*args):
        res = subprocess.run(
            [*cli, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
        )
        assert res.returncode == 0, res.stderr
        return res.stdout

    assert re.search(rf"^{name}\s", run("list"), re.M)
    assert f"spec      {name}:level=2" in run("info", f"{name}:level=2", "--probe", "16")
    run(
        "eval",
        "--images",
        str(tmp_path / "imgs"),
        "--codec",
        f"{name}:level=[0,2]",
        "--out",
        "o1",
        "--no-progress",
    )
    out = run("eval", str(bench), "--out", "o2", "--no-progress")
    assert "BD-rate" not in out or "Mine" in out
    assert (tmp_path / "o2" / "summary.csv").read_text().count(f"{name}:level=") == 3
