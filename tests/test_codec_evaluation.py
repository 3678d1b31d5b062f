"""The codec evaluation wing: complexity counting, pluggable metrics and sources, generic BD.

Everything runs on tiny generated images and random-init models; nothing reads real data.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from codec_fixtures import smooth_image, torch_one_thread, write_pngs  # noqa: E402, F401

from clbench.codecs import get_codec  # noqa: E402
from clbench.codecs.cli import main  # noqa: E402
from clbench.codecs.evaluation import (  # noqa: E402
    Benchmark,
    Coded,
    Column,
    ComplexityConfig,
    Curve,
    Item,
    ItemSet,
    Metric,
    complexity,
    count_macs,
    get_metric,
    load_benchmark,
    register_metric,
    register_source,
    run,
)
from clbench.codecs.evaluation.bd import bd  # noqa: E402
from clbench.errors import ClbenchError  # noqa: E402

TINY = "bmshj2018-factorized:pretrained=false,N=8,M=8"


# --------------------------------------------------------------------------- complexity


def test_count_macs_matches_a_hand_count_for_one_conv_layer():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
    macs, y = count_macs(conv, torch.zeros(1, 3, 16, 16))
    # every output value (8 x 16 x 16) is a 3x3x3 dot product; the bias add is not a MAC
    assert y.shape == (1, 8, 16, 16) and macs == 8 * 16 * 16 * (3 * 3 * 3) == 55296
    strided = torch.nn.Conv2d(4, 6, kernel_size=5, stride=2)  # 21 -> 9
    assert count_macs(strided, torch.zeros(2, 4, 21, 21))[0] == 2 * 6 * 9 * 9 * (4 * 5 * 5)
    assert count_macs(torch.nn.Linear(10, 7), torch.zeros(3, 10))[0] == 3 * 7 * 10


def test_complexity_of_a_learned_codec_counts_its_transforms():
    codec = get_codec(TINY)
    got = complexity(codec, (64, 64), latency_size=(32, 48), repeats=2)
    model = codec.model
    assert got["params"] == sum(p.numel() for p in model.parameters())
    # The factorized model's encoder is g_a alone: 4 stride-2 5x5 convs and 3 GDNs (a 1x1
    # conv each) on 8 channels. By hand, at 64x64:
    convs = 32 * 32 * 8 * 3 * 25 + (16 * 16 + 8 * 8 + 4 * 4) * 8 * 8 * 25
    gdns = (32 * 32 + 16 * 16 + 8 * 8) * 8 * 8
    assert got["enc_kmacs_px"] == pytest.approx((convs + gdns) / (64 * 64) / 1e3)
    y = model.g_a(torch.zeros(1, 3, 64, 64))
    assert got["dec_kmacs_px"] * 64 * 64 * 1e3 == pytest.approx(count_macs(model.g_s, y)[0])
    assert got["latency_size"] == [32, 48] and got["latency_input"] == "synthetic"
    assert got["enc_latency_ms"] > 0 and got["dec_latency_ms"] > 0 and got["threads"] >= 1
    # parameters still train after counting (they are frozen only while counting)
    assert all(p.requires_grad for p in model.parameters())
    # the bare CompressAI model gives the same counts as the codec around it
    bare = complexity(model, (64, 64), latency=False)
    assert bare["enc_kmacs_px"] == got["enc_kmacs_px"] and "enc_latency_ms" not in bare


def test_complexity_of_a_classic_codec_is_latency_only_and_bad_targets_fail():
    img = smooth_image(24, 40)
    got = complexity(get_codec("jpeg:q=50"), latency_image=img, latency_input="x.png", repeats=1)
    assert got["params"] is None and got["enc_kmacs_px"] is None
    assert got["latency_size"] == [24, 40] and got["latency_input"] == "x.png"
    with pytest.raises(ClbenchError, match="neither a clbench Codec nor a CompressAI"):
        complexity(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------- BD, any column


def _curve(label, bpp, key, values):
    return Curve(label, [], points=[{"bpp": b, key: v} for b, v in zip(bpp, values, strict=True)])


def test_bd_accuracy_and_bd_rate_on_a_non_psnr_column():
    col = Column("top1", "top-1 accuracy", "top-1", compressai="top1")
    bpp = np.array([0.1, 0.2, 0.4, 0.8, 1.6])
    acc = np.array([0.30, 0.42, 0.50, 0.55, 0.57])
    anchor = _curve("A", bpp, "top1", acc)
    # 5 points more accuracy at every rate: BD-accuracy is exactly that
    up = bd(anchor, _curve("B", bpp, "top1", acc + 0.05), col)
    assert up["bd_top1"] == pytest.approx(0.05) and up["metric"] == "top1"
    # the same accuracy for 20 % fewer bits: BD-rate -20 %, over the full overlap
    cheaper = bd(anchor, _curve("C", 0.8 * bpp, "top1", acc), col)
    assert cheaper["bd_rate_pct"] == pytest.approx(-20.0) and cheaper["overlap"] == 1.0
    # accuracy that is not monotone in bpp: no BD-rate, but BD-accuracy still holds
    noisy = acc.copy()
    noisy[3] = noisy[2] - 0.01
    res = bd(anchor, _curve("D", bpp, "top1", noisy), col)
    assert math.isnan(res["bd_rate_pct"]) and "distinct" in res["note"]
    assert math.isfinite(res["bd_top1"]) and res["bd_top1"] < 0


# --------------------------------------------------------------------------- plug points


@register_metric("test-labelled-brightness")
class _LabelledBrightness(Metric):
    """A toy metric that needs labels: |mean decoded brightness - 10 * label|."""

    columns = (Column("bright_err", "brightness error", "bright err"),)

    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self.prepared = False

    def prepare(self, items: ItemSet) -> None:
        if any(it.label is None for it in items.items):
            raise ClbenchError("metric test-labelled-brightness needs labelled items")

    def reference(self, items: ItemSet) -> dict[str, float]:
        return {"items": float(len(items.items))}

    def measure_batch(self, coded: list[Coded]) -> list[dict[str, float]]:
        return [
            {"bright_err": self.scale * abs(float(c.decoded[0].mean()) - 10 * c.item.label)}
            for c in coded
        ]


@register_source("test-clips")
def _clips(spec: str, data_root, limit=None, frames: int = 3) -> ItemSet:
    items = [
        Item(f"clip{k}", [smooth_image(24, 32, seed=10 * k + t) for t in range(frames)])
        for k in range(2)
    ]
    return ItemSet(items, f"generated {spec}")


def _write_folder_dataset(root: Path) -> None:
    for split in ("train", "test"):
        for c, cls in enumerate(["ant", "bee"]):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(smooth_image(20, 28, seed=10 * c + i)).save(d / f"{cls}{i}.png")


def test_dataset_source_and_a_plugged_in_metric_with_labels(tmp_path):
    _write_folder_dataset(tmp_path / "tree")
    (tmp_path / "bench.yaml").write_text(
        "name: labelled\n"
        "images: folder\n"
        "source: dataset\n"
        f"source_options: {{path: {tmp_path / 'tree'}, split: test}}\n"
        "metrics: [psnr, 'test-labelled-brightness:scale=2']\n"
        "bd: [psnr, bright_err]\n"
        "complexity: {enabled: false}\n"
        "anchor: JPEG\n"
        "curves:\n  JPEG: 'jpeg:q=[20,80]'\n  WebP: 'webp:q=[20,80]'\n"
    )
    res = run(load_benchmark(tmp_path / "bench.yaml"), tmp_path / "out", progress=False)
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_image.csv")))
    assert len(rows) == 4 * 4 and {r["label"] for r in rows} == {"0", "1"}
    assert res["reference"] == {"items": 4.0} and res["metrics"] == ["psnr", "bright_err"]
    assert {r["metric"] for r in res["bd_rate"]} == {"psnr", "bright_err"}
    assert (tmp_path / "out" / "rd_bright_err.png").stat().st_size > 0
    # the metric runs on the decoded pixels: recompute one value from the decoded bytes
    codec = get_codec("jpeg:q=20")
    img = np.asarray(Image.open(tmp_path / "tree" / "test" / "bee" / "bee0.png").convert("RGB"))
    dec = codec.decode(codec.encode([img]))[0]
    row = next(r for r in rows if r["spec"] == "jpeg:q=20" and r["image"] == "bee0.png")
    assert float(row["bright_err"]) == pytest.approx(2 * abs(float(dec.mean()) - 10))
    # an unlabelled source is refused by the metric before any coding
    bench = load_benchmark(tmp_path / "bench.yaml")
    bench.source, bench.images = "images", str(tmp_path / "tree" / "test")
    with pytest.raises(ClbenchError, match="source images: source_options .* it takes: no options"):
        run(bench, tmp_path / "out2", progress=False)
    bench.source_options = {}
    with pytest.raises(ClbenchError, match="needs labelled items"):
        run(bench, tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_clips_are_coded_per_frame_and_averaged_per_sequence(tmp_path):
    bench = Benchmark(
        "clips",
        "x",
        [Curve("JPEG", ["jpeg:q=30", "jpeg:q=70"])],
        source="test-clips",
        source_options={"frames": 3},
        metrics=["psnr"],
        complexity=ComplexityConfig(enabled=False),
    )
    run(bench, tmp_path / "out", progress=False)
    items = list(csv.DictReader(open(tmp_path / "out" / "per_image.csv")))
    frames = list(csv.DictReader(open(tmp_path / "out" / "per_frame.csv")))
    assert len(items) == 2 * 2 and len(frames) == 2 * 2 * 3
    for it in items:
        mine = [f for f in frames if f["spec"] == it["spec"] and f["image"] == it["image"]]
        assert it["frames"] == "3" and [f["frame"] for f in mine] == ["0", "1", "2"]
        assert int(it["bytes"]) == sum(int(f["bytes"]) for f in mine)
        assert float(it["bpp"]) == pytest.approx(int(it["bytes"]) * 8 / (24 * 32 * 3))
        assert float(it["psnr"]) == pytest.approx(np.mean([float(f["psnr"]) for f in mine]))


def test_report_has_complexity_for_every_point(tmp_path):
    write_pngs(tmp_path / "imgs", [(32, 48), (40, 40)])
    bench = Benchmark(
        "cx",
        str(tmp_path / "imgs"),
        [Curve("JPEG", ["jpeg:q=20", "jpeg:q=60"]), Curve("Fact", [TINY])],
        anchor="JPEG",
        complexity=ComplexityConfig(size=[64, 64], latency_size=[32, 48], repeats=2),
    )
    res = run(bench, tmp_path / "out", progress=False)
    summary = {r["spec"]: r for r in csv.DictReader(open(tmp_path / "out" / "summary.csv"))}
    assert (
        summary["jpeg:q=20"]["params"] == "" and float(summary["jpeg:q=20"]["enc_latency_ms"]) > 0
    )
    fact = summary[get_codec(TINY).spec]
    assert int(fact["params"]) > 0 and float(fact["dec_kmacs_px"]) > 0
    assert res["complexity"]["latency_input"] == "img00.png"  # the 32x48 image, not synthetic
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Complexity" in report and "img00.png" in report
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "data:image/png;base64," in html


# --------------------------------------------------------------------------- bad input


def test_bad_metrics_and_config_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ClbenchError, match="unknown metric 'psnrr'.*did you mean 'psnr'"):
        get_metric("psnrr")
    with pytest.raises(ClbenchError, match="metric spec 'psnr:x=1'"):
        get_metric("psnr:x=1")
    write_pngs(tmp_path / "imgs", [(16, 16)])
    base = f"images: {tmp_path / 'imgs'}\ncurves:\n  A: 'jpeg:q=[10,50]'\n"
    cases = {
        "complexity: {repeat: 3}\n": "unknown config key complexity.repeat.*repeats",
        "bd: [ms_ssim2]\n": "bd column 'ms_ssim2' is not measured",
        "bd_method: spline\n": "bd_method 'spline' is invalid",
        "compare: [{curve: A}]\n": "needs curve: and published:",
        "complexity: {size: [64]}\n": r"complexity.size must be \[height, width\]",
    }
    for extra, message in cases.items():
        (tmp_path / "b.yaml").write_text(base + extra)
        with pytest.raises(ClbenchError, match=message):
            run(load_benchmark(tmp_path / "b.yaml"), tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()
    args = [
        "eval",
        "--images",
        str(tmp_path / "imgs"),
        "--codec",
        "png",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*args, "--metric", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clbench: error: unknown metric 'nosuch'") and "\n" not in err
    assert main([*args, "--metric", "psnr", "--no-complexity", "--no-progress"]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["metrics"] == ["psnr"] and res["complexity"] is None


def test_bd_re_anchors_a_finished_evaluation_without_recoding(tmp_path, capsys):
    write_pngs(tmp_path / "imgs", [(32, 32), (24, 40)])
    args = ["eval", "--images", str(tmp_path / "imgs"), "--no-complexity", "--no-progress"]
    curves = ["--codec", "JPEG=jpeg:q=[10,30,60,90]", "--codec", "WebP=webp:q=[10,30,60,90]"]
    out = tmp_path / "o"
    assert main([*args, *curves, "--anchor", "JPEG", "--out", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())
    webp_vs_jpeg = next(r for r in saved["bd_rate"] if r["curve"] == "WebP")["bd_rate_pct"]
    capsys.readouterr()
    # Against WebP: JPEG's row is the mirror of WebP's row against JPEG (log-rate difference).
    assert main(["bd", str(out), "--anchor", "WebP", "--out", str(tmp_path / "bd.md")]) == 0
    md = (tmp_path / "bd.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| JPEG |"))
    jpeg_vs_webp = float(row.split("|")[2])
    assert "BD-rate against WebP" in md and "nothing re-coded" in md
    assert (1 + webp_vs_jpeg / 100) * (1 + jpeg_vs_webp / 100) == pytest.approx(1, abs=0.05)
    assert main(["bd", str(out), "--anchor", "AVIF"]) == 2
    err = capsys.readouterr().err.strip()
    assert "anchor 'AVIF' is not a curve; curves: JPEG, WebP" in err and "\n" not in err
    assert main(["bd", str(tmp_path / "nowhere"), "--anchor", "JPEG"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_reuse_adds_a_curve_to_a_finished_evaluation_without_recoding_the_others(
    tmp_path, capsys, monkeypatch
):
    write_pngs(tmp_path / "imgs", [(32, 32), (24, 40)])
    out = tmp_path / "o"
    args = ["eval", "--images", str(tmp_path / "imgs"), "--no-progress", "--out", str(out)]
    args += ["--no-complexity", "--anchor", "JPEG"]
    jpeg = ["--codec", "JPEG=jpeg:q=[10,30,60,90]"]
    assert main([*args, *jpeg]) == 0
    first = json.loads((out / "results.json").read_text())
    # The kept curve's codec is never built again (its weights could be gone).
    import clbench.codecs.evaluation.evaluate as ev

    real = ev.get_codec

    def no_jpeg(spec):
        assert not spec.startswith("jpeg"), spec
        return real(spec)

    monkeypatch.setattr(ev, "get_codec", no_jpeg)
    assert main([*args, *jpeg, "--codec", "WebP=webp:q=[10,30,60,90]", "--reuse"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["curves"][0] == first["curves"][0]
    assert res["reused"]["JPEG"]["time_utc"] == first["time_utc"]
    assert [r["curve"] for r in res["bd_rate"]] == ["WebP"]
    with (out / "per_image.csv").open() as f:
        assert sorted(r["curve"] for r in csv.DictReader(f)) == ["JPEG"] * 8 + ["WebP"] * 8
    assert "kept from an earlier run with `--reuse`" in (out / "report.md").read_text()
    # A changed curve is measured again; other items or metrics are refused in one line.
    capsys.readouterr()
    monkeypatch.setattr(ev, "get_codec", real)
    assert main([*args, "--codec", "JPEG=jpeg:q=[20,40]", "--reuse", "--limit", "1"]) == 0
    assert json.loads((out / "results.json").read_text())["reused"] == {}
    capsys.readouterr()
    assert main([*args, *jpeg, "--reuse", "--metric", "psnr"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--reuse:" in err and "measures ['psnr']" in err and "\n" not in err
    assert main([*args, "--codec", "JPEG=jpeg:q=[20,40]", "--reuse"]) == 2
    assert "was measured on other items" in capsys.readouterr().err
    with_cx = [a for a in args if a != "--no-complexity"]
    assert main([*with_cx, "--codec", "JPEG=jpeg:q=[20,40]", "--reuse", "--limit", "1"]) == 2
    assert "measured without complexity; add --no-complexity" in capsys.readouterr().err
