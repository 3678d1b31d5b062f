"""The spine end to end on tiny data: config, scenarios, strategies, runner, resume, CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clbench.cli import main
from clbench.codecs import get_codec
from clbench.config import load_config
from clbench.errors import ClbenchError, ConfigError
from clbench.memory import ExemplarBuffer, parse_bytes
from clbench.records import validate_record
from clbench.runner import run_benchmark, run_one
from clbench.scenarios import build_scenario, split_sizes

# a fast digits config: few epochs, a small MLP, one thread (deterministic and quick)
FAST = ["train.epochs=2", "backbone.kwargs.hidden=32", "train.threads=1"]


def fast_cfg(*extra: str):
    return load_config("digits", [*FAST, *extra])


@pytest.fixture(scope="module")
def digits_scenario():
    cfg = fast_cfg()
    return cfg, build_scenario(cfg)


# -- config -------------------------------------------------------------------------------
def test_unknown_key_names_key_and_valid_ones():
    with pytest.raises(ConfigError, match=r"train\.epochz.*did you mean 'epochs'.*valid keys"):
        load_config("digits", ["train.epochz=3"])


def test_set_parses_yaml_values():
    cfg = load_config("digits", ["train.epochs=3", "strategies=[er, lwf]", "train.grad_clip=1.5"])
    assert cfg.train.epochs == 3 and cfg.strategies == ["er", "lwf"] and cfg.train.grad_clip == 1.5


def test_unknown_benchmark_lists_valid():
    with pytest.raises(ConfigError, match="valid benchmarks:.*digits"):
        load_config("digitz")


@pytest.mark.parametrize(
    "split,n,expected",
    [
        ("B0Inc10", 100, [10] * 10),
        ("B50Inc10", 100, [50] + [10] * 5),
        ("B11Inc10", 101, [11] + [10] * 9),
        ("B0Inc10", 101, [10] * 10 + [1]),
    ],
)
def test_split_sizes_never_drop_classes(split, n, expected):
    sizes = split_sizes(split, n)
    assert sizes == expected and sum(sizes) == n


def test_invalid_split_explains_itself():
    with pytest.raises(ConfigError, match="gives 10 experiences.*num_experiences is 5"):
        split_sizes("B0Inc10", 100, num_experiences=5)
    with pytest.raises(ConfigError, match="do not fit 100 classes"):
        split_sizes("B100Inc10", 100)
    with pytest.raises(ConfigError, match="B<base>Inc<inc>"):
        split_sizes("10x10", 100)


# -- scenario -----------------------------------------------------------------------------
def test_digits_scenario(digits_scenario):
    cfg, sc = digits_scenario
    assert sc.num_classes == 10 and len(sc.train_stream) == 5
    assert sc.class_order == [int(c) for c in np.random.RandomState(1993).permutation(10)]
    for i, exp in enumerate(sc.train_stream):
        assert sorted(set(exp.dataset.targets)) == sc.experience_classes[i] == [2 * i, 2 * i + 1]
        x, y, _ = exp.dataset.train()[0]
        assert x.dtype == torch.float32 and x.shape == (3, 8, 8)
        raw, _, _ = exp.dataset.with_transforms("raw")[0]
        assert raw.dtype == torch.uint8
    # labels remapped in learning order: learned class k is dataset class class_order[k]
    test_targets = [t for e in sc.test_stream for t in e.dataset.targets]
    assert sorted(set(test_targets)) == list(range(10))


def test_class_range_and_explicit_order():
    cfg = fast_cfg(
        "dataset.class_range=[2, 8]",
        "scenario.split=B2Inc2",
        "scenario.num_experiences=3",
        "scenario.class_order=[5, 4, 3, 2, 1, 0]",
    )
    sc = build_scenario(cfg)
    assert sc.class_order == [5, 4, 3, 2, 1, 0] and sc.num_classes == 6
    assert sc.class_names[0] == "7"  # dataset class 2 + 5


def test_missing_data_is_one_clear_error(tmp_path):
    cfg = load_config("tinyimagenet")
    with pytest.raises(ClbenchError, match="tiny-imagenet-200"):
        run_benchmark(cfg, tmp_path / "out", data_root=str(tmp_path / "nowhere"), progress=False)
    assert not (tmp_path / "out" / "runs").exists()


# -- strategies through the runner ----------------------------------------------------------
@pytest.mark.parametrize("name", ["finetune", "joint", "lwf", "ewc", "er", "der", "gdumb", "icarl"])
def test_every_baseline_runs_and_records(name, digits_scenario, tmp_path):
    cfg, sc = digits_scenario
    rec = run_one(cfg, sc, name, 0, tmp_path, log=lambda s: None)
    assert validate_record(rec) == []
    m = rec["metrics"]
    assert len(m["accuracy_matrix"]) == 5 and 0 <= m["last_accuracy"] <= 1
    assert rec["costs"]["trainable_params"] > 0
    saved = json.loads((tmp_path / "runs" / f"digits__{name}__s0.json").read_text())
    assert saved["status"] == "complete" and saved["metrics"] == json.loads(json.dumps(m))
    assert not (tmp_path / "checkpoints" / f"digits__{name}__s0.pt").exists()


def test_replay_beats_finetune_and_joint_is_upper_bound(digits_scenario, tmp_path):
    cfg, sc = digits_scenario
    acc = {
        s: run_one(cfg, sc, s, 0, tmp_path, log=lambda s: None)["metrics"]["last_accuracy"]
        for s in ["finetune", "er", "joint"]
    }
    assert acc["joint"] > acc["er"] > acc["finetune"]


def test_deterministic_for_a_seed(digits_scenario, tmp_path):
    cfg, sc = digits_scenario
    a = run_one(cfg, sc, "er", 3, tmp_path / "a", log=lambda s: None)
    b = run_one(cfg, sc, "er", 3, tmp_path / "b", log=lambda s: None)
    assert a["metrics"]["accuracy_matrix"] == b["metrics"]["accuracy_matrix"]


@pytest.mark.parametrize("name", ["er", "joint", "icarl", "ewc"])
def test_resume_gives_the_uninterrupted_matrix(name, digits_scenario, tmp_path):
    cfg, sc = digits_scenario
    full = run_one(cfg, sc, name, 1, tmp_path / "full", log=lambda s: None)
    out = tmp_path / "killed"
    assert run_one(cfg, sc, name, 1, out, stop_after=2, log=lambda s: None) is None
    partial = json.loads((out / "runs" / f"digits__{name}__s1.json").read_text())
    assert partial["status"] == "partial" and len(partial["metrics"]["accuracy_matrix"]) == 2
    ckpt = out / "checkpoints" / f"digits__{name}__s1.pt"
    torch.load(ckpt, weights_only=True)  # loadable without unpickling arbitrary objects
    resumed = run_one(cfg, sc, name, 1, out, resume=True, log=lambda s: None)
    assert resumed["metrics"]["accuracy_matrix"] == full["metrics"]["accuracy_matrix"]


def test_nan_loss_names_experience_and_step(digits_scenario, tmp_path):
    cfg, sc = digits_scenario
    bad = load_config("digits", [*FAST, "train.lr=1e30"])
    with pytest.raises(ClbenchError, match=r"loss is (nan|inf) at experience \d+, step \d+"):
        run_one(bad, sc, "finetune", 0, tmp_path, log=lambda s: None)


def test_unknown_strategy_and_param(digits_scenario, tmp_path):
    cfg, sc = digits_scenario
    with pytest.raises(ClbenchError, match="valid strategy names:.*finetune"):
        run_one(cfg, sc, "finetuned", 0, tmp_path)
    bad = fast_cfg("strategy_params={er: {mem_sise: 10}}")
    with pytest.raises(ConfigError, match="mem_sise.*valid: budget_bytes"):
        run_one(bad, sc, "er", 0, tmp_path)


def test_labelled_strategy_merges_params_over_the_plain_name(digits_scenario):
    from clbench.runner import build_strategy

    cfg, sc = digits_scenario
    c = fast_cfg("strategy_params={er: {mem_size: 30, selection: herding}, er@big: {mem_size: 90}}")
    dev = torch.device("cpu")
    plain, big = (build_strategy(c, n, sc, 0, dev, False) for n in ("er", "er@big"))
    assert type(big) is type(plain) and big.buffer.max_exemplars == 90
    assert plain.buffer.max_exemplars == 30 and big.params["selection"] == "herding"


# -- byte-budgeted buffer -------------------------------------------------------------------
def test_parse_bytes():
    assert parse_bytes("2MB") == 2_000_000 and parse_bytes("1 KiB") == 1024 and parse_bytes(7) == 7
    with pytest.raises(ConfigError, match="budget_bytes"):
        parse_bytes("lots")


def test_buffer_never_exceeds_budget_and_stays_balanced():
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # noqa: E731
    per = 8 * 8 * 3 + 8  # pixels + int64 label
    buf = ExemplarBuffer(get_codec("raw"), budget_bytes=10 * per + 5)
    buf.add_classes({0: [img() for _ in range(20)], 1: [img() for _ in range(20)]})
    assert buf.nbytes() <= buf.budget_bytes and [len(buf.payloads[c]) for c in (0, 1)] == [5, 5]
    buf.add_classes({2: [img() for _ in range(20)], 3: [img() for _ in range(20)]})
    assert buf.nbytes() <= buf.budget_bytes and all(len(buf.payloads[c]) == 2 for c in range(4))
    x, y = buf.tensors()
    assert x.shape == (8, 3, 8, 8) and y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    state = buf.state_dict()
    other = ExemplarBuffer(get_codec("raw"), budget_bytes=buf.budget_bytes)
    other.load_state_dict(state)
    assert torch.equal(other.tensors()[0], x)


def test_byte_budget_equals_count_for_raw(digits_scenario, tmp_path):
    cfg, sc = digits_scenario
    per = 8 * 8 * 3 + 8
    byb = fast_cfg(f"strategy_params={{er: {{mem_size: null, budget_bytes: {100 * per}}}}}")
    rec = run_one(byb, sc, "er", 0, tmp_path, log=lambda s: None)
    mem = rec["costs"]["memory"]
    assert mem["exemplars"] == 100 and mem["buffer_bytes"] == 100 * per
    assert mem["mean_bpp"] == pytest.approx(24.0)


# -- CLI ----------------------------------------------------------------------------------
def test_cli_run_and_skip(tmp_path, capsys):
    out = tmp_path / "res"
    args = [
        "run",
        "digits",
        "--strategy",
        "finetune",
        "er",
        "--out",
        str(out),
        "--no-progress",
        *sum((["--set", s] for s in FAST), []),
    ]
    assert main(args) == 0
    assert {p.name for p in (out / "runs").iterdir()} == {
        "digits__finetune__s0.json",
        "digits__er__s0.json",
    }
    assert (out / "leaderboard.md").is_file() and (out / "leaderboard.html").is_file()
    assert main(args) == 0
    assert "already recorded, skipping" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["run", "--set", "train.epochz=1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clbench: error: unknown config key train.epochz")
    assert not (tmp_path / "runs").exists()


def test_cli_list(capsys):
    assert main(["list", "strategies"]) == 0
    out = capsys.readouterr().out
    for s in ["finetune", "joint", "er", "icarl", "lwf", "ewc", "der", "gdumb"]:
        assert s in out


def test_data_root_env(monkeypatch, tmp_path):
    from clbench.data import resolve_data_root

    monkeypatch.setenv("CLBENCH_DATA_ROOT", str(tmp_path))
    assert resolve_data_root(None) == Path(tmp_path)
    assert resolve_data_root("/x") == Path("/x")


# -- the shipped benchmark files --------------------------------------------------------------
def _benchmarks():
    from clbench.config import BENCHMARKS_DIR

    return sorted(p.stem for p in BENCHMARKS_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", _benchmarks())
def test_every_benchmark_file_validates(name):
    from clbench.strategies.base import STRATEGIES, strategy_base

    cfg = load_config(name)
    assert {strategy_base(s) for s in cfg.strategies} <= set(STRATEGIES.names())
    for label, params in cfg.strategy_params.items():  # every key is one the strategy takes
        assert set(params or {}) <= set(STRATEGIES.get(strategy_base(label)).defaults), label


def test_cifar100_benchmark_on_a_fixture_in_torchvision_format(tmp_path):
    from fixtures_datasets import write_cifar100

    write_cifar100(tmp_path, [f"c{i:03d}" for i in range(100)], per_class=(2, 1))
    sc = build_scenario(load_config("cifar100"), tmp_path)
    assert sc.num_classes == 100 and len(sc.train_stream) == 10 and sc.image_size == 32
    assert sc.class_order[:5] == [68, 56, 78, 8, 23]  # PyCIL's seed-1993 order
    assert sum(len(e.dataset) for e in sc.train_stream) == 200


def test_food101_style_split_keeps_all_101_classes(tmp_path):
    from fixtures_datasets import write_food101

    write_food101(tmp_path, [f"food{i:03d}" for i in range(101)], per_class=(1, 1))
    cfg = load_config("food101", ["dataset.image_size=16"])
    sc = build_scenario(cfg, tmp_path)
    assert [len(c) for c in sc.experience_classes] == [11] + [10] * 9
    assert sum(len(e.dataset) for e in sc.test_stream) == 101
    x, _, _ = sc.train_stream[0].dataset.eval()[0]
    assert x.shape == (3, 16, 16)


def test_eval_resize_is_pilots_resize_then_centre_crop(tmp_path):
    """transforms.eval_resize: the shorter side to eval_resize (bicubic), centre crop (PILOT)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8))  # non-square
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "imagenet-r" / split / cls).mkdir(parents=True)
            im.save(tmp_path / "imagenet-r" / split / cls / "x.png")
    overrides = ["dataset.image_size=16", "scenario.split=B0Inc1", "scenario.num_experiences=2"]
    cfg = load_config("imagenet-r-ptm", [*overrides, "transforms.eval_resize=20"])
    x, _, _ = build_scenario(cfg, tmp_path).test_stream[0].dataset.eval()[0]
    ref = im.resize((30, 20), Image.Resampling.BICUBIC).crop((7, 2, 23, 18))  # 20 x 30 -> 16
    ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 255
    assert x.shape == (3, 16, 16) and (x - ref).abs().max() <= 2 / 255
    direct, _, _ = (
        build_scenario(load_config("imagenet-r-ptm", overrides), tmp_path)
        .test_stream[0]
        .dataset.eval()[0]
    )
    assert (direct - ref).abs().mean() > 0.05  # without it: the whole shorter side, no margin
    with pytest.raises(ConfigError, match="transforms.eval_resize 8 is smaller"):
        build_scenario(
            load_config("imagenet-r-ptm", [*overrides, "transforms.eval_resize=8"]), tmp_path
        )


# -- pre-flight: bad input is one line before any training (issue 13) -----------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("- a\n- b\n", "holds a YAML list, expected a mapping"),
        ("hello\n", "holds a YAML scalar ('hello'), expected a mapping"),
        ("", "is empty; it needs at least a dataset"),
        ("a: [1,\n", "invalid YAML at line 2"),
    ],
)
def test_benchmark_yaml_that_is_not_a_mapping(tmp_path, text, expected):
    (tmp_path / "b.yaml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(str(tmp_path / "b.yaml"))


@pytest.mark.parametrize(
    "device, expected",
    [("cuda:x", "valid values: cpu, cuda, cuda:N"), ("tpu", "valid values"), ("cuda:99", "cuda")],
)
def test_device_is_checked_against_the_machine(device, expected):
    from clbench.runner import resolve_device

    if device == "cuda:99" and not torch.cuda.is_available():
        expected = "no CUDA device is visible"
    elif device == "cuda:99":
        expected = "CUDA device(s)"
    with pytest.raises(ClbenchError, match=re.escape(expected)):
        resolve_device(device)


@pytest.mark.parametrize("where", ["out-file", "data-root-file", "device"])
def test_bad_paths_and_device_fail_before_data_or_training(tmp_path, capsys, where):
    (tmp_path / "f").write_text("x")
    args = {
        "out-file": ["--out", str(tmp_path / "f")],
        "data-root-file": ["--out", str(tmp_path / "o"), "--data-root", str(tmp_path / "f")],
        "device": ["--out", str(tmp_path / "o"), "--device", "cuda:x"],
    }[where]
    assert main(["run", "digits", *args, *sum((["--set", s] for s in FAST), [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clbench: error:"), err
    assert {"out-file": "is a file, not a folder", "data-root-file": "--data-root",
            "device": "cuda:x"}[where] in err[0]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # nothing written


def test_every_strategy_is_built_before_any_training(tmp_path, capsys):
    # er trains first in the list; finetune's bad parameter must stop the run before it
    args = ["run", "digits", "--strategy", "er", "finetune", "--out", str(tmp_path / "o"),
            "--set", "strategy_params.finetune={nope: 1}", *sum((["--set", s] for s in FAST), [])]  # fmt: skip
    assert main(args) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "o" / "runs").exists()


def test_help_and_config_errors_do_not_import_avalanche():
    code = (
        "import sys\nfrom clbench.cli import main\n"
        "assert main(['run', '--set', 'train.epochz=1']) == 2\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('avalanche', 'qpsolvers')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "QP solver" not in proc.stderr


def test_untrained_runs_and_warnings_are_recorded(digits_scenario, tmp_path, monkeypatch):
    import warnings

    from clbench.errors import ClbenchWarning
    from clbench.strategies.base import STRATEGIES

    cfg, sc = digits_scenario
    cls = STRATEGIES.get("finetune")
    real = cls.train_experience

    def noisy(self, exp):
        warnings.warn("exemplars are larger compressed than raw", ClbenchWarning, stacklevel=1)
        return real(self, exp)

    monkeypatch.setattr(cls, "train_experience", noisy)
    zero = load_config("digits", [*FAST, "train.epochs=0"])
    logged = []
    rec = run_one(zero, sc, "finetune", 0, tmp_path, log=logged.append)
    assert rec["untrained"] is True and validate_record(rec) == []
    assert rec["warnings"] == ["exemplars are larger compressed than raw"]  # once, not 5 times
    assert sum("warning: exemplars are larger" in s for s in logged) == 1
    assert run_one(cfg, sc, "joint", 0, tmp_path, log=lambda s: None)["untrained"] is False


def test_progress_bars_only_on_a_terminal(digits_scenario, tmp_path, monkeypatch):
    import clbench.runner as runner

    seen = []
    real = runner._run_one
    monkeypatch.setattr(
        runner, "_run_one", lambda *a, **k: seen.append(k["progress"]) or real(*a, **k)
    )
    cfg = fast_cfg("strategies=[finetune]")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    run_benchmark(cfg, tmp_path / "a", progress=True, log=lambda s: None)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    run_benchmark(cfg, tmp_path / "b", progress=True, log=lambda s: None)
    assert seen == [False, True]


def test_a_bare_off_from_yaml_or_set_is_the_string_off():
    """YAML 1.1 reads `off` as false; `--set train.amp=off` must still mean amp off."""
    from clbench.config import load_config

    assert load_config("digits", ["train.amp=off"]).train.amp == "off"
    assert load_config({"train": {"amp": False}, "strategies": ["er"]}).train.amp == "off"
