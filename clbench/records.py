"""Run records: the versioned JSON each (benchmark, strategy, seed) run leaves behind.

The runner writes one record per run to ``results/runs/<run_id>.json`` with
:func:`write_json_atomic`; the leaderboard reads them back with :func:`load_records`, which
never raises on a bad file but reports it as skipped with a reason. The derived metrics
(Ā, A_T, forgetting, BWT) are computed here, once, by :func:`derived_metrics`, so that the
runner that writes them and the validator that checks them cannot disagree.
The schema is documented in docs/run-records.md; bump :data:`SCHEMA_VERSION` when a field
is removed or changes meaning (adding a field does not need a bump: readers ignore extras).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
RUNS_SUBDIR = "runs"
STATUSES = ("complete", "partial")

# A derived metric stored in a record may differ from its recomputation by float noise only.
_TOL = 1e-6


# --------------------------------------------------------------------------- atomic writes


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one.

    A temp file in the same directory (same file system, so ``os.replace`` is atomic) is
    written, fsynced and renamed over ``path``; on any error it is removed and the old file
    is left untouched. Temp names start with '.' and end in '.tmp', so ``*.json`` globs
    never see a half-written record.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Serialise ``obj`` as standard JSON and write it atomically to ``path``.

    Serialisation happens before any file is touched, so an object that cannot be encoded
    (TypeError) or holds NaN/inf (ValueError: standard JSON has no NaN; store ``None``)
    leaves the old file as it was. numpy/torch scalars and arrays are converted through
    their ``tolist()``.
    """
    text = json.dumps(obj, indent=indent, allow_nan=False, default=_json_default)
    write_text_atomic(path, text + "\n")


def _json_default(o: Any) -> Any:
    tolist = getattr(o, "tolist", None)  # numpy.ndarray, numpy scalars, torch.Tensor
    if callable(tolist):
        return tolist()
    raise TypeError(f"object of type {type(o).__name__} is not JSON serialisable")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable on POSIX; not possible on every OS/file system.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    """Problems that make ``d`` an invalid schema-1 run record; empty when it is valid.

    A ``partial`` record (a run killed before it finished) only needs a valid header
    (schema_version, run_id, benchmark, strategy, seed, status): its metrics may be
    incomplete. A complete record must match the whole schema, and its stored derived
    metrics must agree with :func:`derived_metrics` of its accuracy matrix.
    """
    if not isinstance(d, dict):
        return [f"top level is {_describe(d)}, expected a JSON object"]
    if "schema_version" not in d:
        return ["missing key schema_version"]
    version = d["schema_version"]
    if version != SCHEMA_VERSION or not _is_int(version):
        return [f"schema_version is {version!r}, this clbench reads version {SCHEMA_VERSION}"]
    problems: list[str] = []
    _check_keys(d, _HEADER, "", problems)
    if not problems:
        expected_id = f"{d['benchmark']}__{d['strategy']}__s{d['seed']}"
        if d["run_id"] != expected_id:
            problems.append(f"run_id {d['run_id']!r} does not match {expected_id!r}")
    if problems or d["status"] == "partial":
        return problems
    _check_keys(d, _BODY, "", problems)
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


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class RunRecord:
    """A validated, complete run record (typed view over the JSON)."""

    path: Path
    run_id: str
    benchmark: str
    strategy: str
    seed: int
    config: dict[str, Any]
    class_order: list[int]
    experiences: list[list[int]]
    metrics: dict[str, Any]
    costs: dict[str, Any]
    provenance: dict[str, Any]

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path) -> RunRecord:
        """Build the view from a dict that :func:`validate_record` accepted."""
        return cls(
            path=path,
            **{k: d[k] for k in ("run_id", "benchmark", "strategy", "seed")},
            **{k: d[k] for k in _BODY},
        )

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


def read_record(path: str | os.PathLike) -> tuple[RunRecord | None, str | None]:
    """Read one record file: ``(record, None)`` if usable, else ``(None, reason)``. Never raises
    on bad content (truncated, not UTF-8, wrong version, missing keys, NaN, partial)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return None, f"unreadable: {e}"
    try:
        d = json.loads(text)  # NaN/Infinity parse to floats; validation then names the key
    except (ValueError, RecursionError) as e:
        return None, f"invalid JSON (truncated or corrupt?): {e}"
    problems = validate_record(d)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        return None, "; ".join(problems[:3]) + more
    if d["status"] == "partial":
        return (
            None,
            "status is partial: the run did not finish (continue it with `clbench run --resume`)",
        )
    return RunRecord.from_dict(d, path), None


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
            skipped.append(
                (
                    path,
                    f"duplicate run_id {record.run_id!r} (also in {records[record.run_id].path.name})",
                )
            )
        else:
            records[record.run_id] = record
    return sorted(records.values(), key=lambda r: r.run_id), skipped
