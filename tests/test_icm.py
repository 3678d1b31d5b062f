"""Image coding for machines: task model, var-feat-comp, LoRA-ICM, the accuracy metric.

Tiny and self-contained: timm's ``test_efficientnet`` with random weights saved as a real
safetensors file, a Tiny-ImageNet-layout folder of 32x32 JPEGs over 20 ImageNet wnids.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from codec_fixtures import smooth_image, torch_one_thread  # noqa: F401
from PIL import Image

from clbench.errors import ClbenchError

N_CLASSES = 20
SIZE = 32


def _save_weights(model: torch.nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import timm
    from timm.data import ImageNetInfo

    root = tmp_path_factory.mktemp("icm")
    wnids = ImageNetInfo().label_names()[:N_CLASSES]
    base = root / "tiny-imagenet-200"
    base.mkdir()
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for c, w in enumerate(wnids):
        d = base / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(smooth_image(SIZE, SIZE, 100 * c + i)).save(
                d / f"{w}_{i}.JPEG", quality=95
            )
    val = base / "val" / "images"
    val.mkdir(parents=True)
    lines = []
    for i in range(8):
        Image.fromarray(smooth_image(SIZE, SIZE, 1000 + i)).save(val / f"val_{i}.JPEG", quality=95)
        lines.append(f"val_{i}.JPEG\t{wnids[i % N_CLASSES]}\t0\t0\t31\t31")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    _save_weights(timm.create_model("test_efficientnet"), root / "weights" / "te.safetensors")
    torch.manual_seed(1)
    _save_weights(timm.create_model("test_efficientnet"), root / "weights" / "te_other.safetensors")
    _save_weights(timm.create_model("test_resnet"), root / "weights" / "resnet.safetensors")
    return root


def tm_spec(weights: str = "weights/te.safetensors") -> dict:
    return {"name": "test_efficientnet", "weights": weights, "input_size": SIZE}


def train_run(root: Path, method: str, out: Path, steps: int = 3, **options) -> dict:
    from clbench.codecs.icm_train import ICMTrainConfig, train

    cfg = ICMTrainConfig(
        method=method,
        out=str(out),
        data_root=str(root),
        task_model=tm_spec(),
        steps=steps,
        batch_size=4,
        val_every=1000,
        val_images=4,
        ckpt_every=1000,
        options=options,
    )
    return train(cfg, progress=False)


@pytest.fixture(scope="module")
def fvr_ckpt(root: Path) -> Path:
    train_run(root, "feature-vr", root / "runs" / "fvr", steps=3, split="blocks.2")
    return root / "runs" / "fvr" / "last.pth"


@pytest.fixture(scope="module")
def lora_ckpts(root: Path) -> dict[str, Path]:
    out = {}
    for task, lam in (("fine", 0.1), ("coarse", 0.5)):
        d = root / "runs" / f"lora-{task}"
        train_run(root, "icm-lora", d, steps=2, split="blocks.1", task=task, lmbda=lam)
        out[task] = d / "last.pth"
    return out


def images(n: int = 3) -> np.ndarray:
    return np.stack([smooth_image(SIZE, SIZE, 50 + i) for i in range(n)])


# ---------------------------------------------------------------------------------------
# task model


def test_task_model_splits_classes_and_fingerprint(root: Path) -> None:
    from timm.data import ImageNetInfo

    from clbench.codecs.task_model import TaskModel

    wnids = ImageNetInfo().label_names()
    classes = [wnids[5], wnids[2], wnids[900]]
    tm = TaskModel({**tm_spec(), "classes": classes}, root)
    assert tm.split_points[:3] == ["conv_stem", "bn1", "blocks.0"] and "blocks.2" in tm.split_points
    x = tm.preprocess(images(2))
    assert x.shape == (2, 3, SIZE, SIZE)
    with torch.no_grad():
        full = tm.net(x)
        logits = tm(x)
        split = tm.back(tm.front(x, "blocks.1"), "blocks.1")
    assert logits.shape == (2, 3)
    assert torch.equal(logits, full[:, [5, 2, 900]])  # the head restricted in the given order
    assert torch.allclose(split, logits, atol=1e-5)
    again = TaskModel(tm_spec(), root)
    assert again.fingerprint() == tm.fingerprint()
    other = TaskModel(tm_spec("weights/te_other.safetensors"), root)
    assert other.fingerprint() != tm.fingerprint()


def test_task_model_bad_input_is_one_line(root: Path) -> None:
    from clbench.codecs.task_model import TaskModel

    tm = TaskModel(tm_spec(), root)
    with pytest.raises(
        ClbenchError,
        match=r"split point 'blocks\.9' does not exist; valid: conv_stem, bn1, blocks\.0",
    ):
        tm.split_index("blocks.9")
    with pytest.raises(
        ClbenchError,
        match=r"resnet\.safetensors do not match the timm architecture 'test_efficientnet'",
    ) as e:
        TaskModel(tm_spec("weights/resnet.safetensors"), root)
    assert "\n" not in str(e.value)
    with pytest.raises(ClbenchError, match="does not exist"):
        TaskModel(tm_spec("weights/missing.safetensors"), root)
    with pytest.raises(ClbenchError, match="'n99999999'.*not an ImageNet-1k wnid"):
        TaskModel({**tm_spec(), "classes": ["n99999999"]}, root)


def test_task_label_map_groups_sorted_wnids() -> None:
    from clbench.codecs.task_model import task_label_map

    classes = [
        f"n{i:08d}" for i in (5, 1, 9, 3, 7, 2, 8, 4, 6, 0, 11, 10, 13, 12, 15, 14, 17, 16, 19, 18)
    ]
    m = task_label_map("coarse", classes)
    assert m is not None and sorted(np.bincount(m)) == [2] * 10
    assert m[classes.index("n00000000")] == m[classes.index("n00000001")] == 0
    assert task_label_map("fine", classes) is None
    with pytest.raises(ClbenchError, match="unknown task 'medium'"):
        task_label_map("medium", classes)


# ---------------------------------------------------------------------------------------
# var-feat-comp


def test_feature_vr_lambda_sampling_is_log_uniform() -> None:
    from clbench.codecs.feature_vr import FeatureVRNet

    net = FeatureVRNet(16, 32, 8, embed_dim=16, lmbda_min=1e-4, lmbda_max=1.0)
    lam = net.sample_lmbda(20000, torch.Generator().manual_seed(0))
    logs = lam.log10()
    assert lam.min() >= 1e-4 and lam.max() <= 1.0
    assert (
        abs(float((logs < -2).float().mean()) - 0.5) < 0.02
    )  # half the mass below the log midpoint


def test_feature_vr_bitstream_reproduces_the_quantised_feature(root: Path, fvr_ckpt: Path) -> None:
    from clbench.codecs import get_codec

    codec = get_codec(f"feature-vr:checkpoint={fvr_ckpt},lmbda=0.2,data_root={root}")
    assert codec.kind == "feature" and codec.split == "blocks.2"
    x = images(3)
    data = codec.encode(x)
    assert all(isinstance(b, bytes) for b in data)
    feats = codec.decode(data)
    assert feats[0].dtype == np.float32 and feats[0].shape == codec.feature_shape
    with torch.no_grad():  # the model's own forward in eval mode, at the container's float32 λ
        f = codec.task_model.front(codec.task_model.preprocess(x), codec.split)
        ref = codec.net(f, torch.full((3,), np.float32(0.2)))["f_hat"]
    assert np.allclose(np.stack(feats), ref.numpy(), atol=1e-5)
    logits = codec.head(codec.decode_tensor(data))
    assert logits.shape == (3, N_CLASSES)
    lo = get_codec(f"feature-vr:checkpoint={fvr_ckpt},lmbda=1000.0,data_root={root}")
    hi = get_codec(f"feature-vr:checkpoint={fvr_ckpt},lmbda=0.1,data_root={root}")
    assert lo.encode(x) != hi.encode(x)  # the rate input changes the code


def test_feature_vr_bad_input(root: Path, fvr_ckpt: Path) -> None:
    from clbench.codecs import CorruptDataError, get_codec

    with pytest.raises(
        ClbenchError, match=r"lmbda=2000.0 is outside the trained range 0\.1\.\.1000"
    ):
        get_codec(f"feature-vr:checkpoint={fvr_ckpt},lmbda=2000.0,data_root={root}")
    with pytest.raises(
        ClbenchError,
        match="fingerprint .*a feature codec only works on the backbone it was trained on",
    ):
        get_codec(
            f"feature-vr:checkpoint={fvr_ckpt},lmbda=0.1,weights=weights/te_other.safetensors,data_root={root}"
        )
    with pytest.raises(ClbenchError, match="pass checkpoint=PATH"):
        get_codec("feature-vr:lmbda=0.1")
    codec = get_codec(f"feature-vr:checkpoint={fvr_ckpt},lmbda=0.1,data_root={root}")
    data = codec.encode(images(1))
    with pytest.raises(CorruptDataError, match="CRC32"):
        codec.decode([data[0][:-5] + bytes([data[0][-5] ^ 1]) + data[0][-4:]])
    jpeg = get_codec("jpeg:q=50").encode(images(1))
    with pytest.raises(CorruptDataError, match="not a clbench learned-codec stream"):
        codec.decode(jpeg)


def test_icm_training_resumes_bit_identically(root: Path, tmp_path: Path, monkeypatch) -> None:
    from clbench.codecs.feature_vr import FeatureVRMethod
    from clbench.codecs.icm_train import ICMTrainConfig, train

    def cfg(out: Path) -> ICMTrainConfig:
        return ICMTrainConfig(
            method="feature-vr",
            out=str(out),
            data_root=str(root),
            task_model=tm_spec(),
            steps=4,
            batch_size=4,
            val_every=1000,
            val_images=4,
            ckpt_every=2,
            options={"split": "blocks.1"},
        )

    train(cfg(tmp_path / "a"), progress=False)
    real, calls = FeatureVRMethod.loss, []

    def dies_at_step_3(self, *args):  # call 1 counts the FLOPs, calls 2.. are steps 1..
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(FeatureVRMethod, "loss", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "b"), progress=False)
    monkeypatch.setattr(FeatureVRMethod, "loss", real)
    assert torch.load(tmp_path / "b" / "last.pth", weights_only=True)["clbench"]["step"] == 2
    with pytest.raises(ClbenchError, match="already holds a run; pass --resume"):
        train(cfg(tmp_path / "b"), progress=False)
    train(cfg(tmp_path / "b"), resume=True, progress=False)
    a = torch.load(tmp_path / "a" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pth", weights_only=True)
    assert a["clbench"]["step"] == b["clbench"]["step"] == 4
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert a["clbench"]["trainable_params"] > 0 and a["clbench"]["train_flops_per_step"] > 0
    # resuming a finished run trains nothing and rewrites nothing (its export stays identical)
    before = (tmp_path / "a" / "last.pth").read_bytes()
    log = (tmp_path / "a" / "train_log.json").read_text()
    doc = json.loads(log)
    assert doc["complete"] is True and {"git_commit", "cpu"} <= set(doc["provenance"])
    rec = train(cfg(tmp_path / "a"), resume=True, progress=False)
    assert rec["step"] == 4 and (tmp_path / "a" / "last.pth").read_bytes() == before
    assert (tmp_path / "a" / "train_log.json").read_text() == log


# ---------------------------------------------------------------------------------------
# LoRA-ICM


def test_lora_tasks_share_one_frozen_backbone(root: Path, lora_ckpts: dict[str, Path]) -> None:
    from clbench.codecs import get_codec
    from clbench.codecs.task_model import TaskModel

    fine = get_codec(f"icm-lora:checkpoint={lora_ckpts['fine']},data_root={root}")
    codes_before = fine.encode(images(2))
    coarse = get_codec(f"icm-lora:checkpoint={lora_ckpts['coarse']},data_root={root}")
    assert (
        fine.shared is coarse.shared and fine.adapter != coarse.adapter
    )  # one backbone, two adapters
    assert fine.encode(images(2)) == codes_before  # loading a second task left the first intact
    plain = TaskModel({**tm_spec(), "classes": fine.task_model.spec.classes}, root)
    assert fine.backbone_fingerprint == plain.fingerprint()  # base weights untouched
    x = images(2)
    assert fine.head(fine.decode_tensor(fine.encode(x))).shape == (2, N_CLASSES)
    assert coarse.head(coarse.decode_tensor(coarse.encode(x))).shape == (2, 10)
    assert coarse.task_labels(np.arange(N_CLASSES)).max() == 9
    meta = torch.load(lora_ckpts["coarse"], weights_only=True)["clbench"]
    lora_params = sum(
        v.numel()
        for k, v in torch.load(lora_ckpts["coarse"], weights_only=True)["state_dict"].items()
        if k.startswith("lora.")
    )
    assert 0 < lora_params < meta["trainable_params"] < 100_000
    assert meta["cpu_s"] > 0 and meta["train_flops_per_step"] > 0


def test_lora_targets_skip_depthwise_and_dynamic_padding(root: Path) -> None:
    from clbench.codecs.icm_lora import lora_targets
    from clbench.codecs.task_model import TaskModel

    tm = TaskModel(tm_spec(), root)
    names = lora_targets(tm, "blocks.1")
    mods = dict(tm.net.named_modules())
    assert names and all(type(mods[n]) in (torch.nn.Conv2d, torch.nn.Linear) for n in names)
    assert all(getattr(mods[n], "groups", 1) == 1 for n in names)
    assert not any(n.startswith("blocks.2") for n in names)


# ---------------------------------------------------------------------------------------
# the machine-vision evaluation


def _bench(tmp_path: Path, curves: dict, metric: str | None = None) -> Path:
    import yaml

    metric = (
        metric
        or f"accuracy:name=test_efficientnet,weights=weights/te.safetensors,input_size={SIZE}"
    )
    doc = {
        "name": "icm-test",
        "source": "dataset",
        "images": "tinyimagenet",
        "metrics": [metric],
        "bd": ["top1"],
        "anchor": "JPEG",
        "curves": curves,
        "complexity": {"enabled": False},
    }
    p = tmp_path / "bench.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_machine_eval_images_and_features(
    root: Path, fvr_ckpt: Path, tmp_path: Path, monkeypatch
) -> None:
    import json

    from clbench.codecs.evaluation import load_benchmark, run

    monkeypatch.setenv("CLBENCH_DATA_ROOT", str(root))
    bench = load_benchmark(
        _bench(
            tmp_path,
            {"JPEG": "jpeg:q=[10,90]", "FVR": f"feature-vr:checkpoint={fvr_ckpt},lmbda=[0.1,1000]"},
        )
    )
    res = run(bench, tmp_path / "out", data_root=str(root), progress=False)
    pts = {c["label"]: c["points"] for c in res["curves"]}
    for p in pts["JPEG"] + pts["FVR"]:
        assert 0 <= p["top1"] <= p["top5"] <= 100 and p["bpp"] > 0 and p["enc_s"] > 0
    # bpp is over the ORIGINAL 32x32 pixels: bytes * 8 / 1024
    rows = (tmp_path / "out" / "per_image.csv").read_text().splitlines()
    assert "top1" in rows[0] and len(rows) == 1 + 4 * 8
    assert set(res["reference"]) == {"top1", "top5"}
    assert any(r["curve"] == "FVR" and r["anchor"] == "JPEG" for r in res["bd_rate"])
    assert json.loads((tmp_path / "out" / "results.json").read_text())["metrics"] == [
        "top1",
        "top5",
    ]
    assert (tmp_path / "out" / "rd.png").is_file()


def test_machine_eval_refuses_a_feature_codec_of_another_backbone(
    root: Path, fvr_ckpt: Path, tmp_path: Path
) -> None:
    from clbench.codecs.evaluation import load_benchmark, run

    metric = f"accuracy:name=test_efficientnet,weights=weights/te_other.safetensors,input_size={SIZE},data_root={root}"
    bench = load_benchmark(
        _bench(
            tmp_path,
            {
                "JPEG": "jpeg:q=[50]",
                "FVR": f"feature-vr:checkpoint={fvr_ckpt},lmbda=[0.1],data_root={root}",
            },
            metric,
        )
    )
    with pytest.raises(ClbenchError, match="use one task model for all curves"):
        run(bench, tmp_path / "out", data_root=str(root), progress=False)
    assert not (tmp_path / "out").exists()


def test_bd_accuracy_of_a_shifted_curve() -> None:
    from clbench.codecs.evaluation.bd import bd
    from clbench.codecs.evaluation.config import Curve
    from clbench.codecs.evaluation.machine import Accuracy

    col = Accuracy.columns[0]
    bpp = [0.1, 0.2, 0.4, 0.8, 1.6]
    acc = [20.0, 30.0, 38.0, 44.0, 48.0]
    a = Curve("a", [], points=[{"bpp": b, "top1": q} for b, q in zip(bpp, acc, strict=True)])
    b = Curve("b", [], points=[{"bpp": b, "top1": q + 5} for b, q in zip(bpp, acc, strict=True)])
    got = bd(a, b, col)
    assert math.isclose(got["bd_top1_pts"], 5.0, abs_tol=1e-6)


def test_icm_train_cli_bad_split_is_one_line(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "clbench.codecs.icm_train",
        "feature-vr",
        "--out",
        str(out),
        "--data-root",
        str(root),
        "--task-model",
        '{"name": "test_efficientnet", "weights": "weights/te.safetensors", "input_size": 32}',
        "--split",
        "blocks.9",
        "--steps",
        "1",
        "--no-progress",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.startswith("clbench: error:")]
    assert len(err) == 1 and "split point 'blocks.9' does not exist; valid:" in err[0]
    assert "Traceback" not in r.stderr and not out.exists()


def test_machine_eval_coarse_task_pools_and_uses_task_heads(
    root: Path, lora_ckpts: dict[str, Path], tmp_path: Path
) -> None:
    from clbench.codecs.evaluation import load_benchmark, run

    metric = f"accuracy:name=test_efficientnet,weights=weights/te.safetensors,input_size={SIZE},task=coarse,data_root={root}"
    curves = {
        "JPEG": "jpeg:q=[30,90]",
        "coarse": [f"icm-lora:checkpoint={lora_ckpts['coarse']},data_root={root}"],
        "fine-pooled": [f"icm-lora:checkpoint={lora_ckpts['fine']},data_root={root}"],
    }
    res = run(
        load_benchmark(_bench(tmp_path, curves, metric)),
        tmp_path / "out",
        data_root=str(root),
        progress=False,
    )
    pts = {c["label"]: c["points"] for c in res["curves"]}
    assert all(0 <= p["top1"] <= p["top5"] <= 100 for c in pts.values() for p in c)
    assert res["reference"]["top5"] >= res["reference"]["top1"]
    # a codec trained for the coarse task cannot answer the fine one
    fine = metric.replace("task=coarse", "task=fine")
    with pytest.raises(ClbenchError, match="predicts task 'coarse'; evaluate it with task=coarse"):
        run(
            load_benchmark(
                _bench(tmp_path, {"JPEG": "jpeg:q=[30]", "coarse": curves["coarse"]}, fine)
            ),
            tmp_path / "o2",
            data_root=str(root),
            progress=False,
        )
