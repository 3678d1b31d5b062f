"""Benchmark configuration: YAML -> validated dataclasses.

A benchmark file (``benchmarks/<name>.yaml``) has the sections below. Every key is checked:
a typo names the key and lists the valid ones. ``--set a.b=value`` overrides any key (the
value is parsed as YAML, so ``--set train.epochs=3`` gives an int).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clbench.errors import ConfigError

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


@dataclass
class DatasetConfig:
    name: str = "digits"
    variant: str | None = None
    root: str | None = None  # None: --data-root, then $CLBENCH_DATA_ROOT, then ./data
    download: bool = False  # opt-in torchvision download where the dataset allows it
    class_range: list[int] | None = None  # [lo, hi): keep dataset classes lo..hi-1
    image_size: int | None = None  # resize (lazy, file-based sets) / model input size
    in_memory: bool = False  # decode a file-based set once into RAM (small images, e.g. 64x64)
    options: dict[str, Any] = field(default_factory=dict)  # loader-specific


@dataclass
class ScenarioConfig:
    split: str = "B0Inc2"  # B{base}Inc{inc}; base 0 means the first experience has inc classes
    num_experiences: int | None = None  # optional cross-check of the split
    # a registered order (icarl: numpy seed 1993; identity = sorted) or a list of ids/names
    class_order: str | list[int | str] = "icarl"
    class_order_seed: int = 1993


@dataclass
class BackboneConfig:
    name: str = "mlp"
    pretrained: bool = False
    checkpoint: str | None = None  # local weights file for pretrained models
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TransformConfig:
    augment: str = "none"  # none | crop_flip
    crop_padding: int = 4
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # resized_crop_flip
    # evaluation geometry: resize the shorter side to eval_resize (bicubic), centre-crop
    # image_size; PILOT/CL-LoRA use 256 -> 224. None: evaluate at image_size directly.
    eval_resize: int | None = None
    normalize: bool = True
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 256
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "none"  # none | cosine | multistep
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of epochs
    amp: str = "auto"  # auto (bf16 where the device multiplies bf16 natively) | bf16 | fp16 | off
    num_workers: int = 0
    grad_clip: float | None = None
    channels_last: bool = False  # NHWC convolutions (faster for CNNs on CPU with oneDNN)
    threads: int | None = None  # torch.set_num_threads; None keeps torch's default


@dataclass
class BenchmarkConfig:
    name: str = "digits"
    description: str = ""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    transforms: TransformConfig = field(default_factory=TransformConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategies: list[str] = field(default_factory=lambda: ["finetune"])
    seeds: list[int] = field(default_factory=lambda: [0])
    # per-strategy hyper-parameter overrides of the defaults kept beside each strategy
    strategy_params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, data: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown config key {where + '.' if where else ''}{key}{hint}; "
                f"valid keys: {', '.join(fields)}"
            )
        ftype = fields[key].type
        sub = _DATACLASSES.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        name = f"{where + '.' if where else ''}{key}"
        kwargs[key] = _build(sub, value, name) if sub else _coerce(value, str(ftype), name)
    return cls(**kwargs)


def build_dataclass(cls: type, data: Any, where: str = "") -> Any:
    """:func:`_build` for other YAML files (codec evaluation), so every config error reads
    the same. Fields typed with a dataclass this module does not know keep their mapping
    (the caller builds them)."""
    return _build(cls, data, where)


_SCALARS = {"float": float, "int": int, "bool": bool, "str": str}


def _coerce(value: Any, ftype: str, name: str) -> Any:
    """Check a scalar against its annotation (``"float | None"``...), converting numbers.

    YAML 1.1 reads ``1e-4`` as a string and ``3`` as an int; both are fine for a float key.
    """
    kinds = [k.strip() for k in ftype.split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise ConfigError(f"config key {name} must be set (expected {ftype})")
    for kind in kinds:
        conv = _SCALARS.get(kind)
        if conv is None:
            if kind != "None":
                return value  # containers and unions with them: checked where used
            continue
        if isinstance(value, conv) and not (conv is int and isinstance(value, bool)):
            return value
        if conv is str and isinstance(value, bool):
            # YAML 1.1 (PyYAML, and so `--set`) reads a bare off/on as a bool: `amp: off`
            return "on" if value else "off"
        if conv is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
    raise ConfigError(f"config key {name}: expected {ftype}, got {value!r}")


_DATACLASSES = {
    c.__name__: c
    for c in (DatasetConfig, ScenarioConfig, BackboneConfig, TransformConfig, TrainConfig)
}


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """``["train.epochs=3", "strategies=[er]"]`` -> [(key, yaml value), ...]."""
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. --set train.epochs=3")
        key, raw = pair.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw else None))
    return out


def yaml_beside(module_file: str, name: str) -> Any:
    """The parsed YAML file ``name`` beside ``module_file``: a module's shipped defaults."""
    with open(Path(module_file).with_name(name)) as f:
        return yaml.safe_load(f)


def find_shipped_yaml(
    name_or_path: str, folder: Path, kind: str, listed: str, *, existing_is_path: bool = True
) -> Path:
    """A YAML file named by path, or by name in ``folder`` (``digits`` -> ``folder/digits.yaml``).

    A ``.yaml``/``.yml`` suffix (or, with ``existing_is_path``, any existing path) means a
    path; an unknown name is one error that suggests the closest name and lists ``listed``
    (e.g. "valid benchmarks") from ``folder``."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or (existing_is_path and p.exists()):
        if p.is_dir():
            raise ConfigError(f"{kind} file {p} is a folder; pass a .yaml file")
        if not p.is_file():
            raise ConfigError(f"{kind} file {p} does not exist")
        return p
    cand = folder / f"{name_or_path}.yaml"
    if cand.is_file():
        return cand
    names = sorted(q.stem for q in folder.glob("*.yaml"))
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"unknown {kind} {name_or_path!r}{hint}; {listed}: {', '.join(names) or 'none'} "
        "(or pass a path to a .yaml file)"
    )


def find_benchmark(name_or_path: str) -> Path:
    """A benchmark name (``digits``) resolves to ``benchmarks/<name>.yaml``; a path is used as is."""
    # only a .yaml suffix makes a path: a folder in the cwd must not shadow a benchmark name
    return find_shipped_yaml(
        name_or_path, BENCHMARKS_DIR, "benchmark", "valid benchmarks", existing_is_path=False
    )


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> BenchmarkConfig:
    """Load and validate a benchmark config from a name, a YAML path or a dict."""
    if isinstance(source, dict):
        data = copy.deepcopy(source)
    else:
        path = find_benchmark(str(source))
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"benchmark file {path}: invalid YAML{where}: {what}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"benchmark file {path} cannot be read: {e}") from None
        if data is None:  # an empty file would otherwise run the built-in defaults
            raise ConfigError(
                f"benchmark file {path} is empty; it needs at least a dataset and strategies "
                "(see benchmarks/digits.yaml)"
            )
        if not isinstance(data, dict):
            raise ConfigError(
                f"benchmark file {path} holds a YAML {_yaml_kind(data)}, expected a mapping of "
                "sections (dataset, scenario, backbone, transforms, train, strategies, seeds, "
                "strategy_params); see benchmarks/digits.yaml"
            )
        data.setdefault("name", path.stem)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    cfg = _build(BenchmarkConfig, data, "")
    _check(cfg)
    return cfg


def _yaml_kind(data: Any) -> str:
    return "list" if isinstance(data, list) else f"scalar ({data!r:.40})"


def _check(cfg: BenchmarkConfig) -> None:
    if not isinstance(cfg.strategies, list) or not all(isinstance(s, str) for s in cfg.strategies):
        raise ConfigError(f"strategies {cfg.strategies!r}: expected a list of strategy names")
    if not cfg.strategies:
        raise ConfigError("strategies: list at least one strategy")
    if not isinstance(cfg.seeds, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in cfg.seeds
    ):
        raise ConfigError(f"seeds {cfg.seeds!r}: expected a list of integers")
    if not cfg.seeds:
        raise ConfigError("seeds: list at least one seed")
    params = cfg.strategy_params
    if not isinstance(params, dict) or not all(
        isinstance(v, dict) or v is None for v in params.values()
    ):
        raise ConfigError(
            "strategy_params: expected a mapping of strategy name to its parameters, e.g. "
            "strategy_params: {er: {mem_size: 200}}"
        )
    if cfg.train.epochs < 0 or cfg.train.batch_size <= 0:
        raise ConfigError("train.epochs must be >= 0 and train.batch_size > 0")
    if cfg.train.amp not in ("auto", "bf16", "fp16", "off"):
        raise ConfigError(f"train.amp {cfg.train.amp!r}: valid values: auto, bf16, fp16, off")
    from clbench.datasets.class_order import check_class_order  # the class-order registry

    check_class_order(cfg.scenario.class_order)
    if cfg.dataset.class_range is not None:
        r = cfg.dataset.class_range
        if not (isinstance(r, list) and len(r) == 2 and 0 <= r[0] < r[1]):
            raise ConfigError(f"dataset.class_range {r!r}: expected [lo, hi] with 0 <= lo < hi")
