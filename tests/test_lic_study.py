"""The efficient-LIC study driver (benchmarks/codecs/lic_study.py) resumes across sessions
from its committed logs alone: no training runs here, only fake logs."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _study(tmp_path: Path):
    spec = importlib.util.spec_from_file_location(
        "lic_study", ROOT / "benchmarks" / "codecs" / "lic_study.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = mod.load_settings(
        [
            "--data-root",
            str(tmp_path / "data"),
            "--runs",
            str(tmp_path / "runs"),
            "--results",
            str(tmp_path / "res"),
            "--transforms",
            "resnet",
            "convnext",
            "--contexts",
            "hyperprior",
            "--dry-run",
        ]  # fmt: skip
    )
    return mod, mod.Study(a)


def _log(run: Path, complete: bool, losses: list[float]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    hist = [{"step": 100 * (i + 1), "loss": v, "psnr": 20.0 + i} for i, v in enumerate(losses)]
    doc = {"config": {}, "complete": complete, "best_val": min(losses), "history": hist}
    (run / "train_log.json").write_text(json.dumps(doc))


def test_finished_runs_are_archived_skipped_and_ranked_without_weights(tmp_path, capsys):
    mod, study = _study(tmp_path)
    runs = tmp_path / "runs" / "grid"
    _log(runs / "resnet-hyperprior", True, [3.0, 2.5])
    _log(runs / "convnext-hyperprior", False, [3.5])  # killed: must resume, not be skipped
    study.a.dry_run = False
    study.archive()
    study.a.dry_run = True
    logs = tmp_path / "res" / "logs" / "grid"
    assert (logs / "resnet-hyperprior" / "train_log.json").is_file()
    assert not (logs / "convnext-hyperprior").exists()
    # a later session: the runs (weights and live logs) are gone, the archive is not
    for f in runs.rglob("*"):
        if f.is_file():
            f.unlink()
    study.grid()
    printed = capsys.readouterr().out
    assert "--out " + str(runs / "convnext-hyperprior") in printed
    # finished but never evaluated, and its weights are gone: trained again, then evaluated
    assert "--out " + str(runs / "resnet-hyperprior") in printed
    res = tmp_path / "res" / "grid"
    for name in ("resnet-hyperprior", "JPEG"):
        (res / name).mkdir(parents=True)
        (res / name / "results.json").write_text("{}")
    study.grid()
    printed = capsys.readouterr().out  # evaluated: nothing left to do for it
    assert (
        str(runs / "resnet-hyperprior") not in printed and "grid-eval: Kodak, JPEG" not in printed
    )
    assert "grid-eval: Kodak, convnext-hyperprior" in printed
    assert study._best_val(runs / "resnet-hyperprior") == 2.5
    assert [r["step"] for r in study._log(runs / "resnet-hyperprior")] == [100, 200]
    # an evaluation is fresh when the weights of its finished runs are gone ...
    out = res / "resnet-hyperprior" / "results.json"
    ckpt = runs / "resnet-hyperprior" / "best.pth"
    assert study._fresh(out, [ckpt])
    # ... but not when an unfinished run's are, nor when weights are newer than it
    assert not study._fresh(out, [runs / "convnext-hyperprior" / "best.pth"])
    ckpt.write_bytes(b"w")
    later = time.time() + 10
    os.utime(ckpt, (later, later))
    assert not study._fresh(out, [ckpt])


def test_ranking_reads_each_models_own_evaluation_and_the_archived_log(tmp_path):
    _, study = _study(tmp_path)
    _log(tmp_path / "runs" / "grid" / "resnet-hyperprior", True, [3.0, 2.5])
    _log(tmp_path / "runs" / "grid" / "convnext-hyperprior", True, [2.0])

    def result(name: str, points: list[tuple[float, float]]) -> None:
        f = study.grid_result(name)
        f.parent.mkdir(parents=True, exist_ok=True)
        pts = [{"bpp": b, "psnr": q, "params": 10, "dec_kmacs_px": 5.0} for b, q in points]
        f.write_text(json.dumps({"curves": [{"label": name, "points": pts}]}))

    result("JPEG", [(0.25, 26.0), (0.5, 29.0), (1.0, 32.0)])
    result("resnet-hyperprior", [(0.4, 29.0)])  # 20 % fewer bits than JPEG at 29 dB
    result("convnext-hyperprior", [(0.5, 35.0)])  # outside JPEG's PSNR range
    rows = study.ranking()
    assert [r["label"] for r in rows] == ["convnext-hyperprior", "resnet-hyperprior"]
    assert rows[1]["val_loss"] == 2.5 and abs(rows[1]["saving_vs_jpeg_pct"] + 20) < 1e-9
    assert rows[0]["saving_vs_jpeg_pct"] != rows[0]["saving_vs_jpeg_pct"]  # NaN: no JPEG there


def test_final_trains_then_evaluates_each_model_and_reports_its_bd_rates(tmp_path, capsys):
    _, study = _study(tmp_path)
    spec = "eff-lic:transform=resnet,context=hyperprior,N=96,M=192"
    study.a.final, study.a.jobs, study.a.threads = [spec], 2, 1
    study.final()
    printed = capsys.readouterr().out
    runs = tmp_path / "runs" / "final" / "resnet-hyperprior"
    lams = study.a.final_lambdas
    # one training per λ, then the evaluation of all four checkpoints, in that order
    outs = [printed.index(f"--out {runs / f'lambda-{lm:g}'} ") for lm in lams]
    ev = printed.index("final-eval: Kodak R-D of resnet-hyperprior")
    assert max(outs) < ev and "--threads 2 --no-progress" in printed[ev:]
    # three λ finished and archived, one killed: only that one trains again
    for lm in lams[:3]:
        _log(runs / f"lambda-{lm:g}", True, [3.0])
    study.a.dry_run = False
    study.archive()
    study.a.dry_run = True
    assert [c[0][c[0].index("--lambda") + 1] for c in study._final_trains(spec, False)] == [
        f"{lams[3]:g}"
    ]
    # its evaluation on disk: the report reads its BD-rates and draws the Pareto plot
    f = study.final_result(spec)
    f.parent.mkdir(parents=True)
    pts = [
        {"bpp": b, "psnr": q, "params": 10, "enc_kmacs_px": 4.0, "dec_kmacs_px": 5.0}
        for b, q in [(0.2, 27.0), (0.4, 29.5), (0.7, 32.0), (1.1, 34.0)]
    ]
    bd = [
        {"curve": "resnet-hyperprior", "anchor": "JPEG", "metric": "psnr", "bd_rate_pct": -30.0,
         "psnr_range": [27.0, 34.0]},
        {"curve": "resnet-hyperprior", "anchor": "WebP", "metric": "psnr", "bd_rate_pct": 5.0},
        {"curve": "WebP", "anchor": "JPEG", "metric": "psnr", "bd_rate_pct": -25.0},
    ]  # fmt: skip
    f.write_text(
        json.dumps({"curves": [{"label": "resnet-hyperprior", "points": pts}], "bd_rate": bd})
    )
    log = runs / f"lambda-{lams[0]:g}" / "train_log.json"
    log.write_text(
        json.dumps({**json.loads(log.read_text()), "provenance": {"cpu": {"model": "CPU-A"}}})
    )
    (row,) = study.final_rows()
    assert row["steps"] == [100, 100] and row["cpu"] == "CPU-A"  # minutes buy CPU-dependent steps
    capsys.readouterr()
    study.final()  # trained elsewhere: the next model's minutes are not comparable, said once
    assert (
        "final models trained on another CPU ({'resnet-hyperprior': 'CPU-A'})"
        in capsys.readouterr().err
    )
    assert row["bd_vs_JPEG"] == -30.0 and row["bd_vs_WebP"] == 5.0 and row["dec_kmacs_px"] == 5.0
    assert row["psnr"] == [27.0, 34.0] and row["range_vs_WebP"] is None
    study.a.dry_run = False
    study.report()
    readme = (tmp_path / "res" / "README.md").read_text()
    assert "| -30.0 % | 27.00-34.00 dB | 5.0 % | n/a |" in readme
    assert "| 100 | CPU-A |" in readme
    assert "against JPEG: WebP -25.0 %." in readme
    assert (tmp_path / "res" / "final_pareto.png").stat().st_size > 1000


def test_finals_with_unequal_steps_are_also_compared_at_a_common_step(tmp_path):
    _, study = _study(tmp_path)
    study.a.dry_run = False
    lams = study.a.final_lambdas
    for name, n in (("resnet-hyperprior", 5), ("resnet-channel", 2)):
        for lm in lams:  # the first model's minutes bought 500 steps, the second's 200
            _log(
                tmp_path / "runs" / "final" / name / f"lambda-{lm:g}",
                True,
                [4.0 - i for i in range(n)],
            )
        f = tmp_path / "res" / "final" / name / "results.json"
        f.parent.mkdir(parents=True)
        pts = [{"bpp": 0.2 * (i + 1), "psnr": 27.0 + i, "dec_kmacs_px": 5.0} for i in range(4)]
        f.write_text(json.dumps({"curves": [{"label": name, "points": pts}], "bd_rate": []}))
    assert [r["steps"] for r in study.final_rows()] == [[200, 200], [500, 500]]
    study.report()
    readme = (tmp_path / "res" / "README.md").read_text()
    assert "### Validation at equal steps" in readme
    # each λ: both models at step 200, the last one both logged
    assert f"| {lams[0]:g} | 200 | resnet-channel | 3.0000 | 21.00 | n/a | n/a |" in readme
    assert f"| {lams[-1]:g} | 200 | resnet-hyperprior | 3.0000 | 21.00 | n/a | n/a |" in readme
    assert "| 300 |" not in readme
