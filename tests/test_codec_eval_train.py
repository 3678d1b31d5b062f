"""`clbench codec eval` on generated images and a tiny `clbench codec train` run."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from codec_fixtures import torch_one_thread, write_pngs  # noqa: E402, F401

from clbench.codecs import get_codec  # noqa: E402
from clbench.codecs.cli import main  # noqa: E402
from clbench.codecs.eval import Benchmark, Curve, load_benchmark, run  # noqa: E402
from clbench.codecs.train import TrainConfig, train  # noqa: E402
from clbench.errors import ClbenchError  # noqa: E402


def _bench(tmp_path: Path, curves: dict[str, str], **kw) -> Path:
    lines = [f"name: t\nimages: {tmp_path / 'imgs'}"]
    lines += [f"{k}: {v}" for k, v in kw.items()]
    lines.append("curves:")
    lines += [f'  {label}: "{spec}"' for label, spec in curves.items()]
    p = tmp_path / "bench.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_eval_two_images_outputs_and_conventions(tmp_path):
    write_pngs(tmp_path / "imgs", [(48, 64), (40, 40)])
    bench = load_benchmark(
        _bench(
            tmp_path,
            {
                "JPEG": "jpeg:q=[20,50,80]",
                "WebP": "webp:q=[30,60,90]",
                "PNG": "png",
                "Fact": "bmshj2018-factorized:pretrained=false,N=8,M=8",
            },
            anchor="JPEG",
        )
    )
    res = run(bench, tmp_path / "out", progress=False, command="test")
    out = tmp_path / "out"
    for f in ("per_image.csv", "summary.csv", "results.json", "rd.png", "report.md"):
        assert (out / f).stat().st_size > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temp files left"
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert len(rows) == (3 + 3 + 1 + 1) * 2
    for r in rows:
        assert math.isclose(
            float(r["bpp"]), int(r["bytes"]) * 8 / (int(r["height"]) * int(r["width"]))
        )
        assert math.isnan(float(r["ms_ssim"]))  # images below MS-SSIM's 161-pixel minimum
    png = [r for r in rows if r["curve"] == "PNG"]
    assert all(float(r["psnr"]) == math.inf for r in png)
    fact = [r for r in rows if r["curve"] == "Fact"]
    assert all(
        float(r["bpp_payload"]) < float(r["bpp"]) for r in fact
    )  # container framing excluded
    jpeg = res["curves"][0]
    # the mean over images is the mean of the per-image values (CompressAI's convention)
    q20 = [float(r["psnr"]) for r in rows if r["spec"] == "jpeg:q=20"]
    assert math.isclose(jpeg["points"][0]["psnr"], sum(q20) / 2)
    assert jpeg["compressai"]["results"]["bpp"] == [p["bpp"] for p in jpeg["points"]]
    bd = {r["curve"]: r for r in res["bd_rate"]}
    assert "PNG" not in bd and math.isfinite(bd["WebP"]["bd_rate_pct"])
    loaded = json.loads((out / "results.json").read_text())
    assert loaded["images"]["count"] == 2 and loaded["command"] == "test"


def test_eval_ms_ssim_and_published_anchor_comparison(tmp_path):
    write_pngs(tmp_path / "imgs", [(168, 176)])
    first = run(
        Benchmark("a", str(tmp_path / "imgs"), [Curve("JPEG", ["jpeg:q=30", "jpeg:q=70"])]),
        tmp_path / "a",
        progress=False,
    )
    pts = first["curves"][0]["points"]
    assert 0 < pts[0]["ms_ssim"] < pts[1]["ms_ssim"] <= 1
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    (anchors / "published_jpeg.json").write_text(json.dumps(first["curves"][0]["compressai"]))
    (anchors / "notes.json").write_text("{}")  # not an R-D file: skipped
    bench = Benchmark(
        "b",
        str(tmp_path / "imgs"),
        [Curve("JPEG", ["jpeg:q=30", "jpeg:q=70"])],
        anchor="published_jpeg",
        anchors=str(anchors),
        compare=[{"curve": "JPEG", "published": "published_jpeg"}],
    )
    res = run(bench, tmp_path / "b", progress=False)
    comp = res["compare"][0]
    assert comp["max_abs_d_bpp"] == 0 and comp["max_abs_d_psnr"] == 0
    assert abs(res["bd_rate"][0]["bd_rate_pct"]) < 1e-9


def test_eval_bad_input_writes_nothing(tmp_path):
    write_pngs(tmp_path / "imgs", [(16, 16)])
    bench = load_benchmark(_bench(tmp_path, {"A": "jpeg:q=[10,20]", "B": "nosuchcodec:q=1"}))
    with pytest.raises(ClbenchError, match="unknown codec 'nosuchcodec'"):
        run(bench, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ClbenchError, match="unknown key.*extra_key"):
        load_benchmark(_bench(tmp_path, {"A": "jpeg:q=1"}, extra_key="1"))
    (tmp_path / "mixed.yaml").write_text(
        f"images: {tmp_path}\ncurves:\n  A: [jpeg:q=1, webp:q=1]\n"
    )
    with pytest.raises(ClbenchError, match="mixes codecs"):
        load_benchmark(tmp_path / "mixed.yaml")


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["info", "jpg:q=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clbench: error: unknown codec 'jpg'") and "\n" not in err
    assert (
        main(
            [
                "eval",
                "--images",
                str(tmp_path / "missing"),
                "--codec",
                "png",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert main(["list"]) == 0
    assert "bmshj2018-hyperprior" in capsys.readouterr().out


def test_tiny_training_lowers_the_loss_and_yields_a_codec(tmp_path):
    write_pngs(tmp_path / "train", [(40, 48)] * 8, seed=0)
    write_pngs(tmp_path / "val", [(32, 32)] * 2, seed=50)
    cfg = TrainConfig(
        codec="bmshj2018-factorized:N=16,M=16",
        train_dir=str(tmp_path / "train"),
        val_dir=str(tmp_path / "val"),
        out=str(tmp_path / "run"),
        lmbda=0.01,
        patch=32,
        batch_size=4,
        lr=1e-3,
        steps=40,
        val_every=10,
        ckpt_every=20,
        threads=1,
    )
    train(cfg, progress=False)
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())["history"]
    assert [h["step"] for h in log] == [10, 20, 30, 40]
    assert log[-1]["loss"] < log[0]["loss"]
    codec = get_codec(f"bmshj2018-factorized:checkpoint={tmp_path / 'run' / 'last.pth'}")
    assert codec.lmbda == 0.01 and codec.arch_kwargs == {"N": 16, "M": 16}
    img = write_pngs(tmp_path / "x", [(30, 20)])
    from clbench.data import load_rgb

    assert codec.decode(codec.encode([load_rgb(img[0])]))[0].shape == (30, 20, 3)
    with pytest.raises(ClbenchError, match="already holds a run"):
        train(cfg, progress=False)
    cfg.steps = 45
    train(cfg, resume=True, progress=False)
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())["history"]
    assert log[-1]["step"] == 45
    with pytest.raises(ClbenchError, match="MS-SSIM needs crops larger"):
        train(
            TrainConfig(**{**cfg.__dict__, "metric": "ms-ssim", "out": str(tmp_path / "r2")}),
            progress=False,
        )
