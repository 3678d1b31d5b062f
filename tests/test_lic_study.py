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
    assert str(runs / "resnet-hyperprior") not in printed
    assert study._best_val(runs / "resnet-hyperprior") == 2.5
    assert [r["step"] for r in study._log(runs / "resnet-hyperprior")] == [100, 200]
    # an evaluation is fresh when the weights of its finished runs are gone ...
    out = tmp_path / "res" / "grid" / "results.json"
    out.parent.mkdir(parents=True)
    out.write_text("{}")
    ckpt = runs / "resnet-hyperprior" / "best.pth"
    assert study._fresh(out, [ckpt])
    # ... but not when an unfinished run's are, nor when weights are newer than it
    assert not study._fresh(out, [runs / "convnext-hyperprior" / "best.pth"])
    ckpt.write_bytes(b"w")
    later = time.time() + 10
    os.utime(ckpt, (later, later))
    assert not study._fresh(out, [ckpt])
