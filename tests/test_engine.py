"""The training engine, the optimizer/scheduler registries, the lifecycle and typed params."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clbench.config import load_config
from clbench.engine import Engine, NonFiniteLossError, amp_dtype, on_terminal
from clbench.errors import ConfigError
from clbench.optim import (
    OPTIMIZERS,
    SCHEDULERS,
    Optim,
    Schedule,
    build_optimizer,
    build_scheduler,
    check_optim,
)
from clbench.strategies.base import (
    STRATEGIES,
    Strategy,
    StrategyContext,
    backbone_fingerprint,
    check_fingerprint,
)


def _data(n: int = 24, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def _model(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def _loader(seed: int = 2) -> DataLoader:
    return DataLoader(
        _data(), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


# -- the engine -------------------------------------------------------------------------------


def test_engine_equals_a_hand_written_loop_bit_for_bit():
    """SGD + momentum, per-step cosine, clipping: the same numbers as the loop it replaced."""
    epochs, clip = 3, 0.5
    ref = _model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loader = _loader()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader))
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(ref(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(list(ref.parameters()), clip)
            opt.step()
            sched.step()

    model = _model()
    res = Engine("test").fit(
        _loader(),
        model.parameters(),
        optim=Optim("sgd", 0.1, 0.9, 1e-4),
        schedule=Schedule("cosine"),
        epochs=epochs,
        loss=lambda x, y: F.cross_entropy(model(x), y),
        clip=clip,
        modules=[model],
    )
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert (res.epochs, res.steps, res.images) == (3, 15, 72)
    assert res.updates == {"train": 15} and res.trainable == 5 * 8 + 8 + 8 * 3 + 3
    assert res.seconds > 0 and not model.training  # put back in eval mode


def test_step_function_takes_two_updates_and_a_gradient_hook_between_backward_and_step():
    model = _model()
    seen = []

    def hook() -> None:  # runs after backward: the gradients exist; zero them -> no change
        seen.append(all(p.grad is not None for p in model.parameters()))
        for p in model.parameters():
            p.grad.zero_()

    def step(fit, x, y):
        with fit.autocast():
            first = F.cross_entropy(model(x), y)
        before = [p.detach().clone() for p in model.parameters()]
        fit.update(first, "first", before_step=hook)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        with fit.autocast():
            second = F.cross_entropy(model(x), y)
        fit.update(second, "second")

    res = Engine("test").fit(
        _loader(), model.parameters(), optim=Optim("sgd", 0.1, 0.0), epochs=2, step=step
    )
    assert res.updates == {"first": 10, "second": 10} and res.steps == 10
    assert seen == [True] * 10


@pytest.mark.parametrize("every,expected_steps", [("step", 10), ("epoch", 2)])
def test_schedule_is_stepped_per_batch_or_per_epoch(every, expected_steps):
    model = _model()
    fits = []
    Engine("test").fit(
        _loader(),
        model.parameters(),
        optim=Optim("sgd", 1.0, 0.0),
        schedule=Schedule("cosine", every=every, min_lr=0.25),
        epochs=2,
        loss=lambda x, y: F.cross_entropy(model(x), y),
        on_epoch_end=fits.append,
    )
    sched = fits[-1].scheduler
    assert sched.last_epoch == expected_steps  # T_max = steps of the fit: annealed to min_lr
    assert sched.get_last_lr()[0] == pytest.approx(0.25)


def test_non_finite_loss_stops_naming_experience_step_and_what():
    model = _model()
    engine = Engine("strategy x")

    def loss(x, y):
        return F.cross_entropy(model(x), y) * float("nan")

    with pytest.raises(
        NonFiniteLossError,
        match=r"strategy x: loss is nan at experience 3, step 0 \(train\); lower it",
    ):
        engine.fit(
            _loader(), model.parameters(), optim=Optim(), epochs=1, loss=loss, exp_index=3,
            hint="lower it",
        )  # fmt: skip


def test_on_epoch_end_can_stop_the_fit():
    model = _model()
    res = Engine("test").fit(
        _loader(),
        model.parameters(),
        optim=Optim(),
        epochs=5,
        loss=lambda x, y: F.cross_entropy(model(x), y),
        on_epoch_end=lambda fit: fit.epoch < 1,
    )
    assert res.epochs == 2 and res.steps == 10 and res.last_loss is not None


def test_progress_bar_only_on_a_terminal(capsys):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert on_terminal(Tty()) and not on_terminal(io.StringIO()) and not on_terminal(object())
    model = _model()
    Engine("test", progress=True).fit(  # pytest's captured stderr is not a terminal
        _loader(), model.parameters(), optim=Optim(), epochs=1,
        loss=lambda x, y: F.cross_entropy(model(x), y),
    )  # fmt: skip
    assert "\r" not in capsys.readouterr().err


def test_fit_takes_exactly_one_of_loss_and_step():
    with pytest.raises(TypeError, match="exactly one"):
        Engine("test").fit(_loader(), _model().parameters(), optim=Optim(), epochs=1)


def test_amp_dtypes():
    cpu = torch.device("cpu")
    assert amp_dtype("off", cpu) is None and amp_dtype("bf16", cpu) is torch.bfloat16
    assert amp_dtype("fp16", cpu) is torch.float16
    assert amp_dtype("auto", cpu) in (None, torch.bfloat16)


# -- registries -----------------------------------------------------------------------------


def test_optimizers_come_from_torch_and_drop_settings_they_do_not_take():
    names = OPTIMIZERS.names()
    assert {"sgd", "adam", "adamw", "rmsprop", "adagrad"} <= set(names) and "lbfgs" not in names
    p = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1), requires_grad=False)]
    opt = build_optimizer(p, Optim("adam", 0.01, momentum=0.9, weight_decay=0.1))
    assert isinstance(opt, torch.optim.Adam) and len(opt.param_groups[0]["params"]) == 1
    assert "momentum" not in opt.defaults and opt.defaults["weight_decay"] == 0.1
    sgd = build_optimizer(p, Optim("sgd", 0.01, momentum=0.5))
    assert sgd.defaults["momentum"] == 0.5


def test_schedules():
    def opt():
        return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)

    def advance(sched, n: int) -> None:
        for _ in range(n):
            sched.optimizer.step()
            sched.step()

    s = build_scheduler(opt(), Schedule("multistep", milestones=(0.5, 0.75)), 8)
    assert sorted(s.milestones) == [4, 6]
    s = build_scheduler(opt(), Schedule("inflora-cosine"), 5)
    advance(s, 2)
    assert s.get_last_lr()[0] == pytest.approx(math.cos(99 * math.pi * 2 / (200 * 4)))
    assert build_scheduler(opt(), Schedule("none"), 5) is None
    s = build_scheduler(opt(), Schedule("steplr", kwargs={"step_size": 2, "gamma": 0.5}), 5)
    advance(s, 2)
    assert s.get_last_lr()[0] == 0.5  # a torch scheduler named by its class
    w = build_scheduler(opt(), Schedule("warmup-cosine", warmup=2), 10)
    assert w.get_last_lr()[0] == pytest.approx(0.5)  # (0 + 1) / 2
    w.replan(4, 2)
    advance(w, 4)
    assert w.get_last_lr()[0] == pytest.approx(0.0)  # annealed at the re-planned end
    assert {"cosine", "multistep", "cosineannealinglr", "onecyclelr"} <= set(SCHEDULERS.names())


def test_bad_optimizer_or_scheduler_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"train\.optimizer: unknown optimizer 'sgdd'.*sgd"):
        check_optim(Optim("sgdd"), Schedule(), "train.optimizer", "train.scheduler")
    with pytest.raises(ConfigError, match=r"train\.scheduler: unknown scheduler 'cosin'"):
        check_optim(Optim(), Schedule("cosin"), "train.optimizer", "train.scheduler")
    with pytest.raises(ConfigError, match=r"train\.scheduler: .*step_size"):
        check_optim(Optim(), Schedule("steplr"), "train.optimizer", "train.scheduler")
    with pytest.raises(ConfigError, match=r"train\.optimizer: .*learning rate"):
        check_optim(Optim("sgd", -1.0), Schedule(), "train.optimizer", "train.scheduler")


# -- strategies: typed parameters, lifecycle, fingerprints -----------------------------------


def _ctx(**train) -> StrategyContext:
    cfg = load_config({"train": {"threads": 1, **train}, "backbone": {"kwargs": {"hidden": 8}}})
    from clbench.backbones import create_backbone

    return StrategyContext(
        config=cfg,
        num_classes=4,
        experience_classes=[[0, 1], [2, 3]],
        image_size=8,
        make_backbone=lambda: create_backbone(cfg.backbone, 8),
    )


@pytest.mark.parametrize(
    "name,params,match",
    [
        (
            "er",
            {"mem_size": "abc"},
            r"strategy er: parameter mem_size expects int \| None, got 'abc'",
        ),
        ("lwf", {"alpha": "x"}, r"strategy lwf: parameter alpha expects float"),
        ("lwf", {"alpha": True}, r"parameter alpha expects float, got True"),
        ("ewc", {"mode": 3}, r"parameter mode expects str, got 3"),
        ("lwf", {"temperature": None}, r"parameter temperature expects float, got None"),
        ("cl-lora", {"rank": 2.5}, r"strategy cl-lora: parameter rank expects int \| None"),
        ("dualprompt", {"e_layers": 3}, r"parameter e_layers expects list"),
    ],
)
def test_wrong_parameter_type_names_strategy_and_key(name, params, match):
    with pytest.raises(ConfigError, match=match):
        STRATEGIES.get(name).check_params(params)


def test_parameter_types_accept_what_they_should():
    er = STRATEGIES.get("er").check_params(
        {"mem_size": None, "budget_bytes": "6MB", "codec": "jpeg:q=50"}
    )
    assert er["mem_size"] is None and er["budget_bytes"] == "6MB"
    lwf = STRATEGIES.get("lwf").check_params({"alpha": 2, "temperature": "1e-1"})
    assert lwf["alpha"] == 2 and lwf["temperature"] == 0.1  # YAML 1.1 reads 1e-1 as a string
    assert STRATEGIES.get("seq-lora").check_params({"alpha": 8.5})["alpha"] == 8.5


def test_wrong_type_is_refused_when_the_strategy_is_built():
    with pytest.raises(ConfigError, match="mem_size expects"):
        STRATEGIES.get("er")(_ctx(), mem_size="abc")


def test_cli_wrong_parameter_type_is_one_line_exit_2_nothing_written(tmp_path, capsys):
    from clbench.cli import main

    argv = ["run", "digits", "--strategy", "finetune", "er", "--out", str(tmp_path / "o")]
    argv += ["--set", "strategy_params.er.mem_size=abc", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "strategy er: parameter mem_size expects int" in err[0]
    assert not list((tmp_path / "o").glob("runs/*.json"))


def test_bad_train_optimizer_is_refused_when_the_strategy_is_built():
    with pytest.raises(ConfigError, match=r"train\.optimizer: unknown optimizer 'adamm'"):
        STRATEGIES.get("finetune")(_ctx(optimizer="adamm"))


def test_lifecycle_order_and_missing_learn():
    calls = []

    class Mine(Strategy):
        def before_experience(self, exp):
            calls.append("before")

        def learn(self, exp):
            calls.append("learn")

        def after_experience(self, exp):
            calls.append("after")

        def predict(self, x):
            return x

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    Mine(_ctx()).train_experience(None)
    assert calls == ["before", "learn", "after"]

    class NoLearn(Mine):
        learn = Strategy.learn

    with pytest.raises(NotImplementedError, match="neither learn nor train_experience"):
        NoLearn(_ctx()).train_experience(None)


def test_backbone_fingerprint_refuses_other_weights_and_reads_older_checkpoints():
    ps = [torch.ones(3), torch.full((2,), 2.0)]
    fp = backbone_fingerprint(ps)
    assert fp == [3.0, 4.0, 2.0]
    check_fingerprint(fp, fp, "x")
    check_fingerprint(fp[:2], fp, "x")  # written before the count was stored
    check_fingerprint(None, fp, "x")
    with pytest.raises(ConfigError, match="x checkpoint was made with different backbone weights"):
        check_fingerprint([3.0, 5.0], fp, "x")
