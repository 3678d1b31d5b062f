"""``clbench sweep FILE``: a grid of ``clbench run`` jobs on an executor, then a report.

A sweep YAML (``benchmarks/sweeps/*.yaml``, documented in docs/sweeps.md) names the
benchmarks, strategies (``NAME@LABEL`` rows too), seeds, grids over any ``--set`` key, and
the executor. Each (benchmark, strategy, grid point, seed) is one job: a ``clbench run`` of
a config file written for it under ``<out>/sweeps/<name>/configs/``. A grid point changes the
config, so it becomes part of the strategy's label (``er@mem_size=20``): its run id, record
and leaderboard row are its own, and records of different configs never collide.

Fault tolerance comes from the runner, not from here: every job passes ``--resume`` (a
killed job continues from its last per-experience checkpoint), a complete record is never
re-run (the sweep does not even start its process), and a failed job does not stop the
others; its one-line error and log path go into ``summary.json``. At the end the
leaderboard is built once and a report over the grid axes is written (``report.md/.csv``
and a plot of Ā and A_T against each numeric axis, mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clbench.config import find_shipped_yaml
from clbench.errors import ClbenchError, ConfigError, DataNotFoundError, exit_status

SWEEPS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "sweeps"
STRATEGY_SLOT = "{strategy}"  # in a grid key: the job's own strategy entry
_TOP_KEYS = (
    "name", "description", "benchmarks", "set", "strategies", "seeds", "grid", "exclude",
    "executor", "out", "data_root", "device", "report",
)  # fmt: skip
_ENTRY_KEYS = ("benchmark", "strategies", "seeds", "set")
_AXIS_KEYS = ("keys", "values", "label", "unit")
_UNITS = ("bytes",)
_REPORT_METRICS = (
    ("avg_incremental_accuracy", "Ā (%)"),
    ("last_accuracy", "A_T (%)"),
    ("forgetting", "Forgetting (%)"),
)


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class Axis:
    """One grid axis: ``values`` set on every key in ``keys`` (zipped, not crossed)."""

    name: str
    label: str
    keys: tuple[str, ...]
    values: tuple[Any, ...]
    unit: str | None = None

    def number(self, value: Any) -> float | None:
        """The value as a number for plotting (bytes for ``unit: bytes``), else None."""
        if self.unit == "bytes":
            from clbench.memory import parse_bytes

            try:
                return float(parse_bytes(value))
            except ClbenchError:
                return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return None

    @property
    def numeric(self) -> bool:
        return all(self.number(v) is not None for v in self.values)


@dataclass
class Entry:
    """A benchmark of the sweep, with its own strategies/seeds/overrides where given."""

    benchmark: str
    strategies: list[str] | None = None
    seeds: list[int] | None = None
    fixed: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepSpec:
    name: str
    entries: list[Entry]
    fixed: dict[str, Any] = field(default_factory=dict)
    strategies: list[str] | None = None
    seeds: list[int] | None = None
    axes: list[Axis] = field(default_factory=list)
    exclude: list[dict[str, Any]] = field(default_factory=list)
    executor: dict[str, Any] = field(default_factory=dict)
    out: str | None = None
    data_root: str | None = None
    device: str = "cpu"
    report_x: str | None = None
    report_compare: list[tuple[str, str]] = field(default_factory=list)  # (A, B) row pairs
    description: str = ""
    source: Path | None = None
    hints: dict[str, str] = field(default_factory=dict)  # file -> how to make it


def _unknown(where: str, key: Any, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(valid)}")


def _check_keys(d: dict, valid: Sequence[str], where: str) -> None:
    for key in d:
        if key not in valid:
            raise _unknown(where, key, valid)


def _str_list(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{what}: expected a non-empty list of names, got {value!r}")
    return value


def _int_list(value: Any, what: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    ok = isinstance(value, list) and value
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{what}: expected a non-empty list of integers, got {value!r}")
    return value


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: expected a mapping, got {type(value).__name__}")
    return value


def fmt_value(v: Any) -> str:
    """A grid value as it appears in a label: ``2MB``, ``20``, ``0.05``, ``[1,2]``."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _short_labels(keys: list[str]) -> list[str]:
    """The last component of each key, lengthened where two axes would share it."""
    parts = [k.replace(STRATEGY_SLOT + ".", "").split(".") for k in keys]
    n = [1] * len(keys)
    while True:
        labels = ["-".join(p[-k:]) for p, k in zip(parts, n, strict=True)]
        dup = {lab for lab in labels if labels.count(lab) > 1}
        if not dup:
            return labels
        grown = False
        for i, lab in enumerate(labels):
            if lab in dup and n[i] < len(parts[i]):
                n[i] += 1
                grown = True
        if not grown:
            return [k.replace(".", "-") for k in keys]


def _parse_axes(grid: Any, where: str) -> list[Axis]:
    if grid is None:
        return []
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: grid: expected a mapping of --set keys to lists of values")
    if not grid:
        raise ConfigError(
            f"{where}: grid is empty; list at least one key with values, or remove it"
        )
    raw = []
    for name, spec in grid.items():
        if isinstance(spec, dict):
            _check_keys(spec, _AXIS_KEYS, f"{where}: grid.{name}")
            keys = spec.get("keys")
            keys = [keys] if isinstance(keys, str) else keys
            if not keys or not all(isinstance(k, str) and k for k in keys):
                raise ConfigError(f"{where}: grid.{name}.keys: expected a list of --set keys")
            values, label, unit = spec.get("values"), spec.get("label"), spec.get("unit")
        else:
            keys, values, label, unit = [str(name)], spec, None, None
        if not isinstance(values, list):
            raise ConfigError(
                f"{where}: grid axis {name!r}: expected a list of values, got {values!r}"
            )
        if not values:
            raise ConfigError(f"{where}: grid axis {name!r} has no values; list at least one")
        shown = [fmt_value(v) for v in values]
        for s in shown:
            if shown.count(s) > 1:
                raise ConfigError(f"{where}: grid axis {name!r} lists the value {s} twice")
        if unit is None and all(k.endswith("budget_bytes") for k in keys):
            unit = "bytes"
        if unit is not None and unit not in _UNITS:
            raise ConfigError(
                f"{where}: grid.{name}.unit {unit!r}: valid units: {', '.join(_UNITS)}"
            )
        raw.append((str(name), label, tuple(keys), tuple(values), unit))
    auto = _short_labels([r[0] for r in raw])
    axes = [
        Axis(name, str(label) if label else a, keys, values, unit)
        for (name, label, keys, values, unit), a in zip(raw, auto, strict=True)
    ]
    for ax in axes:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", ax.label):
            raise ConfigError(f"{where}: grid axis label {ax.label!r}: use letters, digits, _ . -")
    return axes


def load_sweep(source: str | os.PathLike | dict, *, where: str | None = None) -> SweepSpec:
    """Read and validate a sweep YAML (a path, a name in benchmarks/sweeps/, or a dict)."""
    path: Path | None = None
    if isinstance(source, dict):
        data = copy.deepcopy(source)
    else:
        path = find_sweep(str(source))
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {yaml_problem(e)}") from None
        except OSError as e:
            raise ConfigError(f"sweep file {path}: {e.strerror}") from None
    where = where or (str(path) if path else "sweep")
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where}: expected a mapping with at least 'benchmarks'")
    _check_keys(data, _TOP_KEYS, where)
    if "benchmarks" not in data:
        raise ConfigError(f"{where}: missing key 'benchmarks' (a list of benchmark names or files)")
    benches = data["benchmarks"]
    benches = [benches] if isinstance(benches, (str, dict)) else benches
    if not isinstance(benches, list) or not benches:
        raise ConfigError(f"{where}: benchmarks: expected a non-empty list")
    entries = []
    for i, b in enumerate(benches):
        if isinstance(b, str):
            entries.append(Entry(b))
            continue
        item = _mapping(b, f"{where}: benchmarks[{i}]")
        _check_keys(item, _ENTRY_KEYS, f"{where}: benchmarks[{i}]")
        if not isinstance(item.get("benchmark"), str):
            raise ConfigError(f"{where}: benchmarks[{i}]: missing key 'benchmark' (a name or file)")
        entries.append(
            Entry(
                item["benchmark"],
                _str_list(item["strategies"], f"{where}: benchmarks[{i}].strategies")
                if "strategies" in item
                else None,
                _int_list(item["seeds"], f"{where}: benchmarks[{i}].seeds")
                if "seeds" in item
                else None,
                _mapping(item.get("set"), f"{where}: benchmarks[{i}].set"),
            )
        )
    exclude = data.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(e, dict) and e for e in exclude):
        raise ConfigError(
            f"{where}: exclude: expected a list of mappings (axis or strategy: value)"
        )
    report = _mapping(data.get("report"), f"{where}: report")
    _check_keys(report, ("x", "compare"), f"{where}: report")
    compare = report.get("compare") or []
    if not isinstance(compare, list) or not all(
        isinstance(c, list) and len(c) == 2 and all(isinstance(s, str) for s in c) and c[0] != c[1]
        for c in compare
    ):
        raise ConfigError(
            f"{where}: report.compare: expected a list of [A, B] pairs of two different "
            "strategy rows, e.g. [[er, er-compressed]]"
        )
    name = data.get("name") or (path.stem if path else "sweep")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", str(name)):
        raise ConfigError(f"{where}: name {name!r}: use letters, digits, _ . -")
    executor = _mapping(data.get("executor"), f"{where}: executor")
    spec = SweepSpec(
        name=str(name),
        entries=entries,
        fixed=_mapping(data.get("set"), f"{where}: set"),
        strategies=_str_list(data["strategies"], f"{where}: strategies")
        if "strategies" in data
        else None,
        seeds=_int_list(data["seeds"], f"{where}: seeds") if "seeds" in data else None,
        axes=_parse_axes(data.get("grid"), where),
        exclude=exclude,
        executor=executor,
        out=data.get("out"),
        data_root=data.get("data_root"),
        device=str(data.get("device") or "cpu"),
        report_x=report.get("x"),
        report_compare=[(a, b) for a, b in compare],
        description=str(data.get("description") or ""),
        source=path,
    )
    names = {a.name for a in spec.axes} | {a.label for a in spec.axes}
    if spec.report_x is not None and spec.report_x not in names:
        raise ConfigError(f"{where}: report.x {spec.report_x!r} is not a grid axis")
    if spec.report_compare and _x_axis(spec) is None:
        raise ConfigError(f"{where}: report.compare needs a numeric grid axis to compare along")
    valid_excl = {"benchmark", "strategy", "seed", *names}
    for e in exclude:
        for key in e:
            if key not in valid_excl:
                raise _unknown(f"{where}: exclude", key, sorted(valid_excl))
    return spec


def yaml_problem(e: yaml.YAMLError) -> str:
    """``line 21: expected ',' or ']', but got '{'`` from a PyYAML error."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    hint = " (quote values that contain { or })" if "{" in str(e) or "}" in str(e) else ""
    return f"{where}{problem}{hint}"


def find_sweep(name_or_path: str) -> Path:
    """A path, or a name in benchmarks/sweeps/ (``memory-curve``)."""
    return find_shipped_yaml(name_or_path, SWEEPS_DIR, "sweep", "shipped sweeps")


# --------------------------------------------------------------------------- planning


@dataclass
class PlannedJob:
    """One job of a sweep: what it runs, where its record goes, and whether it exists."""

    benchmark: str  # the config's name (the record's benchmark)
    row: str  # the strategy as the sweep lists it (a report row)
    strategy: str  # the label it runs and records under
    seed: int
    point: dict[str, Any]  # axis name -> value, for the axes that apply to this job
    config: dict[str, Any]
    config_path: Path
    run_id: str
    explicit: dict[str, Any] = field(default_factory=dict)  # strategy params the job sets
    status: str = "missing"  # recorded | partial | missing | conflict
    detail: str = ""


def _set_path(d: dict, keys: Sequence[str], value: Any, where: str) -> None:
    node = d
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {k!r} is not a section")
    node[keys[-1]] = copy.deepcopy(value)


def _applies(key: str, strategy: str, base: str, params: Sequence[str]) -> bool:
    """Whether a grid key changes the config of a job running ``strategy``."""
    parts = key.split(".")
    if parts[0] != "strategy_params" or len(parts) < 2:
        return True
    if parts[1] == STRATEGY_SLOT:
        return len(parts) < 3 or parts[2] in params
    return parts[1] in (base, strategy)


def _excluded(rules: list[dict[str, Any]], facts: dict[str, Any]) -> bool:
    def match(want: Any, have: Any) -> bool:
        wants = want if isinstance(want, list) else [want]
        return any(fmt_value(w) == fmt_value(have) for w in wants)

    return any(all(k in facts and match(v, facts[k]) for k, v in r.items()) for r in rules)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,-]+", "_", name)


def _benchmark_data(name: str) -> dict[str, Any]:
    from clbench.config import find_benchmark

    path = find_benchmark(name)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"benchmark file {path}: expected a mapping")
    data.setdefault("name", path.stem)
    return data


def _check_params(cls: type, params: dict[str, Any], where: str) -> None:
    """Names and types of a job's strategy parameters, before any job starts."""
    check = getattr(cls, "check_params", None)  # typed check of the strategy contract
    if check is not None:
        try:
            check(params)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        return
    unknown = sorted(set(params) - set(getattr(cls, "defaults", {}) or {}))
    if unknown:
        raise ConfigError(f"{where}: unknown parameter {unknown[0]!r} of strategy {cls.__name__}")


def state_dir(out: Path, spec: SweepSpec) -> Path:
    return out / "sweeps" / spec.name


def plan(spec: SweepSpec, out: Path) -> list[PlannedJob]:
    """Every job of the sweep with its config, validated before anything runs.

    Raises:
        ConfigError: an unknown benchmark, strategy, config key or strategy parameter, or a
            grid key that applies to no job; the message names it.
    """
    from clbench.config import load_config
    from clbench.strategies.base import STRATEGIES, strategy_base

    where = str(spec.source or spec.name)
    jobs: list[PlannedJob] = []
    used_axes: set[str] = set()
    configs_dir = state_dir(out, spec) / "configs"
    for entry in spec.entries:
        base_data = _benchmark_data(entry.benchmark)
        for key, value in {**spec.fixed, **entry.fixed}.items():
            _set_path(base_data, str(key).split("."), value, f"{where}: set {key}")
        try:
            base_cfg = load_config(copy.deepcopy(base_data))
        except ConfigError as e:
            raise ConfigError(f"{where}: benchmark {entry.benchmark}: {e}") from None
        strategies = entry.strategies or spec.strategies or base_cfg.strategies
        seeds = entry.seeds or spec.seeds or base_cfg.seeds
        for row in strategies:
            base = strategy_base(row)
            cls = STRATEGIES.get(base)
            params = list(getattr(cls, "defaults", {}) or {})
            axes = [a for a in spec.axes if any(_applies(k, row, base, params) for k in a.keys)]
            for values in itertools.product(*(a.values for a in axes)):
                point = {a.name: v for a, v in zip(axes, values, strict=True)}
                label = ",".join(
                    f"{a.label}={fmt_value(v)}" for a, v in zip(axes, values, strict=True)
                )
                final = row if not label else f"{row}{',' if '@' in row else '@'}{label}"
                data = copy.deepcopy(base_data)
                sp = data.setdefault("strategy_params", {}) or {}
                data["strategy_params"] = sp
                own = copy.deepcopy(sp.get(row) or {}) if row != base else {}
                for a, v in zip(axes, values, strict=True):
                    for key in a.keys:
                        if not _applies(key, row, base, params):
                            continue
                        parts = key.split(".")
                        if parts[:2] == ["strategy_params", STRATEGY_SLOT]:
                            _set_path(own, parts[2:], v, f"{where}: grid key {key}")
                        elif parts[0] == "strategy_params" and parts[1] == row and row != base:
                            _set_path(own, parts[2:], v, f"{where}: grid key {key}")
                        else:
                            _set_path(data, parts, v, f"{where}: grid key {key}")
                    used_axes.add(a.name)
                if final != base:
                    sp[final] = own
                data["strategies"] = [final]
                data["seeds"] = list(seeds)
                merged = {**(sp.get(base) or {}), **(sp.get(final) or {})}
                _check_params(cls, merged, f"{where}: {final}")
                try:
                    cfg = load_config(copy.deepcopy(data))
                except ConfigError as e:
                    raise ConfigError(f"{where}: {entry.benchmark} / {final}: {e}") from None
                text = yaml.safe_dump(data, sort_keys=False)
                digest = hashlib.sha256(text.encode()).hexdigest()[:8]
                cpath = configs_dir / f"{_safe(cfg.name)}__{_safe(final)}__{digest}.yaml"
                for seed in seeds:
                    facts = {"benchmark": cfg.name, "strategy": row, "seed": seed}
                    facts.update(point)
                    facts.update({a.label: v for a, v in zip(axes, values, strict=True)})
                    if _excluded(spec.exclude, facts):
                        continue
                    jobs.append(
                        PlannedJob(
                            benchmark=cfg.name,
                            row=row,
                            strategy=final,
                            seed=seed,
                            point=point,
                            config=data,
                            config_path=cpath,
                            run_id=f"{cfg.name}__{final}__s{seed}",
                            explicit=merged,
                        )
                    )
    unused = [a.name for a in spec.axes if a.name not in used_axes]
    if unused:
        raise ConfigError(
            f"{where}: grid axis {unused[0]!r} applies to no strategy of the sweep (a "
            f"strategy_params key of a strategy that is not listed, or a parameter none has)"
        )
    seen: dict[str, PlannedJob] = {}
    for j in jobs:
        if j.run_id in seen and seen[j.run_id].config != j.config:
            raise ConfigError(
                f"{where}: two jobs share the run id {j.run_id} with different configs"
            )
        seen[j.run_id] = j
    if not seen:
        raise ConfigError(f"{where}: no jobs (every job is excluded)")
    rows = sorted({j.row for j in seen.values()})
    for pair in spec.report_compare:
        for r in pair:
            if r not in rows:
                raise ConfigError(
                    f"{where}: report.compare: {r!r} is not a strategy row of the sweep "
                    f"(rows: {', '.join(rows)})"
                )
    # Seed-major (stable) order: a sweep stopped part-way holds whole curves at its first seeds.
    rank: dict[int, int] = {}
    for j in seen.values():
        rank.setdefault(j.seed, len(rank))
    return sorted(seen.values(), key=lambda j: rank[j.seed])


# --------------------------------------------------------------------------- status


def _config_diff(recorded: dict[str, Any], job: PlannedJob) -> list[str]:
    """Identity keys whose recorded value differs from the job's config (the records'
    ``config_diff``; of the strategy parameters only those the sweep sets are compared,
    since a record holds the strategy's resolved defaults too)."""
    from clbench.config import load_config
    from clbench.records import config_diff

    want = load_config(copy.deepcopy(job.config)).to_dict()
    diffs = [
        d.split(":", 1)[0]
        for d in config_diff({**recorded, "strategy_params": {}}, {**want, "strategy_params": {}})
    ]
    if (want.get("train") or {}).get("amp") == "auto":
        # the worker's runner resolves `auto` to its own machine's precision and checks the
        # record itself; the machine planning the sweep may not be the one running the job
        diffs = [d for d in diffs if d != "train.amp"]
    rec_params = (recorded.get("strategy_params") or {}).get(job.strategy) or {}
    for k, v in job.explicit.items():
        if k in rec_params and _norm(rec_params[k]) != _norm(v):
            diffs.append(f"strategy_params.{job.strategy}.{k}")
    return diffs


def _norm(v: Any) -> Any:
    if isinstance(v, str):  # "2MB" in the sweep, 2000000 in the record
        try:
            from clbench.memory import parse_bytes

            return parse_bytes(v)
        except ClbenchError:
            return v
    return v


def job_status(job: PlannedJob, out: Path) -> tuple[str, str]:
    """``recorded``, ``partial`` (resumes from its checkpoint), ``missing`` or ``conflict``
    (a complete record of a different config holds this run id), with a detail."""
    path = out / "runs" / f"{job.run_id}.json"
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        d = None
    except (OSError, ValueError):
        return "missing", "unreadable record (it will be rewritten)"
    ckpt = out / "checkpoints" / f"{job.run_id}.pt"
    if isinstance(d, dict) and d.get("status") == "complete":
        diff = _config_diff(d.get("config") or {}, job) if isinstance(d.get("config"), dict) else []
        if diff:
            more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
            return "conflict", f"recorded with a different {', '.join(diff[:3])}{more}"
        return "recorded", ""
    if ckpt.is_file():
        done = len(((d or {}).get("metrics") or {}).get("accuracy_matrix") or []) if d else 0
        return "partial", f"resumes after experience {done}" if done else "resumes"
    return "missing", ""


# --------------------------------------------------------------------------- requirements


def requirements(
    configs: Iterable[dict[str, Any]], data_root: str | None, hints: dict[str, str] | None = None
) -> list[str]:
    """What is missing to run these configs (datasets, backbone weights), one line each,
    saying what to download and where (``hints``: file -> how to make it, appended to the
    line that names the file). Empty when everything is in place."""
    from clbench.config import load_config
    from clbench.datasets import load_dataset

    problems: list[str] = []
    seen: set[str] = set()
    for data in configs:
        cfg = load_config(copy.deepcopy(data))
        ds = cfg.dataset
        root = ds.root or data_root
        key = json.dumps([ds.name, ds.variant, ds.options, str(root)], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            try:
                load_dataset(ds.name, root, download=False, variant=ds.variant, **ds.options)
            except ClbenchError as e:
                problems.append(f"dataset {ds.name}: {e}")
        bb = cfg.backbone
        bkey = json.dumps([bb.name, bb.pretrained, bb.checkpoint])
        if bkey in seen:
            continue
        seen.add(bkey)
        problem = _weights_problem(bb.name, bb.pretrained, bb.checkpoint)
        if problem:
            problems.append(problem)
    for i, p in enumerate(problems):
        for path, how in (hints or {}).items():
            if path in p:
                problems[i] = f"{p.replace(_HOW_WEIGHTS, '')}; make it with: {how}"
    return problems


_HOW_WEIGHTS = "; make or download it (see the benchmark YAML's comments) and put it there"


def _weights_problem(name: str, pretrained: bool, checkpoint: str | None) -> str | None:
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            return f"backbone {name}: weights file {path.absolute()} does not exist{_HOW_WEIGHTS}"
        return None
    if not pretrained:
        return None
    from clbench.backbones import BACKBONES

    if name in BACKBONES:
        return f"backbone {name}: pretrained needs backbone.checkpoint (a local weights file)"
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
    except Exception:  # an unknown name: the runner reports it with the valid names
        return None
    if hub_id and any(
        isinstance(try_to_load_from_cache(hub_id, f), str)
        for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    ):
        return None
    return (
        f"backbone {name}: pretrained weights are not in the Hugging Face cache; on a machine "
        f"with internet run `huggingface-cli download {hub_id or 'timm/' + name}` and copy "
        "~/.cache/huggingface here, or set backbone.checkpoint to a local weights file"
    )


# --------------------------------------------------------------------------- running


@dataclass
class SweepRun:
    spec: SweepSpec
    out: Path
    jobs: list[PlannedJob]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)


def _say(msg: str) -> None:
    print(msg, flush=True)  # progress of a long sweep must reach a log file as it happens


def _summary_path(out: Path, spec: SweepSpec) -> Path:
    return state_dir(out, spec) / "summary.json"


def _previous_errors(out: Path, spec: SweepSpec) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(_summary_path(out, spec).read_text())
        return {j["run_id"]: j for j in data.get("jobs", []) if j.get("status") == "failed"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _job_argv(job: PlannedJob, out: Path, data_root: str | None, device: str) -> tuple[str, ...]:
    argv = [
        "run", str(job.config_path.absolute()), "--strategy", job.strategy,
        "--seed", str(job.seed), "--out", str(out.absolute()), "--device", device,
        "--resume", "--no-leaderboard", "--no-progress",
    ]  # fmt: skip
    if data_root:
        argv += ["--data-root", str(Path(data_root).expanduser().absolute())]
    return tuple(argv)


def _write_summary(run: SweepRun, started: str) -> None:
    from clbench.records import write_json_atomic

    rows = []
    for j in run.jobs:
        r = run.results.get(j.run_id, {})
        rows.append(
            {
                "run_id": j.run_id,
                "benchmark": j.benchmark,
                "row": j.row,
                "strategy": j.strategy,
                "seed": j.seed,
                "point": j.point,
                "status": r.get("status", "pending"),
                "returncode": r.get("returncode"),
                "error": r.get("error"),
                "log": r.get("log"),
                "wall_s": r.get("wall_s"),
            }
        )
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    write_json_atomic(
        _summary_path(run.out, run.spec),
        {
            "sweep": run.spec.name,
            "file": str(run.spec.source) if run.spec.source else None,
            "started_at": started,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "counts": counts,
            "jobs": rows,
        },
    )


def run_sweep(
    spec: SweepSpec,
    out: Path,
    *,
    executor: Any,
    data_root: str | None = None,
    device: str = "cpu",
    leaderboard: bool = True,
    log: Callable[[str], None] | None = None,
) -> SweepRun:
    """Plan, check requirements, run what is not recorded, write the summary and report.

    Raises:
        ClbenchError: bad sweep input or missing data, before any job starts.
    """
    from clbench.executors import Job, JobResult
    from clbench.records import write_text_atomic

    log = log or _say

    jobs = plan(spec, out)
    for j in jobs:
        j.status, j.detail = job_status(j, out)
    conflicts = [j for j in jobs if j.status == "conflict"]
    if conflicts:
        j = conflicts[0]
        raise ConfigError(
            f"{out}/runs/{j.run_id}.json is {j.detail}; use another out folder, a new "
            f"label, or delete that record ({len(conflicts)} job(s) conflict; see --dry-run)"
        )
    todo = [j for j in jobs if j.status != "recorded"]
    if todo:
        distinct = {j.config_path: j.config for j in todo}
        problems = requirements(distinct.values(), data_root, spec.hints)
        if problems:
            more = f" (and {len(problems) - 1} more: see --dry-run)" if len(problems) > 1 else ""
            raise DataNotFoundError(problems[0] + more)
    run = SweepRun(spec, out, jobs)
    state = state_dir(out, spec)
    for path, data in {j.config_path: j.config for j in jobs}.items():
        text = f"# written by `clbench sweep` ({spec.name}); run with the command in its log\n"
        write_text_atomic(path, text + yaml.safe_dump(data, sort_keys=False))
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    for j in jobs:
        if j.status == "recorded":
            run.results[j.run_id] = {"status": "recorded"}
    _write_summary(run, started)
    log(
        f"sweep {spec.name}: {len(jobs)} job(s), {len(jobs) - len(todo)} already recorded, "
        f"{len(todo)} to run on {executor.describe()}"
    )
    by_id = {j.run_id: j for j in todo}
    exec_jobs = [
        Job(
            j.run_id,
            _job_argv(j, out, data_root, device),
            state / "logs" / f"{_safe(j.run_id)}.log",
            cwd=Path.cwd(),
        )
        for j in todo
    ]
    done = 0

    def on_result(res: JobResult) -> None:
        nonlocal done
        done += 1
        run.results[res.run_id] = {
            "status": "ok" if res.ok else "failed",
            "returncode": res.returncode,
            "error": res.error,
            "log": str(res.log),
            "wall_s": round(res.wall_s, 1),
        }
        _write_summary(run, started)
        what = f"ok ({res.wall_s:.0f} s)" if res.ok else f"FAILED: {res.error} (log: {res.log})"
        log(f"[{done}/{len(todo)}] {res.run_id}: {what}")
        by_id.pop(res.run_id, None)

    try:
        executor.run(exec_jobs, on_result)
    finally:
        _write_summary(run, started)
    failed = [(rid, r) for rid, r in run.results.items() if r["status"] == "failed"]
    recorded = any(r["status"] in ("ok", "recorded") for r in run.results.values())
    write_outputs(spec, out, jobs, leaderboard=leaderboard and recorded, log=log)
    if failed:
        log(f"{len(failed)} job(s) failed (rerun the sweep to retry only these):")
        for rid, r in failed:
            log(f"  {rid}: {r['error']} (log: {r['log']})")
    return run


def write_outputs(
    spec: SweepSpec,
    out: Path,
    jobs: Sequence[PlannedJob],
    *,
    leaderboard: bool,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """The end of a sweep (or ``--report-only``): the leaderboard once, then the report."""
    log = log or _say
    if leaderboard:
        from clbench.leaderboard import build_leaderboard

        build_leaderboard(out)
        log(f"leaderboard: {out}/leaderboard.{{md,csv,html}}")
    paths = write_report(spec, out, jobs)
    if paths:
        log(f"report: {', '.join(str(p) for p in paths)}")
    return paths


# --------------------------------------------------------------------------- report


def report_frame(spec: SweepSpec, out: Path, jobs: Sequence[PlannedJob]):
    """One row per (benchmark, row, grid point): mean and std over seeds of the records."""
    import pandas as pd

    from clbench.records import read_record

    rows = []
    for j in jobs:
        rec, _ = read_record(out / "runs" / f"{j.run_id}.json")
        if rec is None:
            continue
        row = {"benchmark": j.benchmark, "strategy": j.row, "seed": j.seed}
        for a in spec.axes:
            row[a.name] = fmt_value(j.point[a.name]) if a.name in j.point else ""
        row["n_classes"] = len(rec.class_order)
        for m, _ in _REPORT_METRICS:
            row[m] = 100 * float(rec.metrics[m])
        row["memory_bytes"] = rec.costs["memory_bytes"]
        row["exemplars"] = rec.memory.get("exemplars")
        rows.append(row)
    if not rows:
        return None, None
    runs = pd.DataFrame(rows)
    return runs, aggregate(runs, spec)


def aggregate(runs, spec: SweepSpec):
    """Per-seed rows -> one row per (benchmark, strategy row, grid point): mean, std."""
    import pandas as pd

    keys = ["benchmark", "strategy", *(a.name for a in spec.axes)]
    named: dict[str, Any] = {"n_seeds": ("seed", "nunique"), "n_classes": ("n_classes", "max")}
    for m, _ in _REPORT_METRICS:
        named[f"{m}_mean"] = (m, "mean")
        named[f"{m}_std"] = (m, lambda s: s.std(ddof=1))
    named["memory_bytes"] = ("memory_bytes", "mean")
    named["exemplars"] = ("exemplars", lambda s: pd.to_numeric(s, errors="coerce").mean())
    return runs.groupby(keys, sort=False).agg(**named).reset_index()


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _x_axis(spec: SweepSpec) -> Axis | None:
    numeric = [a for a in spec.axes if a.numeric]
    if spec.report_x:
        chosen = [a for a in spec.axes if spec.report_x in (a.name, a.label)]
        return chosen[0] if chosen and chosen[0].numeric else None
    return numeric[0] if numeric else None


def _welch(sa, sb) -> tuple[str, str]:
    """Welch's t-test over seeds: (p as text, verdict); p >= 0.05, or fewer than 2 seeds on
    either side, is inside the noise."""
    from scipy import stats

    if len(sa) < 2 or len(sb) < 2:
        return "—", "one seed: cannot tell"
    p = float(stats.ttest_ind(sa, sb, equal_var=False).pvalue)
    ptxt = f"{p:.3f}" if p >= 0.001 else "<0.001"
    return ptxt, "inside the noise" if not p < 0.05 else "outside the noise"


def _leads(runs, table, spec: SweepSpec, x: Axis, metric: str) -> list[list[str]]:
    """At each x: the leader, the runner-up, the gap and whether it is inside the noise."""
    out = []
    others = [a.name for a in spec.axes if a.name != x.name]
    for (bench, xv), t in table.groupby(["benchmark", x.name], sort=False):
        if len(t) < 2:
            continue
        t = t.sort_values(f"{metric}_mean", ascending=False)
        a, b = t.iloc[0], t.iloc[1]
        sa, sb = (_seed_values(runs, r, [x.name, *others], metric) for r in (a, b))
        gap = a[f"{metric}_mean"] - b[f"{metric}_mean"]
        name = lambda r: " ".join([r.strategy, *(f"{o}={r[o]}" for o in others if r[o])])  # noqa: E731
        out.append([str(bench), str(xv), name(a), name(b), f"{gap:+.2f}", *_welch(sa, sb)])
    return out


def _compare(
    runs, table, spec: SweepSpec, x: Axis, metric: str, pair: tuple[str, str]
) -> tuple[list[list[str]], str]:
    """``report.compare``: B - A at every x (and every value of the other axes) both rows
    have, with the Welch verdict, and a sentence per curve pair on the sign of the gap along
    x: where the curves cross, if they do. An axis that applies to one row only is ignored."""
    a_name, b_name = pair
    others = [a.name for a in spec.axes if a.name != x.name]
    ta, tb = table[table.strategy == a_name], table[table.strategy == b_name]
    curves: dict[str, list] = {}  # benchmark (and other axes) -> points along x
    for _, a in ta.iterrows():
        for _, b in tb.iterrows():
            if a.benchmark != b.benchmark or a[x.name] != b[x.name]:
                continue
            if any(a[o] and b[o] and a[o] != b[o] for o in others):
                continue
            sa = _seed_values(runs, a, [x.name, *others], metric)
            sb = _seed_values(runs, b, [x.name, *others], metric)
            gap = b[f"{metric}_mean"] - a[f"{metric}_mean"]
            ptxt, verdict = _welch(sb, sa)
            ctx = " ".join(f"{o}={a[o] or b[o]}" for o in others if a[o] or b[o])
            row = [
                f"{b.benchmark} {ctx}".strip(),
                str(a[x.name]),
                _pm(a[f"{metric}_mean"], a[f"{metric}_std"]),
                _pm(b[f"{metric}_mean"], b[f"{metric}_std"]),
                f"{gap:+.2f}",
                ptxt,
                verdict,
            ]
            number = x.number(_values_of(x, [a[x.name]])[0])
            curves.setdefault(row[0], []).append((number, row, gap, verdict))
    rows, sentences = [], []
    for where, pts in curves.items():
        pts.sort(key=lambda p: p[0])
        rows += [p[1] for p in pts]
        crossings = [
            f"between {p[1][1]} and {q[1][1]}"
            + ("" if "outside the noise" in (p[3], q[3]) else " (inside the noise on both sides)")
            for p, q in itertools.pairwise(pts)
            if (p[2] > 0) != (q[2] > 0)
        ]
        ahead = sum(p[2] > 0 for p in pts)
        sure = sum(p[2] > 0 and p[3] == "outside the noise" for p in pts)
        behind = sum(p[2] <= 0 and p[3] == "outside the noise" for p in pts)
        cross = f"the curves cross {', '.join(crossings)}" if crossings else "no crossing"
        sentences.append(
            f"{where + ': ' if len(curves) > 1 else ''}{b_name} is ahead of {a_name} at "
            f"{ahead} of {len(pts)} {x.label} values ({sure} of them outside the noise; behind "
            f"outside the noise at {behind}); {cross}."
        )
    return rows, " ".join(sentences)


def _seed_values(runs, row, columns: list[str], metric: str):
    """The per-seed values of ``metric`` behind one aggregated report row."""
    m = (runs.benchmark == row.benchmark) & (runs.strategy == row.strategy)
    for c in columns:
        m &= runs[c] == row[c]
    return runs.loc[m, metric].to_numpy()


def report_png(table, spec: SweepSpec, x: Axis, bench: str) -> bytes:
    """Ā and A_T (and forgetting) against the numeric axis ``x``, one line per row, ±1 std
    band over seeds; bytes become bytes per class (the budget over the classes seen)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    t = table[table.benchmark == bench]
    others = [a.name for a in spec.axes if a.name != x.name]
    fig = Figure(figsize=(12, 4.2))
    FigureCanvasAgg(fig)
    axs = fig.subplots(1, 2)
    per_class = x.unit == "bytes"
    for ax, (metric, title) in zip(axs, _REPORT_METRICS[:2], strict=False):
        for key, g in t.groupby(["strategy", *others], sort=False):
            key = key if isinstance(key, tuple) else (key,)
            xs = np.array([x.number(v) for v in _values_of(x, g[x.name])], dtype=float)
            if per_class:
                xs = xs / g["n_classes"].to_numpy() / 1000.0
            order = np.argsort(xs)
            mean = g[f"{metric}_mean"].to_numpy()[order]
            std = g[f"{metric}_std"].to_numpy()[order]
            name = " ".join(
                [str(key[0]), *(f"{o}={k}" for o, k in zip(others, key[1:], strict=True) if k)]
            )
            (line,) = ax.plot(xs[order], mean, marker="o", label=name)
            ok = ~np.isnan(std)
            if ok.any():
                ax.fill_between(
                    xs[order][ok],
                    (mean - std)[ok],
                    (mean + std)[ok],
                    color=line.get_color(),
                    alpha=0.2,
                )
        ax.set_xlabel(f"{x.label}: kB per class" if per_class else x.label)
        ax.set_ylabel(title)
        ax.set_title(f"{bench}: {title}")
        ax.grid(alpha=0.3)
        lo, hi = ax.dataLim.x0, ax.dataLim.x1
        if lo > 0 and hi / lo >= 8:  # budgets span decades: equal spacing per doubling
            ax.set_xscale("log")
    axs[0].legend(fontsize=8)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _values_of(x: Axis, shown: Iterable[str]) -> list[Any]:
    lookup = {fmt_value(v): v for v in x.values}
    return [lookup[s] for s in shown]


def write_report(spec: SweepSpec, out: Path, jobs: Sequence[PlannedJob]) -> list[Path]:
    """``report.md``, ``report.csv`` and ``report__<benchmark>.png`` in the sweep's folder."""
    from clbench.records import write_bytes_atomic

    runs, table = report_frame(spec, out, jobs)
    if table is None:
        return []
    state = state_dir(out, spec)
    x = _x_axis(spec)
    files: dict[Path, bytes] = {state / "report.csv": table.to_csv(index=False).encode()}
    axis_cols = [a.name for a in spec.axes]
    lines = [
        f"# Sweep {spec.name}",
        "",
        f"{spec.description}".strip(),
        "",
        f"Generated by `clbench sweep {_shown_source(spec)}` from the records in "
        f"`{out}/runs/`. Percentages, mean ± sample std (ddof=1) over seeds.",
        "",
    ]
    for bench, t in table.groupby("benchmark", sort=False):
        head = [
            "strategy",
            *(a.label for a in spec.axes),
            "seeds",
            *(h for _, h in _REPORT_METRICS),
            "memory",
            "exemplars",
        ]
        lines += [f"## {bench}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for _, r in t.iterrows():
            cells = [r.strategy, *(str(r[c]) for c in axis_cols), str(r.n_seeds)]
            cells += [_pm(r[f"{m}_mean"], r[f"{m}_std"]) for m, _ in _REPORT_METRICS]
            ex = r.exemplars
            cells += [f"{int(r.memory_bytes):,} B", "—" if ex != ex else f"{ex:,.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if x is not None:
            png = state / f"report__{_safe(str(bench))}.png"
            files[png] = report_png(table, spec, x, str(bench))
            lines += [f"![{bench}]({png.name})", ""]
    if x is not None:
        for metric, title in _REPORT_METRICS[:2]:
            leads = _leads(runs, table, spec, x, metric)
            if not leads:
                continue
            head = ["benchmark", x.label, "leader", "runner-up", "gap", "Welch p", "verdict"]
            lines += [
                f"### Who leads in {title}",
                "",
                "| " + " | ".join(head) + " |",
                "|" + "---|" * len(head),
            ]
            lines += ["| " + " | ".join(r) + " |" for r in leads]
            lines.append("")
        for a_name, b_name in spec.report_compare:
            for metric, title in _REPORT_METRICS[:2]:
                rows, sentence = _compare(runs, table, spec, x, metric, (a_name, b_name))
                if not rows:
                    continue
                head = ["benchmark", x.label, a_name, b_name, "B - A", "Welch p", "verdict"]
                lines += [
                    f"### {b_name} against {a_name}: {title}",
                    "",
                    "| " + " | ".join(head) + " |",
                    "|" + "---|" * len(head),
                    *("| " + " | ".join(r) + " |" for r in rows),
                    "",
                    sentence,
                    "",
                ]
    files[state / "report.md"] = "\n".join(lines).encode()
    for path, data in files.items():
        write_bytes_atomic(path, data)
    return list(files)


# --------------------------------------------------------------------------- CLI


def print_plan(
    jobs: Sequence[PlannedJob], out: Path, executor: Any, problems: list[str], log=print
) -> None:
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j.status] = counts.get(j.status, 0) + 1
    width = max(len(j.run_id) for j in jobs)
    for j in jobs:
        detail = f"  ({j.detail})" if j.detail else ""
        log(f"{j.status:9s} {j.run_id:{width}s}{detail}".rstrip())
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    log(f"{len(jobs)} job(s): {summary}; out {out}; executor {executor.describe()}")
    for p in problems:
        log(f"missing: {p}")


def executor_spec(base: dict[str, Any], name: str | None, options: Sequence[str]) -> dict[str, Any]:
    """The YAML's ``executor:`` section, replaced by ``--executor NAME`` when it names another
    executor, with ``--executor-opt KEY=VALUE`` (YAML-parsed values) on top."""
    spec = dict(base or {})
    if name and name != spec.get("name", "local"):
        spec = {"name": name}
    for opt in options:
        if "=" not in opt:
            raise ConfigError(f"--executor-opt {opt!r}: expected KEY=VALUE, e.g. workers=2")
        k, v = opt.split("=", 1)
        spec[k.strip()] = yaml.safe_load(v) if v else None
    return spec


def add_executor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--executor", metavar="NAME", help="local | submitit | ray (default: the YAML's)"
    )
    p.add_argument(
        "--executor-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="executor option, e.g. workers=2, partition=gpu, address=auto",
    )
    p.add_argument(
        "--data-root", help="dataset root (default: the YAML's, $CLBENCH_DATA_ROOT, ./data)"
    )
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: the YAML's, else cpu)")
    p.add_argument(
        "--dry-run", action="store_true", help="list the jobs and what is recorded; run nothing"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write the leaderboard and report from the records already there; run nothing",
    )
    p.add_argument(
        "--no-leaderboard", action="store_true", help="do not build the leaderboard at the end"
    )


def execute(spec: SweepSpec, args: argparse.Namespace, default_out: Path) -> int:
    """Shared by ``sweep`` and ``reproduce``: dry-run listing or the run itself."""
    from clbench.executors import create_executor

    out = Path(args.out or spec.out or default_out)
    from clbench.data import DATA_ROOT_ENV

    # explicit on every job's command line: Ray workers and cluster nodes do not inherit it
    data_root = args.data_root or spec.data_root or os.environ.get(DATA_ROOT_ENV)
    device = args.device or spec.device
    executor = create_executor(executor_spec(spec.executor, args.executor, args.executor_opt))
    if args.dry_run:
        jobs = plan(spec, out)
        for j in jobs:
            j.status, j.detail = job_status(j, out)
        failed = _previous_errors(out, spec)
        for j in jobs:
            if j.status in ("missing", "partial") and j.run_id in failed:
                j.detail = f"failed last time: {failed[j.run_id].get('error')}"
        todo = {j.config_path: j.config for j in jobs if j.status != "recorded"}
        problems = requirements(todo.values(), data_root, spec.hints) if todo else []
        print_plan(jobs, out, executor, problems)
        return 0
    if getattr(args, "report_only", False):  # e.g. after a sweep stopped part-way
        jobs = plan(spec, out)
        recorded = any(job_status(j, out)[0] == "recorded" for j in jobs)
        if not write_outputs(spec, out, jobs, leaderboard=not args.no_leaderboard and recorded):
            _say(f"{out}: no records yet")
        return 0
    run = run_sweep(
        spec, out, executor=executor, data_root=data_root, device=device,
        leaderboard=not args.no_leaderboard,
    )  # fmt: skip
    return 1 if any(r["status"] == "failed" for r in run.results.values()) else 0


def _shown_source(spec: SweepSpec) -> str:
    """How a report names its sweep: the shipped name, else the path relative to here."""
    if not spec.source:
        return spec.name
    src = Path(spec.source).resolve()
    try:
        if src.parent == SWEEPS_DIR.resolve():
            return src.stem
        return str(src.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(src)


def default_out(name: str) -> Path:
    """Where a sweep writes without ``out``: beside ``clbench run``'s git-ignored default."""
    from clbench.records import DEFAULT_RESULTS_DIR

    return Path(DEFAULT_RESULTS_DIR) / name


def _cmd_sweep(args: argparse.Namespace) -> int:
    spec = load_sweep(args.file)
    return execute(spec, args, default_out(spec.name))


def add_sweep_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``sweep`` to the CLI's sub-parsers."""
    p = subparsers.add_parser(
        "sweep",
        help="run a grid of benchmarks x strategies x seeds x --set values on an executor",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("file", metavar="FILE", help="sweep YAML (or a name in benchmarks/sweeps/)")
    p.add_argument(
        "--out", help="results folder (default: the YAML's out, else results-local/NAME)"
    )
    add_executor_arguments(p)
    p.set_defaults(func=_cmd_sweep)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m clbench.sweep FILE``, the same as ``clbench sweep FILE``."""
    parser = argparse.ArgumentParser(prog="clbench sweep")
    sub = parser.add_subparsers(dest="command")
    add_sweep_command(sub)
    args = parser.parse_args(["sweep", *(sys.argv[1:] if argv is None else argv)])
    return exit_status(args.func, args)


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "Axis",
    "PlannedJob",
    "SweepSpec",
    "add_sweep_command",
    "execute",
    "job_status",
    "load_sweep",
    "plan",
    "requirements",
    "run_sweep",
    "write_report",
]
