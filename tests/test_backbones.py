"""Backbones: registered small CNNs, timm models by name, offline pretrained weights."""

from __future__ import annotations

import pytest
import torch

from clbench.backbones import create_backbone
from clbench.config import BackboneConfig
from clbench.errors import ClbenchError, ConfigError


@pytest.mark.parametrize(
    "name,kwargs,size,features",
    [
        ("resnet32", {}, 32, 64),
        ("resnet18", {"stem": "cifar"}, 32, 512),
        ("resnet18", {"stem": "imagenet", "width": 32}, 64, 256),
        ("small_cnn", {}, 32, 128),
        ("mlp", {"hidden": 16}, 8, 16),
    ],
)
def test_registered_backbones(name, kwargs, size, features):
    m = create_backbone(BackboneConfig(name=name, kwargs=kwargs), size)
    assert m.num_features == features
    assert m(torch.randn(2, 3, size, size)).shape == (2, features)


def test_resnet32_is_the_cifar_one():
    m = create_backbone(BackboneConfig(name="resnet32"), 32)
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(464_154, rel=0.01)


def test_timm_model_by_name_random_init():
    cfg = BackboneConfig(name="resnet10t", kwargs={})
    m = create_backbone(cfg, 32)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, m.num_features)


def test_pretrained_without_weights_is_a_clear_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to find
    with pytest.raises(ClbenchError, match="cannot load pretrained weights.*backbone.checkpoint"):
        create_backbone(BackboneConfig(name="resnet10t", pretrained=True), 32)
    with pytest.raises(ClbenchError, match="does not exist"):
        create_backbone(BackboneConfig(name="resnet10t", checkpoint=str(tmp_path / "w.pth")), 32)


def test_local_weight_file_through_timm(tmp_path):
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("resnet10t", num_classes=0)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    m = create_backbone(BackboneConfig(name="resnet10t", checkpoint=str(path)), 32)
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v)


def test_unknown_backbone_lists_valid():
    with pytest.raises(ConfigError, match="unknown backbone 'resnet-18'.*resnet18"):
        create_backbone(BackboneConfig(name="resnet-18"), 32)


def test_registered_backbone_from_local_checkpoint(tmp_path):
    src = create_backbone(BackboneConfig(name="small_cnn", kwargs={"width": 4}), 16)
    torch.save({"backbone": src.state_dict()}, tmp_path / "b.pt")
    cfg = BackboneConfig(name="small_cnn", kwargs={"width": 4}, checkpoint=str(tmp_path / "b.pt"))
    m = create_backbone(cfg, 16)
    x = torch.randn(2, 3, 16, 16)
    src.eval(), m.eval()
    assert torch.equal(m(x), src(x))


def test_clbench_pretrain_checkpoint_loads_as_a_benchmark_backbone(tmp_path):
    """`clbench pretrain` on a Tiny-ImageNet fixture; its checkpoint must load through
    backbone.checkpoint (timm's weights-only loader) and give the pre-trained features."""
    from fixtures_datasets import write_tinyimagenet

    from clbench.cli import main

    write_tinyimagenet(tmp_path, ["n01", "n02", "n03", "n04"], per_class=(4, 1))
    out = tmp_path / "vit.pt"
    kwargs = "{img_size: 32, patch_size: 16, depth: 2, embed_dim: 24, num_heads: 2}"
    argv = ["pretrain", "--data-root", str(tmp_path), "--class-range", "2", "4", "--epochs", "1"]
    argv += ["--batch-size", "4", "--model-kwargs", kwargs, "--out", str(out), "--threads", "1"]
    assert main(argv) == 0
    ck = torch.load(out, weights_only=True)
    assert ck["meta"]["class_range"] == [2, 4] and 0 <= ck["meta"]["test_accuracy"] <= 1
    prov = ck["meta"]["provenance"]  # where it ran, loadable weights-only
    assert "git_commit" in prov and prov["command"] and "timm" in prov["packages"]
    cfg = BackboneConfig(
        name="vit_tiny_patch16_224",
        checkpoint=str(out),
        kwargs={"img_size": 32, "patch_size": 16, "depth": 2, "embed_dim": 24, "num_heads": 2},
    )
    model = create_backbone(cfg, 32).eval()
    state = {k: v for k, v in ck["state_dict"].items() if not k.startswith("head.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
