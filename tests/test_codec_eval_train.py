"""`clbench codec eval` on generated images and a tiny `clbench codec train` run."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from codec_fixtures import torch_one_thread, write_pngs  # noqa: E402, F401

from clbench.codecs import get_codec  # noqa: E402
from clbench.codecs.cli import main  # noqa: E402
from clbench.codecs.evaluation import (  # noqa: E402
    Benchmark,
    Compare,
    ComplexityConfig,
    Curve,
    load_benchmark,
    run,
)
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
    bench.complexity.enabled = False  # measured in tests/test_codec_evaluation.py
    res = run(bench, tmp_path / "out", progress=False, command="test")
    out = tmp_path / "out"
    for f in ("per_image.csv", "summary.csv", "results.json", "rd.png", "report.md", "report.html"):
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
    off = ComplexityConfig(enabled=False)
    first = run(
        Benchmark(
            "a", str(tmp_path / "imgs"), [Curve("JPEG", ["jpeg:q=30", "jpeg:q=70"])], complexity=off
        ),
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
        compare=[Compare("JPEG", "published_jpeg")],
        complexity=off,
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
    with pytest.raises(ClbenchError, match="unknown config key extra_key"):
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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg, progress=False)
    # 32x32 validation images at --patch 32: the crop is Pillow's whole read-only buffer
    assert not [w for w in caught if "not writable" in str(w.message)]
    doc = json.loads((tmp_path / "run" / "train_log.json").read_text())
    log = doc["history"]
    assert [h["step"] for h in log] == [10, 20, 30, 40]
    assert log[-1]["loss"] < log[0]["loss"]
    # the log alone says the run finished and its best validation loss (drivers read it)
    assert doc["complete"] is True and doc["best_val"] == min(h["loss"] for h in log)
    assert {"git_commit", "cpu", "packages"} <= set(doc["provenance"])  # where it ran
    best = torch.load(tmp_path / "run" / "best.pth", weights_only=True)["clbench"]["best_val"]
    assert doc["best_val"] == best
    codec = get_codec(f"bmshj2018-factorized:checkpoint={tmp_path / 'run' / 'last.pth'}")
    assert codec.lmbda == 0.01 and codec.arch_kwargs == {"N": 16, "M": 16}
    img = write_pngs(tmp_path / "x", [(30, 20)])
    from clbench.data import load_rgb

    assert codec.decode(codec.encode([load_rgb(img[0])]))[0].shape == (30, 20, 3)
    with pytest.raises(ClbenchError, match="already holds a run"):
        train(cfg, progress=False)
    cfg.steps = 45
    from clbench.atomic import training_lock

    with training_lock(tmp_path / "run", "another trainer"):  # one trainer per run folder
        with pytest.raises(ClbenchError, match=r"run folder .*run is being written by another"):
            train(cfg, resume=True, progress=False)
    train(cfg, resume=True, progress=False)
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())["history"]
    assert log[-1]["step"] == 45
    with pytest.raises(ClbenchError, match="MS-SSIM needs crops larger"):
        train(
            TrainConfig(**{**cfg.__dict__, "metric": "ms-ssim", "out": str(tmp_path / "r2")}),
            progress=False,
        )


# -- the training engine (codecs/train.py) ---------------------------------------------------


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    if not (tmp_path / "train").exists():
        write_pngs(tmp_path / "train", [(40, 48)] * 6, seed=0)
        write_pngs(tmp_path / "val", [(32, 32)] * 2, seed=50)
    base = dict(
        codec="bmshj2018-factorized:N=8,M=8",
        train_dir=str(tmp_path / "train"),
        val_dir=str(tmp_path / "val"),
        out=str(tmp_path / "run"),
        lmbda=0.01,
        patch=32,
        batch_size=2,
        lr=1e-3,
        steps=6,
        val_every=2,
        ckpt_every=3,
        threads=1,
    )
    return TrainConfig(**{**base, **kw})


def test_resume_continues_bit_identically(tmp_path, monkeypatch):
    """Killed after its step-3 checkpoint and resumed, a run ends with exactly the weights,
    EMA, optimizer state and validation log of an uninterrupted one."""
    from clbench.codecs.train_methods import Standard

    opts = dict(ema=0.9, schedule="cosine", warmup=2, lr_min=1e-4)
    train(_cfg(tmp_path, out=str(tmp_path / "a"), **opts), progress=False)
    real_step = Standard.step

    def crash_at_step_5(self, run, x):
        if run.step == 4:
            raise KeyboardInterrupt
        return real_step(self, run, x)

    monkeypatch.setattr(Standard, "step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, out=str(tmp_path / "b"), **opts), progress=False)
    monkeypatch.setattr(Standard, "step", real_step)
    last_b = tmp_path / "b" / "last.pth"
    assert torch.load(last_b, weights_only=True)["clbench"]["step"] == 3
    train(_cfg(tmp_path, out=str(tmp_path / "b"), **opts), resume=True, progress=False)
    a = torch.load(tmp_path / "a" / "last.pth", weights_only=True)
    b = torch.load(last_b, weights_only=True)
    for key in ("model", "ema", "state_dict"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for i, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k])

    def no_time(h):
        return [{k: v for k, v in r.items() if k != "elapsed"} for r in h]

    assert no_time(a["clbench"]["history"]) == no_time(b["clbench"]["history"])
    assert [r["step"] for r in b["clbench"]["history"]] == [2, 4, 6]
    assert a["clbench"]["complete"] and a["clbench"]["weights"] == "ema"


def test_several_lambdas_in_one_command_one_run_folder_each(tmp_path):
    _cfg(tmp_path)  # writes the images
    args = ["train", "bmshj2018-factorized:N=8,M=8", "--train", str(tmp_path / "train")]
    args += ["--val", str(tmp_path / "val"), "--patch", "32", "--batch-size", "2"]
    args += ["--steps", "2", "--val-every", "1", "--threads", "1", "--no-progress"]
    args += ["--out", str(tmp_path / "multi"), "--lambda", "0.005", "0.05"]
    assert main(args) == 0
    for lm in (0.005, 0.05):
        run = tmp_path / "multi" / f"lambda-{lm:g}"
        assert get_codec(f"bmshj2018-factorized:checkpoint={run / 'best.pth'}").lmbda == lm
        log = json.loads((run / "train_log.json").read_text())["history"]
        assert [r["step"] for r in log] == [1, 2] and {"bpp", "psnr", "loss"} <= set(log[-1])
    # --resume: complete runs are left as they are, a new lambda starts
    stamp = (tmp_path / "multi" / "lambda-0.05" / "last.pth").stat().st_mtime_ns
    assert main([*args, "0.2", "--resume"]) == 0
    assert (tmp_path / "multi" / "lambda-0.2" / "best.pth").is_file()
    assert (tmp_path / "multi" / "lambda-0.05" / "last.pth").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "nope"], "unknown training method 'nope'"),
        (["--method-opt", "gamma=1"], "training method 'standard' has no option 'gamma'"),
        (["--schedule", "linear"], "unknown learning-rate schedule"),
        (["--amp", "fp8"], "unknown precision"),
        (["--ema", "1.5"], "--ema 1.5 must be in"),
        (["--patch", "64"], "is 48x40, smaller than --patch 64"),
        (["--patch", "24"], "--patch 24 is not a multiple of 16"),
    ],
)
def test_bad_training_input_is_one_line_before_anything_is_written(
    tmp_path, capsys, extra, message
):
    _cfg(tmp_path)
    args = ["train", "bmshj2018-factorized:N=8,M=8", "--train", str(tmp_path / "train")]
    args += ["--steps", "2", "--out", str(tmp_path / "out"), "--lambda", "0.01", "0.02"]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_an_existing_run_among_several_lambdas_stops_all_before_the_first(tmp_path, capsys):
    train(_cfg(tmp_path, out=str(tmp_path / "out" / "lambda-0.02"), steps=1), progress=False)
    args = ["train", "bmshj2018-factorized:N=8,M=8", "--train", str(tmp_path / "train")]
    args += ["--patch", "32", "--steps", "1", "--out", str(tmp_path / "out")]
    assert main([*args, "--lambda", "0.01", "0.02"]) == 2
    assert "lambda-0.02 already holds a run" in capsys.readouterr().err
    assert not (tmp_path / "out" / "lambda-0.01").exists()


def test_mosaic_patches_tile_several_images(tmp_path):
    """--mosaic: a 64x64 patch from 40x48 images is a 2x2 grid of 40x40 crops of several
    images (cut to 64), the same for the same seed; validation uses each image once."""
    from clbench.codecs.train import CropFolder

    write_pngs(tmp_path / "imgs", [(40, 48)] * 8, seed=0)
    train_set = CropFolder(str(tmp_path / "imgs"), 64, True, mosaic=True)
    train_set.check_sizes()
    assert (train_set.tile, train_set.grid, len(train_set)) == (40, 2, 8)
    a, b = train_set[(3, 123)], train_set[(3, 123)]
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, train_set[(3, 124)])
    val = CropFolder(str(tmp_path / "imgs"), 64, False, mosaic=True)
    val.check_sizes()
    assert len(val) == 2 and val[1].shape == (64, 64, 3)
    np.testing.assert_array_equal(val[1][:24, :24], val._crop(4, 40, None)[:24, :24])
    with pytest.raises(ClbenchError, match="smaller than --patch 64.*--mosaic"):
        CropFolder(str(tmp_path / "imgs"), 64, True).check_sizes()


def test_learning_rate_schedules():
    from clbench.codecs.train import SCHEDULES

    cfg = TrainConfig(codec="x", train_dir="", out="", lmbda=1, lr=1e-3, lr_min=1e-5, warmup=10)
    cos = SCHEDULES.get("cosine")(cfg)
    assert cos.lr(0, 100) == pytest.approx(1e-4)  # warm-up: 1/10 of the lr
    assert cos.lr(10, 100) == pytest.approx(
        1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(0.1 * math.pi))
    )
    assert cos.lr(100, 100) == pytest.approx(1e-5) and cos.lr(50, None) == 1e-3
    cfg.plateau_patience, cfg.warmup = 2, 0
    plat = SCHEDULES.get("plateau")(cfg)
    for loss in (3.0, 2.0, 2.5, 2.1):  # two validations without improvement: halve
        plat.on_validation(loss)
    assert plat.lr(7, None) == pytest.approx(5e-4)
    copy = SCHEDULES.get("plateau")(cfg)
    copy.load_state_dict(plat.state_dict())
    assert copy.lr(7, None) == plat.lr(7, None)


def test_bf16_autocast_keeps_the_entropy_models_in_fp32():
    import copy

    from clbench.codecs.train import keep_entropy_models_fp32

    torch.manual_seed(0)
    model = get_codec("mbt2018-mean:pretrained=false,N=8,M=8").model.train()
    keys = list(model.state_dict())
    keep_entropy_models_fp32(model)
    x = torch.rand(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = copy.deepcopy(model)(x)
    assert out["x_hat"].dtype == torch.bfloat16  # the transforms run in bf16
    assert {v.dtype for v in out["likelihoods"].values()} == {torch.float32}
    assert list(model.state_dict()) == keys


def test_a_registered_training_method_takes_the_steps(tmp_path):
    from clbench.codecs.train_methods import TrainMethod, register_train_method

    @register_train_method("test-repeat")
    class Repeat(TrainMethod):
        def __init__(self, repeats: int = 1):
            self.repeats, self.calls = repeats, 0

        def step(self, run, x):
            for _ in range(self.repeats):
                run.zero_grad()
                out = run.loss(x)
                out["loss"].backward()
                run.optimizer_step()
            self.calls += 1
            return out

        def log(self, run):
            return {"calls": float(self.calls)}

        def state_dict(self):
            return {"calls": self.calls}

    train(
        _cfg(tmp_path, method="test-repeat", method_opts={"repeats": 2}, steps=2, val_every=1),
        progress=False,
    )
    ckpt = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert ckpt["method"] == {"calls": 2} and ckpt["optimizer"]["state"][0]["step"] == 4
    assert [r["calls"] for r in ckpt["clbench"]["history"]] == [1.0, 2.0]


def test_importing_the_learned_codecs_raises_no_torch_jit_warning():
    code = "from clbench.codecs import get_codec; get_codec('bmshj2018-factorized:pretrained=false,N=8,M=8')"
    res = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
