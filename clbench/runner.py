"""Run a benchmark: for each (strategy, seed) train experience by experience, evaluate on
every seen experience's test data, and write one versioned run record.

Each (benchmark, strategy, seed) is an independent job (``run_one``) that writes
``<out>/runs/<run_id>.json``. :func:`run_benchmark` first checks everything it can before
any training starts (device, output folder, data root, every strategy built with its
parameters, existing records and checkpoints), holding one lock per run id so that two
processes never write the same run. A complete record of the same config is skipped; one of
a different config is refused, naming the keys that differ. After every finished experience
the job writes a checkpoint (``<out>/checkpoints/<run_id>.pt``, atomic, stamped with the run
id, strategy and config fingerprint) and a ``partial`` record, so ``--resume`` continues a
killed run from its last finished experience and, on CPU with the same seed, ends with the
same accuracy matrix. Experiences are numbered from 0 everywhere (console, records, plots).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import resource
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from clbench.atomic import (
    check_writable_dir,
    fault_point,
    remove_orphans,
    run_lock,
    torch_save_atomic,
    write_json_atomic,
)
from clbench.backbones import create_backbone
from clbench.config import BenchmarkConfig
from clbench.data import DATA_ROOT_ENV, resolve_data_root
from clbench.engine import resolved_amp
from clbench.errors import ClbenchError, ClbenchWarning, ConfigError
from clbench.provenance import now_utc, provenance
from clbench.records import (
    CHECKPOINTS_SUBDIR,
    RUNS_SUBDIR,
    SCHEMA_VERSION,
    RunRecord,
    checkpoint_path,
    config_diff,
    config_fingerprint,
    derived_metrics,
    describe_diff,
    lock_path,
    parse_record_file,
    record_path,
    run_id,
)
from clbench.scenarios import Scenario, build_scenario
from clbench.strategies.base import (
    STRATEGIES,
    Experience,
    Strategy,
    StrategyContext,
    autocast,
    strategy_base,
)

__all__ = ["run_benchmark", "run_one", "build_strategy", "run_id", "resolve_device"]


def _import_qpsolvers_quietly() -> None:
    # Avalanche imports qpsolvers for its GEM plugin, which clbench does not use; with no QP
    # solver installed, qpsolvers warns at import on every command. Importing it first with
    # that one warning ignored (scoped to this import) keeps runs quiet; later imports of the
    # cached module do not warn again.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)
        with contextlib.suppress(ImportError):
            import qpsolvers  # noqa: F401


_import_qpsolvers_quietly()

# Bumped when what a checkpoint holds changes, so an old checkpoint is refused by name.
CHECKPOINT_VERSION = 2


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, checked against the devices this machine has."""
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if name == "cpu":
        return torch.device("cpu")
    if m is None:
        raise ClbenchError(f"--device {name!r}: valid values: cpu, cuda, cuda:N (N a device index)")
    if not torch.cuda.is_available():
        raise ClbenchError(f"--device {name}: no CUDA device is visible; use --device cpu")
    count, index = torch.cuda.device_count(), int(m[1] or 0)
    if index >= count:
        raise ClbenchError(
            f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}); "
            "pick one of them or --device cpu"
        )
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
    warnings: list[str] = field(default_factory=list)


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


def run_config(cfg: BenchmarkConfig, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The config a run's record stores: the benchmark's, with only this strategy's resolved
    parameters (its fingerprint is the run's config identity)."""
    return {**cfg.to_dict(), "strategy_params": {name: params}}


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_meta(rid: str, name: str, seed: int, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "checkpoint_version": CHECKPOINT_VERSION,
        "schema_version": SCHEMA_VERSION,
        "run_id": rid,
        "strategy": name,
        "seed": seed,
        "config_fingerprint": config_fingerprint(config),
        "config_json": json.dumps(config, sort_keys=True, default=str),
    }


def load_checkpoint(
    path: Path, rid: str, name: str, seed: int, config: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    """Load a run's checkpoint and check it belongs to this run and config.

    Raises:
        ClbenchError: unreadable (truncated/corrupt), written by an older clbench, or for
            another run, strategy or config; the message says what differs.
    """
    fix = f"delete {path} to start the run over"
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... by damage
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ClbenchError(
            f"checkpoint {path} is unreadable (truncated or corrupt: {first[:160]}); {fix}"
        ) from None
    meta = ck.get("meta") if isinstance(ck, dict) else None
    if not isinstance(meta, dict) or meta.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise ClbenchError(
            f"checkpoint {path} does not say which run and config it belongs to (written by an "
            f"older clbench, or not a clbench checkpoint); {fix}"
        )
    for key, want in (("strategy", name), ("seed", seed), ("run_id", rid)):
        if meta.get(key) != want:
            raise ClbenchError(
                f"checkpoint {path} belongs to {key} {meta.get(key)!r}, not {want!r} (copied or "
                f"renamed from another run?); {fix}"
            )
    if meta.get("config_fingerprint") != config_fingerprint(config):
        diff = config_diff(json.loads(meta["config_json"]), config)
        raise ClbenchError(
            f"checkpoint {path} was written with another config ({describe_diff(diff)}); resume "
            f"with the settings it was started with, or {fix}"
        )
    return ck


# --------------------------------------------------------------------------- one run


_SHOWN: set[tuple] = set()


@contextlib.contextmanager
def _collect_warnings(sink: list[str], log: Callable[[str], None], rid: str):
    """Keep every ClbenchWarning raised inside (for the record) and print it once; other
    warnings are shown as usual."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ClbenchWarning)
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, ClbenchWarning):
                    msg = str(w.message)
                    if msg not in sink:
                        sink.append(msg)
                        log(f"{rid}: warning: {msg}")
                else:  # catch_warnings resets "once per location": keep it once here
                    key = (w.category, str(w.message), w.filename, w.lineno)
                    if key not in _SHOWN:
                        _SHOWN.add(key)
                        warnings.showwarning(w.message, w.category, w.filename, w.lineno)


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
    lock_timeout: float = 0.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Run one (strategy, seed) under its run-id lock; returns the record's dict (None if
    ``stop_after`` cut it short). It does not skip: :func:`run_benchmark` decides that."""
    rid = run_id(cfg.name, strategy_name, seed)
    with run_lock(lock_path(out_dir, rid), lock_timeout, what=f"run {rid}"):
        return _run_one(
            cfg,
            scenario,
            strategy_name,
            seed,
            Path(out_dir),
            device=device,
            resume=resume,
            command=command,
            progress=progress,
            stop_after=stop_after,
            log=log,
        )


def _run_one(
    cfg: BenchmarkConfig,
    scenario: Scenario,
    strategy_name: str,
    seed: int,
    out_dir: Path,
    *,
    device: torch.device,
    resume: bool,
    command: str,
    progress: bool,
    stop_after: int | None,
    log: Callable[[str], None],
) -> dict[str, Any] | None:
    rid = run_id(cfg.name, strategy_name, seed)
    rec_path, ckpt_path = record_path(out_dir, rid), checkpoint_path(out_dir, rid)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    strategy = build_strategy(cfg, strategy_name, scenario, seed, device, progress)
    config = run_config(cfg, strategy_name, strategy.params)
    test_sets = [e.dataset for e in scenario.test_stream]
    experiences = [
        Experience(index=i, classes=scenario.experience_classes[i], dataset=e.dataset, avalanche=e)
        for i, e in enumerate(scenario.train_stream)
    ]
    st = RunState(started_at=now_utc())
    if resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path, rid, strategy_name, seed, config, device)
        try:
            strategy.load_state_dict(ck["strategy"])
        except ClbenchError as e:  # e.g. a replay buffer's CRC32 check: name the file
            raise ClbenchError(f"checkpoint {ckpt_path}: {e}") from None
        strategy.images_trained = ck["run"]["images_trained"]
        st = RunState(**ck["run"])
        strategy.resume(experiences[: st.done])
        _set_rng_state(ck["rng"])
        log(f"{rid}: resuming after experience {st.done - 1}")
    T = len(experiences)
    prov = provenance(device, command)
    wall0 = time.perf_counter() - sum(st.train_time) - sum(st.eval_time)
    record: RunRecord | None = None
    for exp in experiences[st.done :]:
        t0 = time.perf_counter()
        with _collect_warnings(st.warnings, log, rid):
            strategy.train_experience(exp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        fault_point(f"train:{exp.index}")
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
            f"{rid}: experience {exp.index} (of 0..{T - 1}): accuracy on seen classes "
            f"{100 * st.accuracy_seen[-1]:.2f}% ({st.train_time[-1]:.1f}s train)"
        )
        record = _record(cfg, scenario, strategy, strategy_name, seed, st, prov, wall0, T, config)
        if st.done < T:
            torch_save_atomic(
                {
                    "meta": _checkpoint_meta(rid, strategy_name, seed, config),
                    "strategy": strategy.state_dict(),
                    "run": st.__dict__,
                    "rng": _rng_state(),
                },
                ckpt_path,
            )
            fault_point(f"checkpoint:{exp.index}")
        write_json_atomic(rec_path, record.to_dict())
        fault_point(f"record:{exp.index}")
        if stop_after is not None and st.done >= stop_after and st.done < T:
            return None
    ckpt_path.unlink(missing_ok=True)
    if record is None:  # resumed from a checkpoint of the last experience: nothing left to do
        raise ClbenchError(f"checkpoint {ckpt_path} is already past the last experience; delete it")
    return record.to_dict()


def _record(cfg, scenario, strategy, name, seed, st: RunState, prov, wall0, T, config) -> RunRecord:
    train_total = sum(st.train_time)
    mem = strategy.memory()
    return RunRecord(
        benchmark=cfg.name,
        strategy=name,
        seed=seed,
        status="complete" if st.done == T else "partial",
        config=config,
        class_order=scenario.class_order,
        class_names=scenario.class_names,
        experiences=scenario.experience_classes,
        metrics={
            "accuracy_matrix": st.matrix,
            "accuracy_seen": st.accuracy_seen,
            # a partial record's metrics cover the experiences finished so far
            **derived_metrics([r[: st.done] for r in st.matrix], st.accuracy_seen),
        },
        strategy_report=strategy.report(),
        warnings=list(st.warnings),
        # epochs = 0 is allowed (e.g. to measure a training-free baseline), but such a row
        # must not pass for a trained model
        untrained=cfg.train.epochs == 0 and st.images_trained == 0,
        costs={
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
        provenance={**prov, "started_at": st.started_at, "finished_at": now_utc()},
    )


# --------------------------------------------------------------------------- a benchmark


@dataclass
class PlannedRun:
    """One (strategy, seed) of a benchmark and what the pre-flight decided for it."""

    name: str
    seed: int
    rid: str
    config: dict[str, Any]
    action: str  # "run" | "resume" | "skip"
    stale_checkpoint: bool = False  # a checkpoint left beside a complete record


def _check_data_root(cfg: BenchmarkConfig, data_root: str | None) -> None:
    root = resolve_data_root(cfg.dataset.root or data_root)
    if root.exists() and not root.is_dir():
        source = (
            "dataset.root"
            if cfg.dataset.root
            else "--data-root"
            if data_root
            else f"${DATA_ROOT_ENV}"
            if os.environ.get(DATA_ROOT_ENV)
            else "the default data root"
        )
        raise ClbenchError(
            f"{source} {root} is a file, not a folder; pass the folder that holds the datasets "
            "(see docs/datasets.md)"
        )


def _plan_one(
    out_dir: Path, name: str, seed: int, rid: str, config: dict[str, Any], *, resume: bool,
    force: bool, device: torch.device, log: Callable[[str], None],
) -> PlannedRun:  # fmt: skip
    """Decide skip / run / resume for one run from what ``out_dir`` holds; raise on conflict.
    Reads only: whatever it decides is done after every run of the command was planned."""
    rec_path, ckpt_path = record_path(out_dir, rid), checkpoint_path(out_dir, rid)
    old = None
    if rec_path.exists():
        old, reason = parse_record_file(rec_path)
        if old is None and not force:
            raise ClbenchError(
                f"run record {rec_path} is not a valid record ({reason}); move it away, or pass "
                "--force to replace it"
            )
    plan = PlannedRun(name, seed, rid, config, "run")
    if old is not None and old.complete:
        # A checkpoint beside a complete record was left by a kill after the record was
        # written: stale. It is removed, so that --force --resume starts over.
        plan.stale_checkpoint = ckpt_path.is_file()
        same = old.config_fingerprint == config_fingerprint(config)
        if same and not force:
            log(f"{rid}: already recorded, skipping (--force to re-run)")
            plan.action = "skip"
        elif not same and not force:
            diff = describe_diff(config_diff(old.config, config))
            base = strategy_base(name)
            raise ClbenchError(
                f"{rec_path} was recorded with another config ({diff}); pass --force to "
                f"replace it, or run the new config as its own row: --strategy {base}@LABEL "
                f"with --set strategy_params.{base}@LABEL.KEY=VALUE"
            )
        return plan
    if ckpt_path.is_file():
        if resume:
            load_checkpoint(ckpt_path, rid, name, seed, config, device)
            plan.action = "resume"
        else:
            log(
                f"{rid}: an unfinished run's checkpoint exists; starting over (--resume continues it)"
            )
    elif old is not None and resume:
        log(f"{rid}: partial record without a checkpoint; starting over")
    return plan


def plan_benchmark(
    cfg: BenchmarkConfig,
    scenario: Scenario,
    out_dir: Path,
    strategies: list[str],
    seeds: list[int],
    *,
    device: torch.device,
    resume: bool,
    force: bool,
    log: Callable[[str], None] = print,
) -> list[PlannedRun]:
    """Build every strategy once (its parameters are typed and checked at construction) and
    decide each run's action. Raises on the first conflict; trains nothing."""
    configs = {}
    for name in strategies:
        seed_everything(seeds[0])
        strategy = build_strategy(cfg, name, scenario, seeds[0], device, False)
        configs[name] = run_config(cfg, name, strategy.params)
        del strategy
    plan = []
    for name in strategies:
        for seed in seeds:
            plan.append(
                _plan_one(
                    out_dir, name, seed, run_id(cfg.name, name, seed), configs[name],
                    resume=resume, force=force, device=device, log=log,
                )
            )  # fmt: skip
    return plan


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
    lock_timeout: float = 0.0,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every (strategy, seed) of ``cfg`` not yet recorded in ``out_dir``.

    Everything a user can get wrong is checked before the first experience trains: the
    strategy names and parameters, the device, the output folder, the data root, the data,
    existing records (same config: skip; another config: refused unless ``force``) and, with
    ``resume``, each checkpoint's run and config. The run-id locks are held for the whole
    call; another process holding one makes this call fail (or wait ``lock_timeout`` s).
    """
    out_dir = Path(out_dir)
    strategies = list(dict.fromkeys(strategies or cfg.strategies))
    seeds = list(dict.fromkeys(seeds if seeds is not None else cfg.seeds))
    for s in strategies:  # fail fast on a typo, before loading any data
        STRATEGIES.get(strategy_base(s))
    unknown = {strategy_base(k) for k in cfg.strategy_params} - set(STRATEGIES.names())
    if unknown:
        raise ConfigError(
            f"strategy_params names unknown strategy {sorted(unknown)[0]!r}; valid: "
            f"{', '.join(STRATEGIES.names())}"
        )
    dev = resolve_device(device)
    # `amp: auto` is resolved here, once, to what this machine runs (bf16 only where the
    # device multiplies bf16 natively), and the record stores the resolved value: the same
    # `auto` gives different numbers on different machines, so it is part of the config
    # identity and a leaderboard never ranks a bf16 run with an fp32 one in one row.
    cfg.train.amp = resolved_amp(cfg.train.amp, dev)
    check_writable_dir(out_dir, "--out")
    _check_data_root(cfg, data_root)
    scenario = build_scenario(cfg, data_root)
    # tqdm bars only on a terminal: in a log file every redraw would be a line of '\r' frames
    progress = progress and sys.stderr.isatty()
    records = []
    with contextlib.ExitStack() as locks:
        for name in strategies:
            for seed in seeds:
                rid = run_id(cfg.name, name, seed)
                locks.enter_context(
                    run_lock(lock_path(out_dir, rid), lock_timeout, what=f"run {rid}")
                )
        remove_orphans(out_dir, out_dir / RUNS_SUBDIR, out_dir / CHECKPOINTS_SUBDIR)
        plan = plan_benchmark(
            cfg, scenario, out_dir, strategies, seeds,
            device=dev, resume=resume, force=force, log=log,
        )  # fmt: skip
        for run in plan:
            if run.stale_checkpoint:
                checkpoint_path(out_dir, run.rid).unlink(missing_ok=True)
        for run in plan:
            if run.action == "skip":
                continue
            rec = _run_one(
                cfg,
                scenario,
                run.name,
                run.seed,
                out_dir,
                device=dev,
                resume=run.action == "resume",
                command=command,
                progress=progress,
                stop_after=None,
                log=log,
            )
            if rec is not None:
                records.append(rec)
    return records
