"""Compressed-exemplar replay with a feature codec (ICM): the buffer stores var-feat-comp
bitstreams of a frozen task model's split feature; replay feeds the decoded features to
the task model's layers after the split.

Tiny and self-contained: timm's ``test_efficientnet`` with random weights saved as a real
safetensors file, a feature-vr checkpoint written in the ICM trainer's format (untrained
autoencoder, calibrated on real features), a 4-class scenario of 32x32 images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from codec_fixtures import smooth_images, smooth_scenario

from clbench.codecs import get_codec
from clbench.config import load_config
from clbench.errors import ConfigError
from clbench.runner import build_strategy, run_one
from clbench.strategies.base import Experience

SIZE = 32
SPLIT = "blocks.1"  # (24, 8, 8) at 32 px


@pytest.fixture(scope="module")
def codec_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A feature-vr checkpoint on test_efficientnet, as `clbench codec icm-train` writes it."""
    import timm
    from safetensors.torch import save_file

    from clbench.codecs.feature_vr import FeatureVRNet
    from clbench.codecs.task_model import ICM_CHECKPOINT_FORMAT, TaskModel

    root = tmp_path_factory.mktemp("feature-replay")
    torch.manual_seed(0)
    weights = root / "te.safetensors"
    net = timm.create_model("test_efficientnet")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    spec = {"name": "test_efficientnet", "weights": str(weights), "input_size": SIZE}
    tm = TaskModel(spec)
    arch = dict(
        channels=24, hidden=16, latent=8, embed_dim=16, depth=1, lmbda_min=0.1, lmbda_max=100.0
    )
    fvr = FeatureVRNet(**arch)
    with torch.no_grad():
        fvr.calibrate(tm.front(tm.preprocess(np.stack(smooth_images(16, seed=9))), SPLIT))
    fvr.entropy_bottleneck.update(force=True)
    meta = {
        "format": ICM_CHECKPOINT_FORMAT,
        "method": "feature-vr",
        "task_model": {**tm.spec.to_dict(), "weights_resolved": str(weights)},
        "fingerprint": tm.fingerprint(),
        "split": SPLIT,
        "arch": arch,
    }
    ckpt = root / "fvr.pth"
    torch.save({"clbench": meta, "state_dict": fvr.state_dict()}, ckpt)
    return f"feature-vr:checkpoint={ckpt},lmbda=1"


@pytest.fixture(scope="module")
def scenario():
    return smooth_scenario("smooth32-features-test", "smooth-features", batch_size=8)


def _config(cfg, name: str, params: dict):
    return load_config({**cfg.to_dict(), "strategy_params": {name: params}})


def _exp(sc, i: int) -> Experience:
    e = sc.train_stream[i]
    return Experience(index=i, classes=sc.experience_classes[i], dataset=e.dataset, avalanche=e)


def test_feature_replay_trains_the_layers_after_the_split(scenario, codec_spec):
    cfg, sc = scenario
    budget = 1500
    params = {"codec": codec_spec, "budget_bytes": budget}
    strat = build_strategy(_config(cfg, "er-compressed", params), "er-compressed", sc, 0,
                           torch.device("cpu"), False)  # fmt: skip
    codec = strat.buffer.codec
    assert codec.kind == "feature" and strat.is_feature
    back = strat.model.backbone
    assert back.stages == ["blocks.2", "blocks.3", "blocks.4", "conv_head", "bn2"]
    # the front is not in the trained model: its weights stay in the frozen codec
    assert not any(k.startswith(("net.conv_stem", "net.blocks.0.")) for k in back.state_dict())
    fingerprint = codec.backbone_fingerprint
    before = {k: v.clone() for k, v in back.state_dict().items()}
    for i in range(2):
        strat.train_experience(_exp(sc, i))
        buf = strat.buffer
        # the buffer counts the codec's bytes as for any codec, within the budget
        assert buf.payload_bytes() == sum(len(p) for ps in buf.payloads.values() for p in ps)
        assert 0 < buf.nbytes() <= budget
    # replayed exemplars are decoded features, the input of the layers after the split
    x, y = next(iter(strat.memory_loader()))[:2]
    assert x.dtype == torch.float32 and tuple(x.shape[1:]) == codec.feature_shape
    payloads, _ = buf.ordered()
    assert torch.equal(buf.decode(payloads[:3]), codec.decode_tensor(payloads[:3]))
    assert strat.model(x, strat.n_seen).shape == (len(x), 4)
    # new data and test data enter as features too (train+test: decoded after a round trip)
    view = strat.eval_view(sc.test_stream[0].dataset)
    images = [_raw(sc, i) for i in range(len(view))]
    assert torch.equal(view[0][0], codec.decode_tensor(codec.encode(images))[0])
    changed = [k for k, v in back.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("net.blocks.2.") for k in changed)  # the back stages trained
    assert codec.backbone_fingerprint == fingerprint == codec.task_model.fingerprint()
    mem = strat.memory()
    assert mem["codec_params_bytes"] > 0 and mem["exemplars"] == len(buf)
    # one 32x32 raw exemplar costs 3,080 B: the budget holds none raw, many as features
    assert mem["exemplars"] >= 8 and mem["mean_bpp"] < 24


def _raw(sc, i: int) -> np.ndarray:
    return sc.test_stream[0].dataset.with_transforms("raw")[i][0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("name", ["er-compressed", "der-compressed", "icarl-compressed"])
def test_feature_replay_end_to_end_and_resume(scenario, codec_spec, tmp_path, name):
    cfg, sc = scenario
    budget = 2000
    c = _config(cfg, name, {"codec": codec_spec, "budget_bytes": budget})
    full = run_one(c, sc, name, 0, tmp_path / "a", log=lambda s: None)
    mem = full["costs"]["memory"]
    assert 0 < mem["buffer_bytes"] <= budget and mem["codec"] == get_codec(codec_spec).spec
    assert full["strategy_report"]["feature_replay"]["split"] == SPLIT
    assert full["strategy_report"]["learner"].endswith(f"after {SPLIT}")
    acc = full["metrics"]["accuracy_matrix"]
    assert len(acc) == 2
    out = tmp_path / "b"
    assert run_one(c, sc, name, 0, out, stop_after=1, log=lambda s: None) is None
    resumed = run_one(c, sc, name, 0, out, resume=True, log=lambda s: None)
    assert resumed["metrics"]["accuracy_matrix"] == acc
    assert resumed["costs"]["memory"]["buffer_bytes"] == mem["buffer_bytes"]


def test_uncompressed_front_without_preprocessing(scenario, codec_spec):
    cfg, sc = scenario
    params = {"codec": codec_spec, "budget_bytes": 2000, "preprocess": "none"}
    strat = build_strategy(_config(cfg, "er-compressed", params), "er-compressed", sc, 0,
                           torch.device("cpu"), False)  # fmt: skip
    codec = strat.buffer.codec
    x = strat.eval_view(sc.test_stream[0].dataset)[0][0]
    tm = codec.task_model
    with torch.no_grad():
        ref = tm.front(tm.preprocess(_raw(sc, 0)[None]), SPLIT)[0]
    # The view runs the front on a batch, the reference on one image: on AVX2 CPUs oneDNN
    # picks batch-dependent conv kernels, so the two agree to rounding, not bit for bit.
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-6)


def test_feature_codec_with_candidates_is_refused(scenario, codec_spec):
    cfg, sc = scenario
    params = {"candidates": [codec_spec, "jpeg:q=50"], "budget_bytes": 2000}
    with pytest.raises(ConfigError, match="is a feature codec; give it as codec:"):
        build_strategy(_config(cfg, "er-compressed", params), "er-compressed", sc, 0,
                       torch.device("cpu"), False)  # fmt: skip


def _front_spec(codec_spec: str, extra: str = "") -> str:
    ckpt = codec_spec.split("checkpoint=")[1].split(",")[0]
    return f"split-front:checkpoint={ckpt}{extra}"


def test_split_front_is_the_same_learner_fed_pixels(scenario, codec_spec):
    """The control row: raw pixels in the buffer, the frozen front at decode, the same
    trained layers after the split as feature replay."""
    cfg, sc = scenario
    spec = _front_spec(codec_spec)
    front = get_codec(spec)
    fvr = get_codec(codec_spec)
    assert front.kind == "feature" and front.split == SPLIT and front.lossless
    assert front.backbone_fingerprint == fvr.backbone_fingerprint
    assert front.feature_shape == fvr.feature_shape and get_codec(front.spec).spec == front.spec
    images = [_raw(sc, i) for i in range(3)]
    data = front.encode(images)
    assert [front.charged_bytes(b) for b in data] == [SIZE * SIZE * 3] * 3  # raw's accounting
    tm = front.task_model
    with torch.no_grad():
        ref = tm.front(tm.preprocess(np.stack(images)), SPLIT)
    assert torch.equal(front.decode_tensor(data), ref)
    # JPEG pixels: lossy, fewer bytes, still the front's feature of the decoded image
    jpeg = get_codec(_front_spec(codec_spec, ",image=jpeg,q=50"))
    assert not jpeg.lossless and jpeg.rate == 50 and "image=jpeg" in jpeg.spec
    assert len(jpeg.encode(images)[0]) < SIZE * SIZE * 3
    # in replay: the model is the same SplitBack as with feature-vr; budget = 4 raw
    # exemplars (one per class, as the buffer's floor demands; 8 B of label each)
    budget = 4 * (SIZE * SIZE * 3 + 8) + 100
    params = {"codec": spec, "budget_bytes": budget}
    strat = build_strategy(_config(cfg, "er-compressed", params), "er-compressed", sc, 0,
                           torch.device("cpu"), False)  # fmt: skip
    assert strat.is_feature
    assert strat.model.backbone.stages == ["blocks.2", "blocks.3", "blocks.4", "conv_head", "bn2"]
    strat.train_experience(_exp(sc, 0))
    assert len(strat.buffer) == 4 and strat.buffer.nbytes() <= budget
    x = next(iter(strat.memory_loader()))[0]
    assert tuple(x.shape[1:]) == front.feature_shape


def test_split_front_refuses_a_feature_codec_as_its_image_codec(codec_spec):
    from clbench.errors import ClbenchError

    with pytest.raises(ClbenchError, match="image=split-front is a feature codec"):
        get_codec(_front_spec(codec_spec, ",image=split-front"))
    with pytest.raises(ClbenchError, match="split-front: pass checkpoint="):
        get_codec("split-front")
