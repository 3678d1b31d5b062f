"""Run a benchmark: for each (strategy, seed) train experience by experience, evaluate on
every seen experience's test data, and write one versioned run record.

Each (benchmark, strategy, seed) is an independent job (``run_one``) that writes
``<out>/runs/<run_id>.json``; a complete record is skipped on re-run. After every finished
experience the job writes a checkpoint (``<out>/checkpoints/<run_id>.pt``, atomic) and a
``partial`` record, so ``--resume`` continues a killed run from its last finished
experience and, on CPU with the same seed, ends with the same accuracy matrix.
"""

from __future__ import annotations

import datetime as _dt
import io
import platform
import random
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from clbench.backbones import create_backbone
from clbench.config import BenchmarkConfig
from clbench.errors import ClbenchError, ConfigError
from clbench.records import SCHEMA_VERSION, derived_metrics, write_bytes_atomic, write_json_atomic
from clbench.scenarios import Scenario, build_scenario
from clbench.strategies.base import (
    STRATEGIES,
    Experience,
    Strategy,
    StrategyContext,
    autocast,
    strategy_base,
)

PACKAGES = (
    "clbench",
    "torch",
    "torchvision",
    "avalanche-lib",
    "timm",
    "peft",
    "compressai",
    "numpy",
)


def run_id(benchmark: str, strategy: str, seed: int) -> str:
    return f"{benchmark}__{strategy}__s{seed}"


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ClbenchError("--device cuda: no CUDA device is visible; use --device cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ClbenchError(f"--device {name!r}: valid values: cpu, cuda, cuda:N")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    # numpy's state holds an ndarray: stored as a tensor so weights_only loading accepts it
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": list(random.getstate()),
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    v, state, gauss = s["python"]
    random.setstate((v, tuple(state), gauss))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


_GIT_AT_START: dict[str, Any] = {}


def _git_state() -> dict[str, Any]:
    """The commit and dirtiness of the code this process loaded (read once, at first use,
    so a record names the code that ran, not a commit made while a long run was going)."""
    if not _GIT_AT_START:
        status = _git("status", "--porcelain", "--untracked-files=no")
        _GIT_AT_START.update(
            git_commit=_git("rev-parse", "HEAD"),
            git_dirty=None if status is None else bool(status),
        )
    return _GIT_AT_START


def provenance(device: torch.device, command: str) -> dict[str, Any]:
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {
        "clbench_version": versions["clbench"],
        **_git_state(),
        "packages": versions,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "command": command,
        "hostname": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


@torch.no_grad()
def evaluate(strategy: Strategy, data, batch_size: int, device: torch.device) -> tuple[int, int]:
    """(correct, total) of ``strategy.predict`` on an eval-transformed dataset."""
    correct = total = 0
    for batch in DataLoader(data, batch_size=batch_size):
        x, y = strategy.to_device(batch[0]), torch.as_tensor(batch[1]).to(device)
        with autocast(device, strategy.amp):
            logits = strategy.predict(x)
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    return correct, total


@dataclass
class RunState:
    """What a checkpoint holds besides the strategy."""

    done: int = 0  # experiences finished
    matrix: list[list[float | None]] = field(default_factory=list)
    accuracy_seen: list[float] = field(default_factory=list)
    train_time: list[float] = field(default_factory=list)
    eval_time: list[float] = field(default_factory=list)
    images_trained: int = 0
    started_at: str = ""


def build_strategy(
    cfg: BenchmarkConfig,
    name: str,
    scenario: Scenario,
    seed: int,
    device: torch.device,
    progress: bool,
) -> Strategy:
    base = strategy_base(name)
    cls = STRATEGIES.get(base)
    ctx = StrategyContext(
        config=cfg,
        num_classes=scenario.num_classes,
        experience_classes=scenario.experience_classes,
        image_size=scenario.image_size,
        make_backbone=lambda: create_backbone(cfg.backbone, scenario.image_size),
        transforms=scenario.transforms,
        device=device,
        seed=seed,
        progress=progress,
    )
    # A labelled entry "er-compressed@learned" is its own leaderboard row: its parameters
    # go over those of the plain strategy name.
    params = {**(cfg.strategy_params.get(base) or {}), **(cfg.strategy_params.get(name) or {})}
    return cls(ctx, **params)


def run_one(
    cfg: BenchmarkConfig,
    scenario: Scenario,
    strategy_name: str,
    seed: int,
    out_dir: Path,
    *,
    device: torch.device = torch.device("cpu"),
    resume: bool = False,
    command: str = "",
    progress: bool = False,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Run one (strategy, seed); returns the record (None if ``stop_after`` cut it short)."""
    rid = run_id(cfg.name, strategy_name, seed)
    record_path = out_dir / "runs" / f"{rid}.json"
    ckpt_path = out_dir / "checkpoints" / f"{rid}.pt"
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    strategy = build_strategy(cfg, strategy_name, scenario, seed, device, progress)
    test_sets = [e.dataset for e in scenario.test_stream]
    experiences = [
        Experience(index=i, classes=scenario.experience_classes[i], dataset=e.dataset, avalanche=e)
        for i, e in enumerate(scenario.train_stream)
    ]
    st = RunState(started_at=_now())
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        strategy.load_state_dict(ck["strategy"])
        strategy.images_trained = ck["run"]["images_trained"]
        st = RunState(**ck["run"])
        strategy.resume(experiences[: st.done])
        _set_rng_state(ck["rng"])
        log(f"{rid}: resuming after experience {st.done - 1}")
    T = len(experiences)
    prov = provenance(device, command)
    wall0 = time.perf_counter() - sum(st.train_time) - sum(st.eval_time)
    for exp in experiences[st.done :]:
        t0 = time.perf_counter()
        strategy.train_experience(exp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        row: list[float | None] = [None] * T
        correct_all = total_all = 0
        for j in range(exp.index + 1):
            data = strategy.eval_view(test_sets[j])
            c, n = evaluate(strategy, data, cfg.train.eval_batch_size, device)
            row[j] = c / n if n else 0.0
            correct_all, total_all = correct_all + c, total_all + n
        st.matrix.append(row)
        st.accuracy_seen.append(correct_all / max(1, total_all))
        st.train_time.append(t1 - t0)
        st.eval_time.append(time.perf_counter() - t1)
        st.images_trained = strategy.images_trained
        st.done = exp.index + 1
        log(
            f"{rid}: experience {exp.index + 1}/{T} accuracy on seen classes "
            f"{100 * st.accuracy_seen[-1]:.2f}% ({st.train_time[-1]:.1f}s train)"
        )
        record = _record(cfg, scenario, strategy, strategy_name, seed, st, prov, wall0, T)
        if st.done < T:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            _save_atomic(
                {"strategy": strategy.state_dict(), "run": st.__dict__, "rng": _rng_state()},
                ckpt_path,
            )
        write_json_atomic(record_path, record)
        if stop_after is not None and st.done >= stop_after and st.done < T:
            return None
    ckpt_path.unlink(missing_ok=True)
    return record


def _save_atomic(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(path, buf.getvalue())


def _record(cfg, scenario, strategy, name, seed, st: RunState, prov, wall0, T) -> dict[str, Any]:
    train_total = sum(st.train_time)
    mem = strategy.memory()
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id(cfg.name, name, seed),
        "benchmark": cfg.name,
        "strategy": name,
        "seed": seed,
        "status": "complete" if st.done == T else "partial",
        "config": {**cfg.to_dict(), "strategy_params": {name: strategy.params}},
        "class_order": scenario.class_order,
        "class_names": scenario.class_names,
        "experiences": scenario.experience_classes,
        "metrics": {
            "accuracy_matrix": st.matrix,
            "accuracy_seen": st.accuracy_seen,
            # a partial record's metrics cover the experiences finished so far
            **derived_metrics([r[: st.done] for r in st.matrix], st.accuracy_seen),
        },
        "strategy_report": strategy.report(),
        "costs": {
            "wall_time_s": time.perf_counter() - wall0,
            "train_time_s": st.train_time,
            "eval_time_s": st.eval_time,
            "train_images_per_s": st.images_trained / train_total if train_total else 0.0,
            "trainable_params": strategy.trainable_params(),
            "memory_bytes": int(
                sum(
                    mem.get(k) or 0
                    for k in ("buffer_bytes", "model_copies_bytes", "codec_params_bytes")
                )
            ),
            "memory": mem,
            "peak_rss_bytes": peak_rss_bytes(),
        },
        "provenance": {**prov, "started_at": st.started_at, "finished_at": _now()},
    }


def run_benchmark(
    cfg: BenchmarkConfig,
    out_dir: Path,
    *,
    strategies: list[str] | None = None,
    seeds: list[int] | None = None,
    data_root: str | None = None,
    device: str = "cpu",
    resume: bool = False,
    force: bool = False,
    command: str = "",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every (strategy, seed) of ``cfg`` not yet recorded in ``out_dir``."""
    strategies = strategies or cfg.strategies
    seeds = seeds if seeds is not None else cfg.seeds
    for s in strategies:  # fail fast on a typo, before loading any data
        STRATEGIES.get(strategy_base(s))
    unknown = {strategy_base(k) for k in cfg.strategy_params} - set(STRATEGIES.names())
    if unknown:
        raise ConfigError(
            f"strategy_params names unknown strategy {sorted(unknown)[0]!r}; valid: "
            f"{', '.join(STRATEGIES.names())}"
        )
    dev = resolve_device(device)
    scenario = build_scenario(cfg, data_root)
    records = []
    for name in strategies:
        for seed in seeds:
            path = out_dir / "runs" / f"{run_id(cfg.name, name, seed)}.json"
            if not force and _is_complete(path):
                log(f"{path.stem}: already recorded, skipping (--force to re-run)")
                continue
            rec = run_one(
                cfg,
                scenario,
                name,
                seed,
                out_dir,
                device=dev,
                resume=resume,
                command=command,
                progress=progress,
                log=log,
            )
            if rec is not None:
                records.append(rec)
    return records


def _is_complete(path: Path) -> bool:
    import json

    try:
        return json.loads(path.read_text()).get("status") == "complete"
    except (OSError, ValueError):
        return False
