"""CL-LoRA mechanism tests on a tiny timm ViT (CPU, no downloads).

The tiny-context helpers here are also used by tests/test_ptm.py.
"""

from __future__ import annotations

import io

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import Dataset

from clbench.config import load_config
from clbench.errors import ConfigError
from clbench.strategies.base import STRATEGIES, Experience, StrategyContext
from clbench.strategies.cl_lora import (
    CLLoRA,
    CLLoRAViT,
    CosineHead,
    inference_mode,
    orth_block_weights,
    orth_lora_down,
)

IMG = 32


def tiny_vit(depth: int = 4) -> VisionTransformer:
    return VisionTransformer(
        img_size=IMG, patch_size=8, embed_dim=64, depth=depth, num_heads=2, num_classes=0
    )


class SyntheticImages(Dataset):
    """An easy task: class c is a distinct colour (+ noise); items are ``(x, y, 0)``."""

    def __init__(self, classes: list[int], per_class: int, seed: int, n_total: int = 10):
        g = torch.Generator().manual_seed(seed)
        palette = torch.rand(n_total, 3, 1, 1, generator=torch.Generator().manual_seed(7))
        xs, ys = [], []
        for c in classes:
            noise = 0.1 * torch.randn(per_class, 3, IMG, IMG, generator=g)
            xs.append(palette[c] + noise)
            ys += [c] * per_class
        self.x, self.y = torch.cat(xs), torch.tensor(ys)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i]), 0


class _Groups:
    """Stands in for an Avalanche dataset: the same tensors for every transform group."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def with_transforms(self, group: str) -> Dataset:
        return self.ds


def make_experiences(n_exp: int = 2, per_exp: int = 2, per_class: int = 6, seed: int = 0):
    exps, tests = [], []
    for i in range(n_exp):
        classes = list(range(i * per_exp, (i + 1) * per_exp))
        ds = SyntheticImages(classes, per_class, seed + i)
        exps.append(Experience(index=i, classes=classes, dataset=_Groups(ds)))
        tests.append(SyntheticImages(classes, 4, seed + 100 + i))
    return exps, tests


def make_ctx(
    n_classes: int = 4,
    per_exp: int = 2,
    epochs: int = 1,
    batch_size: int = 4,
    lr: float = 0.05,
    amp: str = "off",
    backbone=tiny_vit,
) -> StrategyContext:
    cfg = load_config(
        {
            "backbone": {"name": "vit_tiny_patch16_224"},
            "train": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "amp": amp},
            "strategies": ["cl-lora"],
        }
    )

    def make_backbone():
        torch.manual_seed(123)
        return backbone()

    return StrategyContext(
        config=cfg,
        num_classes=n_classes,
        experience_classes=[list(range(i, i + per_exp)) for i in range(0, n_classes, per_exp)],
        image_size=IMG,
        make_backbone=make_backbone,
    )


def cl_lora(ctx: StrategyContext | None = None, **params) -> CLLoRA:
    params.setdefault("shared_blocks", 2)
    params.setdefault("rank", 4)
    return STRATEGIES.get("cl-lora")(ctx or make_ctx(), **params)


def accuracy(strategy, tests) -> float:
    correct = total = 0
    for ds in tests:
        logits = strategy.predict(ds.x)
        correct += int((logits.argmax(1) == ds.y).sum())
        total += len(ds.y)
    return correct / total


def _is_orthonormal_rows(m: torch.Tensor) -> bool:
    return torch.allclose(m @ m.T, torch.eye(m.shape[0]), atol=1e-5)


# -- adapters ------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["qr-uniform", "svd-gaussian"])
def test_shared_down_is_orthonormal_and_frozen(init):
    s = cl_lora(shared_init=init, epochs=1)
    net = s.net
    before = net.shared_down.clone()
    assert net.shared_down.shape == (2, 2, 4, 64)
    for i in range(2):
        for j in range(2):
            assert _is_orthonormal_rows(net.shared_down[i, j])
    # a buffer: never handed to an optimiser
    assert all(p is not net.shared_down for p in net.parameters())
    exps, _ = make_experiences()
    for e in exps:
        s.train_experience(e)
    assert torch.equal(net.shared_down, before)
    assert not any(p is net.shared_down for p in net.trainable())


def test_up_projections_start_at_zero_and_new_downs_orthonormal():
    s = cl_lora()
    net = s.net
    assert torch.count_nonzero(net.shared_up) == 0 and net.shared_up.requires_grad
    net.add_task()
    assert torch.count_nonzero(net.task_up[0]) == 0
    for j in range(net.n_specific):
        for k in range(2):
            assert _is_orthonormal_rows(net.task_down[0][j, k])
    assert net.task_down[0].requires_grad and net.task_up[0].requires_grad
    w = net.task_weights[0]
    assert w.shape == (2, 3) and bool(((w >= 0.5) & (w <= 1.5)).all())
    # zero A: the adapted network equals the frozen ViT
    x = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        ref = net.vit(x)
        assert torch.allclose(net.features(x, 0), ref, atol=1e-6)


def test_paper_block_weights_are_positive_scalars():
    s = cl_lora(block_weights="per-block")
    s.net.add_task()
    w = s.net.block_weights(0)
    assert w.shape == (2, 1) and bool((w > 0).all())
    assert bool(((w >= 0.5 - 1e-6) & (w <= 1.5 + 1e-6)).all())


def test_gradient_reassignment_scales_rows_by_formula():
    s = cl_lora()
    net = s.net
    torch.manual_seed(0)
    net.teacher_up = torch.randn_like(net.shared_up)
    g = torch.randn_like(net.shared_up)
    net.shared_up.grad = g.clone()
    net.reassign_shared_gradients()
    for i in range(net.l):
        for j in range(2):  # q, v
            a_prev = net.teacher_up[i, j]  # [d=64 rows, r]
            n = torch.linalg.vector_norm(a_prev, dim=1)
            w = a_prev.shape[0] * n / n.sum()
            assert torch.allclose(net.shared_up.grad[i, j], g[i, j] * w[:, None], atol=1e-6)
            # rows: each output dimension of A scaled by one factor; mean factor is 1
            assert torch.isclose(w.mean(), torch.tensor(1.0))


def test_distillation_touches_only_shared_adapters_and_head():
    s = cl_lora()
    exps, _ = make_experiences()
    s.train_experience(exps[0])
    net = s.net
    net.add_task()
    with torch.no_grad():  # make the teacher differ from the student
        net.shared_up.add_(0.1 * torch.randn_like(net.shared_up))
    head = CosineHead(64, 2)
    x = torch.rand(4, 3, IMG, IMG)
    loss = s.distill_loss(net.embed(x), head)
    loss.backward()
    grads = {n for n, p in net.named_parameters() if p.grad is not None}
    assert grads == {"shared_up"}
    assert head.weight.grad is not None  # official: the KD loss also trains the head
    assert net.teacher_up.grad is None
    # the paper-style variant stops the teacher logits' gradient
    s.params["kd_head_grad"] = False
    head.zero_grad(set_to_none=True)
    s.distill_loss(net.embed(x), head).backward()
    assert head.weight.grad is not None  # via the student only


def test_two_optimizer_steps_per_batch_after_first_task(monkeypatch):
    calls = []
    orig = torch.optim.SGD.step

    def counting(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", counting)
    s = cl_lora(ctx=make_ctx(epochs=2, batch_size=4))
    exps, _ = make_experiences(per_class=6)  # 12 images / exp -> 3 batches
    s.train_experience(exps[0])
    assert len(calls) == 2 * 3 and s.step_counts == {"kd": 0, "ce": 6}
    calls.clear()
    s.train_experience(exps[1])
    assert len(calls) == 2 * 2 * 3 and s.step_counts == {"kd": 6, "ce": 6}


def test_adapters_and_block_weights_frozen_after_their_task():
    s = cl_lora(ctx=make_ctx(n_classes=6, epochs=2))
    exps, _ = make_experiences(n_exp=3)
    s.train_experience(exps[0])
    net = s.net
    snap = [t.clone() for t in (net.task_down[0], net.task_up[0], net.task_weights[0])]
    shared_after_0 = net.shared_up.detach().clone()
    assert torch.count_nonzero(net.task_up[0]) > 0  # it did learn
    assert torch.equal(net.teacher_up, shared_after_0)
    s.train_experience(exps[1])
    s.train_experience(exps[2])
    for t, before in zip(
        (net.task_down[0], net.task_up[0], net.task_weights[0]), snap, strict=True
    ):
        assert not t.requires_grad
        assert torch.equal(t, before)
    assert not any(p.requires_grad for p in (*net.task_down, *net.task_up, *net.task_weights))
    # the shared A keeps training through all tasks
    assert not torch.equal(net.shared_up, shared_after_0)


def test_prototypes_are_class_means_under_the_tasks_adapters():
    s = cl_lora()
    exps, _ = make_experiences()
    s.train_experience(exps[0])
    protos_0 = s.prototypes.clone()
    s.train_experience(exps[1])
    assert s.prototypes.shape == (4, 64) and s.n_seen == 4
    assert torch.equal(s.prototypes[:2], protos_0)  # old prototypes are kept as they were
    ds = exps[1].data("eval")
    with torch.no_grad():
        s.net.eval()
        f = s.net.features(ds.x, 1)
    for c in (2, 3):
        assert torch.allclose(s.prototypes[c], f[ds.y == c].mean(0), atol=1e-5)


def _trained_three_tasks():
    s = cl_lora(ctx=make_ctx(n_classes=6, epochs=1, lr=0.1))
    exps, tests = make_experiences(n_exp=3)
    for e in exps:
        s.train_experience(e)
    return s, tests


def test_efficient_inference_equals_reference():
    s, tests = _trained_three_tasks()
    x = torch.cat([t.x for t in tests])
    with inference_mode(s, "reference"):
        ref = s.predict(x)
    fast = s.predict(x)
    assert fast.shape == (len(x), 6)
    with torch.no_grad():  # non-trivial: each task's adapters give different features
        f = s.net.features_all_tasks(x)
    assert (f[0] - f[1]).abs().max() > 1e-3 and (f[1] - f[2]).abs().max() > 1e-3
    assert (fast - ref).abs().max() <= 1e-4
    for chunk in (2, 1):  # tasks batched two at a time / one at a time
        s.params["infer_chunk"] = chunk  # block l's qkv is cached across these calls
        assert (s.predict(x) - ref).abs().max() <= 1e-4
    first = s.net.vit.blocks[s.net.l].attn.qkv
    assert not first.shared_input and first._base_cache is None  # nothing leaks to training


def test_easy_task_is_learned_and_state_round_trips(tmp_path):
    s, tests = _trained_three_tasks()
    acc = accuracy(s, tests)
    assert acc > 0.6, acc  # chance is 1/6
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    s2 = cl_lora(ctx=make_ctx(n_classes=6))
    s2.load_state_dict(state)
    x = torch.cat([t.x for t in tests])
    assert torch.equal(s2.predict(x), s.predict(x))


def test_vit_b16_trainable_params_on_second_task_match_official_count():
    import timm

    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    net = CLLoRAViT(vit, rank=10, shared_blocks=6)
    net.add_task()
    net.end_task()
    net.add_task()
    # shared A 92,160 + task-specific A and B 184,320 + 18 block weights (official log)
    assert sum(p.numel() for p in net.trainable()) == 276_498


def test_orthogonality_losses():
    s = cl_lora()
    net = s.net
    net.add_task()
    net.end_task()
    net.add_task()
    w0, w1 = net.block_weights(0).flatten(), net.block_weights(1).flatten()
    expect = (w0 / w0.norm() @ (w1 / w1.norm())).abs()
    assert torch.isclose(orth_block_weights(net), expect, atol=1e-6)
    b0, b1 = net.task_down[0], net.task_down[1]
    expect = sum(
        (b1[j, k] @ b0[j, k].T).abs().sum() for j in range(net.n_specific) for k in range(2)
    )
    assert torch.isclose(orth_lora_down(net), expect, atol=1e-5)


def test_options_and_presets_are_validated():
    with pytest.raises(ConfigError, match="unknown parameter"):
        cl_lora(bogus=1)
    with pytest.raises(ConfigError, match="orth_loss"):
        cl_lora(orth_loss="nope")
    with pytest.raises(ConfigError, match="shared_blocks"):
        cl_lora(shared_blocks=4)
    s = STRATEGIES.get("cl-lora")(make_ctx(), preset="cifar100", shared_blocks=2)
    assert (s.params["rank"], s.params["epochs"], s.params["lr"]) == (8, 30, 0.03)
    assert s.params["batch_size"] == 64 and s.params["weight_decay"] == 1e-4
    s = STRATEGIES.get("cl-lora")(make_ctx(), preset="imagenet-r", shared_blocks=2, lr=0.01)
    assert s.params["lr"] == 0.01 and s.params["rank"] == 10
    s = STRATEGIES.get("cl-lora")(make_ctx(epochs=3), shared_blocks=2)
    assert s.params["epochs"] == 3 and s.params["rank"] == 10  # benchmark train section


def test_bf16_autocast_training_and_inference_run():
    s = cl_lora(ctx=make_ctx(amp="bf16"))
    exps, tests = make_experiences()
    for e in exps:
        s.train_experience(e)
    logits = s.predict(tests[0].x)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
