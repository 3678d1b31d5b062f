"""Compressed-exemplar replay: byte accounting, capacity, herding on decoded images,
codec selection, pre-processing, resume, and a third-party codec end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from codec_fixtures import smooth_images, smooth_scenario

from clbench.codecs import format_spec, get_codec
from clbench.config import load_config
from clbench.errors import ClbenchError, ClbenchWarning, ConfigError
from clbench.memory import ExemplarBuffer
from clbench.runner import build_strategy, run_one
from clbench.scenarios import build_scenario
from clbench.strategies.base import Experience
from clbench.strategies.replay import herding_order

FAST = ["train.epochs=2", "backbone.kwargs.hidden=32", "train.threads=1"]


@pytest.fixture(scope="module")
def smooth():
    """A 4-class scenario of 32x32 smooth images (registered as a test dataset), where
    JPEG beats PNG on size, so the selection rule has a real trade-off to make."""
    return smooth_scenario("smooth32-test", "smooth")


@pytest.fixture(scope="module")
def digits():
    cfg = load_config("digits", FAST)
    return cfg, build_scenario(cfg)


def test_byte_accounting_is_exact_and_bounded():
    budget = 20_000
    buf = ExemplarBuffer(get_codec("jpeg:q=50"), budget_bytes=budget)
    for c in range(0, 6, 2):
        buf.add_classes({c: smooth_images(30, seed=c), c + 1: smooth_images(30, seed=c + 1)})
        stored = sum(len(p) for ps in buf.payloads.values() for p in ps)
        assert buf.payload_bytes() == stored
        assert buf.nbytes() == stored + 8 * len(buf) <= budget
        assert all(isinstance(p, bytes) for ps in buf.payloads.values() for p in ps)
        per_class = budget // len(buf.classes)
        for ps in buf.payloads.values():  # each class within its share
            assert sum(len(p) + 8 for p in ps) <= per_class


def test_capacity_ratio_matches_measured_bpp():
    images = smooth_images(200)
    budget = 100_000
    raw = ExemplarBuffer(get_codec("raw"), budget_bytes=budget)
    jpg = ExemplarBuffer(get_codec("jpeg:q=50"), budget_bytes=budget)
    raw.add_classes({0: images})
    jpg.add_classes({0: images})
    mean_bytes = np.mean([len(b) for b in jpg.payloads[0]])
    expected = (32 * 32 * 3 + 8) / (mean_bytes + 8)
    assert len(jpg) / len(raw) == pytest.approx(expected, rel=0.05)
    assert len(jpg) > 4 * len(raw)


def test_herding_ranks_the_decoded_images(digits):
    cfg, sc = digits
    c = load_config(
        "digits",
        [*FAST, "strategy_params={er-compressed: {codec: 'jpeg:q=10', selection: herding}}"],
    )
    strat = build_strategy(c, "er-compressed", sc, 0, torch.device("cpu"), False)
    images = smooth_images(12, size=8)
    payloads = strat.buffer.codec.encode(images)
    decoded = strat.buffer.decode(payloads)
    tf = sc.transforms["eval"]
    with torch.no_grad():
        feats = strat.model.features(torch.stack([tf(x) for x in decoded]))
        orig = strat.model.features(
            torch.stack([tf(torch.from_numpy(i).permute(2, 0, 1)) for i in images])
        )
    expect = herding_order(torch.nn.functional.normalize(feats, dim=1))
    assert np.array_equal(strat.rank(payloads), expect)
    assert not torch.allclose(feats, orig)  # the case distinguishes decoded from original


def _first_experience(sc) -> Experience:
    e = sc.train_stream[0]
    return Experience(index=0, classes=sc.experience_classes[0], dataset=e.dataset, avalanche=e)


@pytest.mark.parametrize("tol,expected", [(0.0, "png"), (10.0, "jpeg:q=5")])
def test_selection_rule_on_a_constructed_case(smooth, tol, expected):
    cfg, sc = smooth
    params = {
        "candidates": ["png", "jpeg:q=90", "jpeg:q=5"],
        "selection_tolerance": tol,
        "selection_holdout": 0.5,
    }
    c = load_config({**cfg.to_dict(), "strategy_params": {"er-compressed": params}})
    strat = build_strategy(c, "er-compressed", sc, 0, torch.device("cpu"), False)
    strat.model.backbone = torch.nn.Flatten()  # features = pixels: distortion is measurable
    exp = _first_experience(sc)
    strat.new_data(exp)  # draws the held-out images
    strat.select_codec(exp)
    sel = strat.report()["codec_selection"]
    rows = {r["codec"]: r for r in sel["candidates"]}
    assert sel["chosen"] == expected and strat.buffer.codec.spec == get_codec(expected).spec
    assert rows["png"]["feature_mse_rel"] == 0.0
    assert rows["jpeg:q=5"]["mean_bytes"] < rows["jpeg:q=90"]["mean_bytes"]
    assert rows["jpeg:q=5"]["feature_mse_rel"] > rows["jpeg:q=90"]["feature_mse_rel"]
    assert rows["jpeg:q=5"]["capacity"] > rows["png"]["capacity"]


def test_selection_end_to_end_and_resume(smooth, tmp_path):
    cfg, sc = smooth
    params = {"candidates": ["jpeg:q=30", "jpeg:q=90"], "budget_bytes": "20kB"}
    c = load_config({**cfg.to_dict(), "strategy_params": {"er-compressed": params}})
    full = run_one(c, sc, "er-compressed", 0, tmp_path / "a", log=lambda s: None)
    report = full["strategy_report"]["codec_selection"]
    assert report["chosen"] in params["candidates"] and len(report["candidates"]) == 2
    mem = full["costs"]["memory"]
    assert mem["buffer_bytes"] <= 20_000 and mem["codec"] == report["chosen"]
    assert mem["mean_bpp"] < 24
    out = tmp_path / "b"
    assert run_one(c, sc, "er-compressed", 0, out, stop_after=1, log=lambda s: None) is None
    resumed = run_one(c, sc, "er-compressed", 0, out, resume=True, log=lambda s: None)
    assert resumed["metrics"]["accuracy_matrix"] == full["metrics"]["accuracy_matrix"]


@pytest.mark.parametrize("name", ["er-compressed", "icarl-compressed", "der-compressed"])
@pytest.mark.parametrize("pre", ["none", "train+test"])
def test_compressed_strategies_run(smooth, tmp_path, name, pre):
    cfg, sc = smooth
    params = {"codec": "webp:q=50", "budget_bytes": 20000, "preprocess": pre}
    c = load_config({**cfg.to_dict(), "strategy_params": {name: params}})
    rec = run_one(c, sc, name, 0, tmp_path, log=lambda s: None)
    mem = rec["costs"]["memory"]
    # more exemplars than 20 kB of raw 32x32 pixels could hold
    assert 0 < mem["buffer_bytes"] <= 20000 and mem["exemplars"] > 20000 // (3072 + 8)
    assert mem["mean_bpp"] < 24


def test_bad_preprocess_is_named(digits):
    cfg, sc = digits
    c = load_config("digits", [*FAST, "strategy_params={er-compressed: {preprocess: test}}"])
    with pytest.raises(ConfigError, match="preprocess 'test'; valid: none, train, train\\+test"):
        build_strategy(c, "er-compressed", sc, 0, torch.device("cpu"), False)


PLUGIN = textwrap.dedent("""\
    import numpy as np
    from clbench.codecs import Codec

    class Quant(Codec):
        name = "quant"
        rate_knob = "bits"

        def __init__(self, bits: int = 4):
            self.bits = int(bits)

        def encode_one(self, image):
            h, w, _ = image.shape
            return bytes([h, w]) + (image >> (8 - self.bits)).astype(np.uint8).tobytes()

        def decode_one(self, data):
            h, w = data[0], data[1]
            q = np.frombuffer(data[2:], np.uint8).reshape(h, w, 3)
            return (q << (8 - self.bits)).astype(np.uint8)
    """)


def test_third_party_codec_from_entry_point_end_to_end(tmp_path):
    site = tmp_path / "site"
    (site / "quant_codec-0.1.dist-info").mkdir(parents=True)
    (site / "quant_codec.py").write_text(PLUGIN)
    (site / "quant_codec-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: quant-codec\nVersion: 0.1\n"
    )
    (site / "quant_codec-0.1.dist-info" / "entry_points.txt").write_text(
        "[clbench.codecs]\nquant = quant_codec:Quant\n"
    )
    sets = [
        *FAST,
        "strategies=[er-compressed]",
        "strategy_params={er-compressed: {codec: 'quant:bits=4', budget_bytes: 20000}}",
    ]
    args = [
        sys.executable,
        "-m",
        "clbench",
        "run",
        "digits",
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        "--no-leaderboard",
        *sum((["--set", s] for s in sets), []),
    ]
    res = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads((tmp_path / "out" / "runs" / "digits__er-compressed__s0.json").read_text())
    mem = rec["costs"]["memory"]
    assert mem["codec"] == "quant:bits=4" and mem["mean_bpp"] == pytest.approx((2 + 192) * 8 / 64)


def test_codec_view_cached_and_on_the_fly_agree(smooth):
    from clbench.strategies.compressed_replay import CodecView

    cfg, sc = smooth
    raw = sc.train_stream[0].dataset.with_transforms("raw")
    codec = get_codec("jpeg:q=40")
    cached = CodecView(raw, codec, sc.transforms["eval"], cache_bytes=10**9)
    lazy = CodecView(raw, codec, sc.transforms["eval"], cache_bytes=0)
    assert cached.x is not None and lazy.x is None
    for a, b in zip(cached.__getitems__([0, 3, 5]), lazy.__getitems__([0, 3, 5]), strict=True):
        assert torch.equal(a[0], b[0]) and a[1] == b[1]


# -- the continually learned codec (food paper) ------------------------------------------------
TINY_CODEC = {
    "arch": "bmshj2018-factorized",
    "arch_kwargs": {"N": 8, "M": 8},
    "first_steps": 4,
    "task_steps": 4,
    "batch_size": 4,
    "lr": 1e-2,
}


def tiny_continual_spec() -> str:
    opts = {k: v for k, v in TINY_CODEC.items() if k != "arch_kwargs"}
    return format_spec("continual", {**opts, **TINY_CODEC["arch_kwargs"]})


def _u8(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def test_decoder_fixed_finetuning_keeps_old_bitstreams():
    from clbench.codecs.continual import ENCODER_MODULES

    st = get_codec(tiny_continual_spec())
    st.fit(_u8(smooth_images(8, seed=1)))
    old = smooth_images(6, seed=2)
    bits = st.encode(old)
    before = st.decode(bits)
    state0 = {k: v.clone() for k, v in st.model.state_dict().items()}
    rec = st.fit(_u8(smooth_images(8, seed=3)), weights=torch.rand(8, 1, 32, 32))
    assert rec["trained"] == "encoder" and rec["cam"] and st.version == 2
    after = st.decode(bits)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    state1 = st.model.state_dict()
    moved = {k for k in state0 if not torch.equal(state0[k], state1[k])}
    assert moved and all(k.split(".")[0] in ENCODER_MODULES for k in moved)
    # and the fine-tuned encoder writes new bitstreams the fixed decoder reads
    assert st.decode(st.encode(old))[0].shape == old[0].shape


def test_grad_cam_equals_cam_for_a_pooled_linear_head():
    from clbench.strategies.compressed_replay import grad_cam

    torch.manual_seed(0)
    conv, fc = torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.Linear(5, 4)
    net = torch.nn.Sequential(
        conv, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), fc
    )
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 3])
    got = grad_cam(net, x, y, net)
    a = torch.relu(conv(x)).detach()
    cam = torch.relu(torch.einsum("nchw,nc->nhw", a, fc.weight[y].detach()))[:, None]
    cam = cam / cam.flatten(1).amax(1)[:, None, None, None]
    assert got.shape == (3, 1, 8, 8)
    torch.testing.assert_close(got, cam, atol=1e-5, rtol=1e-4)


def test_rd_loss_weight_moves_the_distortion():
    from clbench.codecs.continual import rd_loss

    x = torch.zeros(1, 3, 4, 4)
    x_hat = x.clone()
    x_hat[..., :2] = 1.0  # errors on the left half only
    out = {"x_hat": x_hat, "likelihoods": {"y": torch.ones(1, 2, 1, 1)}}
    ones, left, right = torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    left[..., :2], right[..., 2:] = 2.0, 2.0
    plain = rd_loss(out, x, 0.01)["loss"]
    assert torch.isclose(rd_loss(out, x, 0.01, ones)["loss"], plain)
    assert torch.isclose(rd_loss(out, x, 0.01, left)["loss"], 2 * plain)
    assert float(rd_loss(out, x, 0.01, right)["loss"]) == 0.0


@pytest.mark.parametrize("cam", [False, True])
def test_learned_codec_strategy_end_to_end_and_resume(smooth, tmp_path, cam):
    cfg, sc = smooth
    params = {"learned_codec": {**TINY_CODEC, "cam": cam}, "budget_bytes": "20kB"}
    c = load_config({**cfg.to_dict(), "strategy_params": {"er-compressed": params}})
    full = run_one(c, sc, "er-compressed", 0, tmp_path / "a", log=lambda s: None)
    rep = full["strategy_report"]["learned_codec"]
    assert [h["trained"] for h in rep["training"]] == ["all", "encoder"]
    assert all(h["cam"] is cam for h in rep["training"])
    mem = full["costs"]["memory"]
    assert mem["codec_params_bytes"] == rep["params_bytes"] > 0
    assert full["costs"]["memory_bytes"] == mem["buffer_bytes"] + mem["codec_params_bytes"]
    assert 0 < mem["buffer_bytes"] <= 20_000 and mem["codec"].startswith("continual:")
    out = tmp_path / "b"
    assert run_one(c, sc, "er-compressed", 0, out, stop_after=1, log=lambda s: None) is None
    resumed = run_one(c, sc, "er-compressed", 0, out, resume=True, log=lambda s: None)
    assert resumed["metrics"]["accuracy_matrix"] == full["metrics"]["accuracy_matrix"]


def test_codec_params_counted_against_the_budget(smooth, tmp_path):
    cfg, sc = smooth
    params = {"learned_codec": TINY_CODEC, "budget_bytes": 100_000, "count_codec_params": True}
    c = load_config({**cfg.to_dict(), "strategy_params": {"er-compressed": params}})
    rec = run_one(c, sc, "er-compressed", 0, tmp_path, log=lambda s: None)
    mem = rec["costs"]["memory"]
    assert mem["buffer_bytes"] + mem["codec_params_bytes"] <= 100_000
    assert mem["buffer_bytes"] > 0
    tight = {**params, "budget_bytes": 1000}
    c = load_config({**cfg.to_dict(), "strategy_params": {"er-compressed": tight}})
    with pytest.raises(ConfigError, match="learned codec's .* B exceed budget_bytes 1,000"):
        run_one(c, sc, "er-compressed", 0, tmp_path / "t", log=lambda s: None)


@pytest.mark.parametrize(
    ("learned", "match"),
    [
        ({"arch": "bmshj2018-factorized", "steps": 3}, "learned_codec key 'steps' is unknown"),
        ("bmshj2018-factorized", "learned_codec must be a mapping"),
    ],
)
def test_bad_learned_codec_is_named(digits, learned, match):
    cfg, sc = digits
    c = load_config(
        {**cfg.to_dict(), "strategy_params": {"er-compressed": {"learned_codec": learned}}}
    )
    with pytest.raises(ConfigError, match=match):
        build_strategy(c, "er-compressed", sc, 0, torch.device("cpu"), False)


# -- storage through the codec zoo ----------------------------------------------------------
def test_memory_imports_no_codec_module():
    code = "import sys, clbench.memory; print(any(m.startswith('clbench.codecs') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_continual_codec_is_a_spec_like_the_others(smooth):
    from clbench.codecs.continual import ContinualCodec

    codec = get_codec(tiny_continual_spec())
    assert isinstance(codec, ContinualCodec) and codec.arch_kwargs == {"N": 8, "M": 8}
    assert get_codec(codec.spec).spec == codec.spec  # the spec recreates it
    cfg, sc = smooth
    # a learned_codec mapping and the same codec named as a spec build the same storage
    by_map = {"learned_codec": TINY_CODEC}
    by_spec = {"codec": tiny_continual_spec()}
    specs = []
    for params in (by_map, by_spec):
        c = load_config({**cfg.to_dict(), "strategy_params": {"er-compressed": params}})
        strat = build_strategy(c, "er-compressed", sc, 3, torch.device("cpu"), False)
        assert strat.learned is strat.buffer.codec  # trained after each task
        specs.append(strat.buffer.codec.spec)
    assert specs[0] == specs[1] and "seed=3" in specs[0]  # the run's seed when none is given


def _payload_offset(blob: bytes, payload: bytes) -> int:
    at = blob.find(payload)
    assert at >= 0 and blob.find(payload, at + 1) < 0  # found once: flip exactly that copy
    return at


def test_checkpointed_buffer_bytes_carry_a_crc32(smooth, tmp_path):
    buf = ExemplarBuffer(get_codec("jpeg:q=50"), budget_bytes=20_000)
    buf.add_classes({0: smooth_images(3), 1: smooth_images(3, seed=1)})
    state = buf.state_dict()
    other = ExemplarBuffer(get_codec("jpeg:q=50"), budget_bytes=20_000)
    other.load_state_dict(state)
    assert other.payloads == buf.payloads
    state["payloads"][1][2][100] ^= 0x04  # one flipped bit in a stored JPEG
    with pytest.raises(ClbenchError, match="exemplar 2 of class 1 .* fails its CRC32 check"):
        other.load_state_dict(state)
    with pytest.raises(ClbenchError, match="holds jpeg:q=50 exemplars, but this run stores raw"):
        ExemplarBuffer(get_codec("raw"), 100).load_state_dict(buf.state_dict())

    # on disk: a bit flipped inside a checkpoint is named with the checkpoint's path
    cfg, sc = smooth
    params = {"codec": "jpeg:q=50", "budget_bytes": "20kB"}
    c = load_config({**cfg.to_dict(), "strategy_params": {"er-compressed": params}})
    assert run_one(c, sc, "er-compressed", 0, tmp_path, stop_after=1, log=lambda s: None) is None
    (ckpt,) = tmp_path.rglob("*.pt")
    blob = bytearray(ckpt.read_bytes())
    stored = torch.load(ckpt, weights_only=True)["strategy"]
    payload = _find_payload(stored)
    blob[_payload_offset(bytes(blob), payload) + len(payload) // 2] ^= 0x01
    ckpt.write_bytes(bytes(blob))
    with pytest.raises(ClbenchError, match=f"checkpoint {ckpt}: .*fails its CRC32 check"):
        run_one(c, sc, "er-compressed", 0, tmp_path, resume=True, log=lambda s: None)


def _find_payload(state) -> bytes:
    """The first replay-buffer payload in a strategy's state dict, wherever it is nested."""
    if isinstance(state, dict):
        if "crc32" in state and "payloads" in state:
            first = next(ts for ts in state["payloads"].values() if ts)
            return first[0].numpy().tobytes()
        for v in state.values():
            found = _find_payload(v)
            if found is not None:
                return found
    return None


def test_negative_mem_size_and_too_small_budgets_are_refused(digits):
    cfg, sc = digits
    cpu = torch.device("cpu")

    def build(name, params):
        c = load_config({**cfg.to_dict(), "strategy_params": {name: params}})
        return build_strategy(c, name, sc, 0, cpu, False)

    with pytest.raises(ConfigError, match="strategy er: mem_size -5 is negative"):
        build("er", {"mem_size": -5})
    # 10 digits classes x (8*8*3 pixels + 8 label bytes) = 2,000 B at least
    with pytest.raises(ConfigError, match=r"strategy er: budget_bytes 1,999 .* at least 2,000 B"):
        build("er", {"mem_size": None, "budget_bytes": 1999})
    assert len(build("er", {"mem_size": None, "budget_bytes": 2000}).buffer) == 0
    flat = len(get_codec("jpeg:q=90").encode([np.full((8, 8, 3), 128, np.uint8)])[0]) + 8
    with pytest.raises(ConfigError, match=f"as jpeg:q=90 costs {flat} B .* {10 * flat:,} B"):
        build("er-compressed", {"codec": "jpeg:q=90", "budget_bytes": 10 * flat - 1})
    cands = {"candidates": ["jpeg:q=90", "jpeg:q=10"], "budget_bytes": 100}
    with pytest.raises(ConfigError, match=r"as jpeg:q=10 \(the cheapest candidate\)"):
        build("er-compressed", cands)


def test_learned_codec_budget_is_checked_on_real_images_after_its_first_fit(smooth, tmp_path):
    cfg, sc = smooth
    params = {"learned_codec": TINY_CODEC, "budget_bytes": 40}
    c = load_config({**cfg.to_dict(), "strategy_params": {"er-compressed": params}})
    build_strategy(c, "er-compressed", sc, 0, torch.device("cpu"), False)  # random codec: no check
    with pytest.raises(ConfigError, match="smallest of 30 first-task images as the trained codec"):
        run_one(c, sc, "er-compressed", 0, tmp_path, log=lambda s: None)


def test_compressed_exemplars_larger_than_raw_are_warned(digits, tmp_path):
    cfg, sc = digits
    c = load_config({**cfg.to_dict(), "strategy_params": {"er-compressed": {"codec": "jpeg:q=50"}}})
    with pytest.warns(ClbenchWarning, match="jpeg:q=50 stores 8x8 exemplars in .* more than raw"):
        strat = build_strategy(c, "er-compressed", sc, 0, torch.device("cpu"), False)
        strat.train_experience(_first_experience(sc))
    (msg,) = strat.report()["warnings"]
    assert "more than raw pixels (24 bpp)" in msg
    logged: list[str] = []
    rec = run_one(c, sc, "er-compressed", 0, tmp_path, log=logged.append)
    (kept,) = rec["strategy_report"]["warnings"]  # once, though every experience stores JPEGs
    assert "more than raw pixels" in kept and any(kept in line for line in logged)


@pytest.mark.parametrize("name", ["der", "der-compressed"])
def test_der_logits_count_against_the_byte_budget(digits, name):
    """DER stores float32 logits beside each exemplar; the budget's fit charges them too
    (it used to fit payloads + labels only: 24,000 B stored against 20,000 here)."""
    cfg, sc = digits
    budget = 20_000
    params = {"mem_size": None, "budget_bytes": budget, "codec": "raw"}
    if name == "der-compressed":
        params["preprocess"] = "none"
    c = load_config({**cfg.to_dict(), "strategy_params": {name: params}})
    strat = build_strategy(c, name, sc, 0, torch.device("cpu"), False)
    assert strat.buffer.extra_per_exemplar == 4 * 10  # 10 digits classes, float32
    strat.train_experience(_first_experience(sc))
    buf = strat.buffer
    assert buf.extra_bytes() == len(buf) * 40  # the logits really are stored
    assert strat.memory()["buffer_bytes"] == buf.nbytes() <= budget
    per_class = budget // 2 // (8 * 8 * 3 + 8 + 40)  # 41 exemplars of 240 B in 10,000 B
    assert [len(buf.payloads[k]) for k in buf.classes] == [per_class, per_class]
    with pytest.raises(ConfigError, match=r"costs 240 B with its label and 40 B of extras"):
        build_strategy(
            load_config(
                {**cfg.to_dict(), "strategy_params": {name: {**params, "budget_bytes": 2399}}}
            ),
            name,
            sc,
            0,
            torch.device("cpu"),
            False,
        )
