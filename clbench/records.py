"""Run records: the versioned JSON each (benchmark, strategy, seed) run leaves behind.

One type, :class:`RunRecord` (``to_dict``/``from_dict``, ``run_id``), is what the runner
writes, the leaderboard reads and the tests build. The runner writes one record per run to
``<out>/runs/<run_id>.json`` atomically; :func:`load_records` reads them back and never raises
on a bad file but reports it as skipped with a reason. The derived metrics (Ā, A_T,
forgetting, BWT) are computed here, once, by :func:`derived_metrics`, so that the runner
that writes them and the validator that checks them cannot disagree.

A record's identity is its run id AND its config fingerprint (:func:`config_fingerprint`):
the runner skips a run only when the recorded config is the same, and the leaderboard never
puts two configs in one row. The schema is documented in docs/run-records.md; bump
:data:`SCHEMA_VERSION` when a field is removed or changes meaning (adding a field does not
need a bump: readers ignore extras). Version 1 records still load: their fingerprint is
computed from their stored config.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Atomic writes live in clbench.atomic; re-exported here because codecs, benchmarks and
# tests import them from this module.
from clbench.atomic import (  # noqa: F401
    _fsync_dir,
    _json_default,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Where `clbench run` and `clbench leaderboard` work by default: git-ignored, so a fresh
# clone trains instead of finding the committed results/ "already recorded".
DEFAULT_RESULTS_DIR = "results-local"
RUNS_SUBDIR = "runs"
CHECKPOINTS_SUBDIR = "checkpoints"
LOCKS_SUBDIR = ".locks"
STATUSES = ("complete", "partial")

# A derived metric stored in a record may differ from its recomputation by float noise only.
_TOL = 1e-6


def run_id(benchmark: str, strategy: str, seed: int) -> str:
    """``<benchmark>__<strategy>__s<seed>``: the name of a run's record, checkpoint and lock."""
    return f"{benchmark}__{strategy}__s{seed}"


def record_path(out_dir: str | os.PathLike, rid: str) -> Path:
    return Path(out_dir) / RUNS_SUBDIR / f"{rid}.json"


def checkpoint_path(out_dir: str | os.PathLike, rid: str) -> Path:
    return Path(out_dir) / CHECKPOINTS_SUBDIR / f"{rid}.pt"


def lock_path(out_dir: str | os.PathLike, rid: str) -> Path:
    """The lock file for one run id (``clbench.atomic.run_lock`` holds it)."""
    return Path(out_dir) / LOCKS_SUBDIR / f"{rid}.lock"


# --------------------------------------------------------------------------- config identity

# Keys that do not change what a run computes, so two configs that differ only in them are
# the same experiment: which runs a file lists (name is in the run id), where the data lives,
# and knobs of speed only (data loading, threads, eval batching, memory layout).
NON_IDENTITY_KEYS = frozenset(
    {
        "name",
        "description",
        "strategies",
        "seeds",
        "dataset.root",
        "dataset.download",
        "dataset.in_memory",
        "train.num_workers",
        "train.threads",
        "train.eval_batch_size",
        "train.channels_last",
    }
)


def _plain(cfg: Any) -> Any:
    # The JSON round trip a record goes through (tuples -> lists, numpy -> Python), so a live
    # config and the same config read back from a record give the same fingerprint.
    return json.loads(json.dumps(cfg, default=_json_default, allow_nan=True))


def identity_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` (a record's ``config``) without the :data:`NON_IDENTITY_KEYS`."""
    out = _plain(cfg)
    for dotted in NON_IDENTITY_KEYS:
        *parents, last = dotted.split(".")
        node = out
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def legacy_resolved_amp(cfg: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 record's config with ``train.amp: auto`` replaced by what it ran with.

    Since schema 2 the runner stores the precision ``auto`` resolved to on the machine
    (bf16 on CPUs with native bf16 matmuls, fp32 on others), because the same ``auto`` gives
    different numbers on different machines. Before schema 2 ``auto`` meant bf16 on CUDA and
    fp32 on every CPU, so the record's device says which it was."""
    train = cfg.get("train") if isinstance(cfg, dict) else None
    if not isinstance(train, dict) or train.get("amp") != "auto":
        return cfg
    on_cuda = str(provenance.get("device", "cpu")).startswith("cuda")
    return {**cfg, "train": {**train, "amp": "bf16" if on_cuda else "off"}}


def config_fingerprint(cfg: dict[str, Any]) -> str:
    """A short stable hash of what a run computes: 16 hex digits of the SHA-256 of the
    canonical JSON of :func:`identity_config` (keys sorted). Takes a record's ``config``
    (the benchmark config with ``strategy_params`` holding only the run's own strategy)."""
    text = json.dumps(identity_config(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


_ABSENT = object()


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The identity keys that differ, as ``"key: old -> new"`` (dotted keys, sorted)."""
    a, b = _flatten(identity_config(old)), _flatten(identity_config(new))
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va != vb:
            show = lambda v: "(absent)" if v is _ABSENT else json.dumps(v)  # noqa: E731
            out.append(f"{key}: {show(va)} -> {show(vb)}")
    return out


def describe_diff(diff: list[str], limit: int = 4) -> str:
    """``diff`` on one line, at most ``limit`` keys and a count of the rest."""
    more = f" (and {len(diff) - limit} more)" if len(diff) > limit else ""
    return "; ".join(diff[:limit]) + more


# --------------------------------------------------------------------------- derived metrics


def derived_metrics(
    matrix: Sequence[Sequence[float | None]], accuracy_seen: Sequence[float]
) -> dict[str, float]:
    """Ā, A_T, forgetting and BWT from an accuracy matrix (fractions in [0, 1]).

    ``matrix[i][j]`` is the accuracy on experience j's test classes after training
    experience i (``None`` for j > i); ``accuracy_seen[i]`` the accuracy on all test samples
    of experiences 0..i after training experience i. With T experiences:

    - avg_incremental_accuracy = mean_i accuracy_seen[i]
    - last_accuracy            = accuracy_seen[T-1]
    - forgetting = mean_{j<T-1} ( max_{j<=i<T-1} R[i][j] - R[T-1][j] )   (0 when T == 1)
    - bwt        = mean_{j<T-1} ( R[T-1][j] - R[j][j] )                   (0 when T == 1)

    A partial run's matrix has fewer rows than columns (k rows of the full width after k of
    the experiences); the metrics are then those "so far", with T = k.

    Raises:
        ValueError: if the matrix is empty, ragged, has fewer columns than rows, has a null
            at or below the diagonal, or ``accuracy_seen`` does not have one entry per row.
    """
    T = len(matrix)
    if T == 0:
        raise ValueError("accuracy matrix is empty")
    if len(accuracy_seen) != T:
        raise ValueError(f"accuracy_seen has {len(accuracy_seen)} entries, expected {T}")
    width = len(matrix[0])
    if width < T:
        raise ValueError(f"accuracy matrix has {T} rows but only {width} columns")
    for i, row in enumerate(matrix):
        if len(row) != width:
            raise ValueError(f"accuracy matrix row {i} has {len(row)} entries, expected {width}")
        if any(row[j] is None for j in range(i + 1)):
            raise ValueError(f"accuracy matrix row {i} has null entries at or below the diagonal")
    R = matrix
    last = T - 1
    old = range(last)  # experiences that can be forgotten: all but the last
    forgetting = (
        sum(max(R[i][j] for i in range(j, last)) - R[last][j] for j in old) / last if T > 1 else 0.0
    )
    bwt = sum(R[last][j] - R[j][j] for j in old) / last if T > 1 else 0.0
    return {
        "avg_incremental_accuracy": sum(accuracy_seen) / T,
        "last_accuracy": float(accuracy_seen[last]),
        "forgetting": float(forgetting),
        "bwt": float(bwt),
    }


# --------------------------------------------------------------------------- validation


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _describe(x: Any) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # 'nan', 'inf'
    return "null" if x is None else type(x).__name__


# Per-key checks: (predicate, what was expected). A table instead of branches on key names.
_NUM = (lambda x: _is_num(x) and math.isfinite(x), "a finite number")
_INT = (_is_int, "an integer")
_NONNEG_INT = (lambda x: _is_int(x) and x >= 0, "a non-negative integer")
_STR = (lambda x: isinstance(x, str), "a string")
_NONEMPTY_STR = (lambda x: isinstance(x, str) and x != "", "a non-empty string")
_DICT = (lambda x: isinstance(x, dict), "an object")
_OPT_STR = (lambda x: x is None or isinstance(x, str), "a string or null")
_OPT_BOOL = (lambda x: x is None or isinstance(x, bool), "true, false or null")
_OPT_NONNEG_INT = (lambda x: x is None or _NONNEG_INT[0](x), "a non-negative integer or null")
_OPT_NUM = (lambda x: x is None or _NUM[0](x), "a finite number or null")
_NUM_LIST = (
    lambda x: isinstance(x, list) and all(_NUM[0](v) for v in x),
    "a list of finite numbers",
)
_INT_LIST = (lambda x: isinstance(x, list) and all(_is_int(v) for v in x), "a list of integers")

_HEADER = {
    "run_id": _NONEMPTY_STR,
    "benchmark": _NONEMPTY_STR,
    "strategy": _NONEMPTY_STR,
    "seed": _INT,
    "status": (lambda x: x in STATUSES, " or ".join(repr(s) for s in STATUSES)),
}
_BODY = {
    "config": _DICT,
    "class_order": _INT_LIST,
    "experiences": (
        lambda x: isinstance(x, list) and all(_INT_LIST[0](e) for e in x),
        "a list of lists of integers",
    ),
    "metrics": _DICT,
    "costs": _DICT,
    "provenance": _DICT,
}
# Added in version 2: the config identity, warnings raised during the run, and whether the
# model was trained at all (train.epochs = 0 and not one image trained).
_BODY_V2 = {
    "config_fingerprint": _NONEMPTY_STR,
    "warnings": (
        lambda x: isinstance(x, list) and all(isinstance(w, str) for w in x),
        "a list of strings",
    ),
    "untrained": (lambda x: isinstance(x, bool), "true or false"),
}
_METRIC_SCALARS = ("avg_incremental_accuracy", "last_accuracy", "forgetting", "bwt")
_COSTS = {
    "wall_time_s": _NUM,
    "train_time_s": _NUM_LIST,
    "eval_time_s": _NUM_LIST,
    "train_images_per_s": _NUM,
    "trainable_params": _NONNEG_INT,
    "memory_bytes": _NONNEG_INT,
    "memory": _DICT,
    "peak_rss_bytes": _NONNEG_INT,
}
_MEMORY = {"buffer_bytes": _NONNEG_INT, "model_copies_bytes": _NONNEG_INT}
_MEMORY_OPTIONAL = {
    "exemplars": _OPT_NONNEG_INT,
    "mean_bpp": _OPT_NUM,
    "codec_params_bytes": _OPT_NONNEG_INT,
}
_PROVENANCE = {
    "clbench_version": _STR,
    "git_commit": _OPT_STR,
    "git_dirty": _OPT_BOOL,
    "packages": _DICT,
    "device": _STR,
    "threads": _INT,
    "command": _STR,
    "started_at": _STR,
    "finished_at": _STR,
    "hostname": _STR,
    "python": _STR,
    "platform": _STR,
}


def _check_keys(
    d: dict, spec: dict, prefix: str, problems: list[str], *, required: bool = True
) -> None:
    for key, (ok, expected) in spec.items():
        if key not in d:
            if required:
                problems.append(f"missing key {prefix}{key}")
        elif not ok(d[key]):
            problems.append(f"{prefix}{key} is {_describe(d[key])}, expected {expected}")


def validate_record(d: Any) -> list[str]:
    """Problems that make ``d`` an invalid run record (schema 1 or 2); empty when it is valid.

    A ``partial`` record (a run killed before it finished) only needs a valid header
    (schema_version, run_id, benchmark, strategy, seed, status): its metrics may be
    incomplete. A complete record must match the whole schema, and its stored derived
    metrics must agree with :func:`derived_metrics` of its accuracy matrix. A version-2
    record's ``config_fingerprint`` must be that of its ``config``.
    """
    if not isinstance(d, dict):
        return [f"top level is {_describe(d)}, expected a JSON object"]
    if "schema_version" not in d:
        return ["missing key schema_version"]
    version = d["schema_version"]
    if not _is_int(version) or version not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        return [f"schema_version is {version!r}, this clbench reads versions {readable}"]
    problems: list[str] = []
    _check_keys(d, _HEADER, "", problems)
    if not problems:
        expected_id = run_id(d["benchmark"], d["strategy"], d["seed"])
        if d["run_id"] != expected_id:
            problems.append(f"run_id {d['run_id']!r} does not match {expected_id!r}")
    if problems or d["status"] == "partial":
        return problems
    _check_keys(d, _BODY, "", problems)
    if version >= 2:
        _check_keys(d, _BODY_V2, "", problems)
        if not problems and d["config_fingerprint"] != config_fingerprint(d["config"]):
            problems.append(
                f"config_fingerprint {d['config_fingerprint']!r} is not that of its config "
                f"({config_fingerprint(d['config'])!r}): the record was edited"
            )
    if isinstance(d.get("metrics"), dict):
        _validate_metrics(d["metrics"], d.get("experiences"), problems)
    if isinstance(d.get("costs"), dict):
        _check_keys(d["costs"], _COSTS, "costs.", problems)
        memory = d["costs"].get("memory")
        if isinstance(memory, dict):
            _check_keys(memory, _MEMORY, "costs.memory.", problems)
            _check_keys(memory, _MEMORY_OPTIONAL, "costs.memory.", problems, required=False)
    if isinstance(d.get("provenance"), dict):
        _check_keys(d["provenance"], _PROVENANCE, "provenance.", problems)
    return problems


def _validate_metrics(m: dict, experiences: Any, problems: list[str]) -> None:
    n_before = len(problems)
    _check_keys(m, {k: _NUM for k in _METRIC_SCALARS}, "metrics.", problems)
    matrix, seen = m.get("accuracy_matrix"), m.get("accuracy_seen")
    if matrix is None or seen is None:
        problems.extend(
            f"missing key metrics.{k}" for k in ("accuracy_matrix", "accuracy_seen") if k not in m
        )
        return
    if not isinstance(matrix, list) or not matrix or not all(isinstance(r, list) for r in matrix):
        problems.append("metrics.accuracy_matrix is not a non-empty list of lists")
        return
    T = len(matrix)
    if isinstance(experiences, list) and len(experiences) != T:
        problems.append(
            f"metrics.accuracy_matrix has {T} rows but there are {len(experiences)} experiences"
        )
    for i, row in enumerate(matrix):
        if len(row) != T:
            problems.append(f"metrics.accuracy_matrix[{i}] has {len(row)} entries, expected {T}")
            continue
        for j, v in enumerate(row):
            where = f"metrics.accuracy_matrix[{i}][{j}]"
            if j > i and v is not None:
                problems.append(f"{where} is {v!r}, expected null above the diagonal")
            elif j <= i and not (_NUM[0](v) and 0.0 <= v <= 1.0):
                problems.append(
                    f"{where} is {_describe(v) if not _is_num(v) else v}, expected a fraction in [0, 1]"
                )
    if not (_NUM_LIST[0](seen) and all(0.0 <= v <= 1.0 for v in seen)):
        problems.append("metrics.accuracy_seen is not a list of fractions in [0, 1]")
    elif len(seen) != T:
        problems.append(f"metrics.accuracy_seen has {len(seen)} entries, expected {T}")
    if len(problems) > n_before:
        return
    # Accuracy on all seen classes is a sample-weighted mean of the row's per-experience
    # accuracies, so it must lie between their min and max.
    for i, row in enumerate(matrix):
        lo, hi = min(row[: i + 1]), max(row[: i + 1])
        if not lo - _TOL <= seen[i] <= hi + _TOL:
            problems.append(
                f"metrics.accuracy_seen[{i}] = {seen[i]} is outside the range of "
                f"accuracy_matrix[{i}][0..{i}] ([{lo}, {hi}])"
            )
    for key, value in derived_metrics(matrix, seen).items():
        if abs(m[key] - value) > _TOL:
            problems.append(
                f"metrics.{key} = {m[key]} disagrees with the accuracy matrix ({value})"
            )


# --------------------------------------------------------------------------- the record type


class RecordError(ValueError):
    """A dict that is not a valid run record; the message lists the first problems."""


def _summary(problems: list[str]) -> str:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


@dataclass
class RunRecord:
    """One run's record: what the runner writes, the leaderboard reads and the tests build.

    ``to_dict()`` gives the JSON object of schema :data:`SCHEMA_VERSION`; ``from_dict()``
    validates and reads versions 1 and 2 (a version-1 record gets its fingerprint from its
    stored config, no warnings and ``untrained`` false). Keys this version does not know are
    kept in ``extra`` and written back.
    """

    benchmark: str
    strategy: str
    seed: int
    status: str = "complete"
    config: dict[str, Any] = field(default_factory=dict)
    class_order: list[int] = field(default_factory=list)
    experiences: list[list[int]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    costs: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    strategy_report: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    untrained: bool = False
    config_fingerprint: str = ""  # computed from config when empty
    schema_version: int = SCHEMA_VERSION  # the version it was read as; to_dict writes the current
    path: Path | None = field(default=None, compare=False)  # the file it was read from
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.config_fingerprint:
            if self.schema_version < 2:
                self.config = legacy_resolved_amp(self.config, self.provenance)
            self.config_fingerprint = config_fingerprint(self.config)

    @property
    def run_id(self) -> str:
        return run_id(self.benchmark, self.strategy, self.seed)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict (current schema version)."""
        d: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "run_id": self.run_id,
            "benchmark": self.benchmark,
            "strategy": self.strategy,
            "seed": self.seed,
            "status": self.status,
            "config_fingerprint": self.config_fingerprint,
            "untrained": self.untrained,
            "config": self.config,
            "class_order": self.class_order,
        }
        if self.class_names is not None:
            d["class_names"] = self.class_names
        d["experiences"] = self.experiences
        d["metrics"] = self.metrics
        if self.strategy_report is not None:
            d["strategy_report"] = self.strategy_report
        d["warnings"] = self.warnings
        d["costs"] = self.costs
        d["provenance"] = self.provenance
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, d: Any, path: str | os.PathLike | None = None) -> RunRecord:
        """Validate ``d`` (:func:`validate_record`) and build the record.

        Raises:
            RecordError: ``d`` is not a valid record; the message names the problems.
        """
        problems = validate_record(d)
        if problems:
            raise RecordError(_summary(problems))
        known = {f for f in cls.__dataclass_fields__ if f not in ("path", "extra")}
        kwargs = {k: d[k] for k in known if k in d}
        extra = {k: v for k, v in d.items() if k not in known and k != "run_id"}
        return cls(**kwargs, path=Path(path) if path is not None else None, extra=extra)

    @property
    def accuracy_matrix(self) -> list[list[float | None]]:
        return self.metrics["accuracy_matrix"]

    @property
    def accuracy_seen(self) -> list[float]:
        return self.metrics["accuracy_seen"]

    @property
    def avg_incremental_accuracy(self) -> float:
        return float(self.metrics["avg_incremental_accuracy"])

    @property
    def last_accuracy(self) -> float:
        return float(self.metrics["last_accuracy"])

    @property
    def forgetting(self) -> float:
        return float(self.metrics["forgetting"])

    @property
    def bwt(self) -> float:
        return float(self.metrics["bwt"])

    @property
    def memory(self) -> dict[str, Any]:
        return self.costs["memory"]

    @property
    def command(self) -> str:
        return str(self.provenance.get("command", ""))


# --------------------------------------------------------------------------- loading


def parse_record_file(path: str | os.PathLike) -> tuple[RunRecord | None, str | None]:
    """Read one record file, complete or partial: ``(record, None)`` or ``(None, reason)``.
    Never raises on bad content (truncated, not UTF-8, not an object, wrong version...)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return None, f"unreadable: {e}"
    try:
        d = json.loads(text)  # NaN/Infinity parse to floats; validation then names the key
    except (ValueError, RecursionError) as e:
        return None, f"invalid JSON (truncated or corrupt?): {e}"
    try:
        return RunRecord.from_dict(d, path), None
    except RecordError as e:
        return None, str(e)


def read_record(path: str | os.PathLike) -> tuple[RunRecord | None, str | None]:
    """Read one complete record: ``(record, None)`` if usable, else ``(None, reason)``; a
    partial record is a reason too. Never raises on bad content."""
    record, reason = parse_record_file(path)
    if record is not None and not record.complete:
        return (
            None,
            "status is partial: the run did not finish (continue it with `clbench run --resume`)",
        )
    return record, reason


def load_records(results_dir: str | os.PathLike) -> tuple[list[RunRecord], list[tuple[Path, str]]]:
    """All usable records under ``results_dir/runs/`` (sorted by run_id), and the skipped
    files with the reason for each. A missing ``runs/`` folder gives two empty lists.

    A run_id found in more than one file is kept once (the first file by name) and the
    other files are skipped, so no run is counted twice in the means over seeds.
    """
    runs_dir = Path(results_dir) / RUNS_SUBDIR
    records: dict[str, RunRecord] = {}
    skipped: list[tuple[Path, str]] = []
    for path in sorted(runs_dir.glob("*.json")):
        record, reason = read_record(path)
        if record is None:
            skipped.append((path, reason or "unknown problem"))
        elif record.run_id in records:
            first = records[record.run_id].path
            skipped.append(
                (
                    path,
                    f"duplicate run_id {record.run_id!r} (also in {first.name if first else '?'})",
                )
            )
        else:
            records[record.run_id] = record
    return sorted(records.values(), key=lambda r: r.run_id), skipped
