"""Learned image compression II (issue 15): balanced R-D training (Solutions 1 and 2),
STDET + SMA, and the variable-rate BG-VAE with its teacher. Tiny models, 32-64 pixel
images written as PNGs, a few steps each; nothing reads shared data, nothing is timed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from codec_fixtures import (  # noqa: E402, F401
    forward_and_coded,
    smooth_image,
    torch_one_thread,
    write_pngs,
)

from clbench.codecs import get_codec  # noqa: E402
from clbench.codecs.balanced_rd import LogLossWeights, qp_weights  # noqa: E402
from clbench.codecs.bgvae import decode_progressive, segment_bytes  # noqa: E402
from clbench.codecs.cli import main  # noqa: E402
from clbench.codecs.stdet_sma import cluster_modes, sample_indices  # noqa: E402
from clbench.codecs.train import TrainConfig, _run, prepare, train  # noqa: E402
from clbench.codecs.train_methods import build_method  # noqa: E402
from clbench.errors import ClbenchError  # noqa: E402

EFF = "eff-lic:pretrained=false,transform=conv,context=hyperprior,N=8,M=16"
BG = "bgvae:pretrained=false,width=16,zdim=4,top=4,embed=8,latents=1/1/1"


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lic2")
    write_pngs(root / "imgs", [(64, 64)] * 6)
    return root / "imgs"


def config(
    pngs: Path, out: Path, codec: str, method: str, opts: dict | None = None, **kw
) -> TrainConfig:
    base = dict(
        codec=codec, train_dir=str(pngs), out=str(out), lmbda=0.01, patch=64, batch_size=2,
        steps=4, val_every=1000, ckpt_every=1000, method=method, method_opts=opts or {},
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


# -- balanced R-D ----------------------------------------------------------------------------


def test_solution1_objective_gradient_is_the_normalised_weighting():
    """d/dℓ_i of Σ z_i log(ℓ_i - m_i + ε)/c is z_i / (c·(ℓ_i - m_i + ε)), summing to one."""
    w = LogLossWeights(2, w_lr=0.1, gamma=0.0, min_losses=[0.5, 0.0])
    with torch.no_grad():
        w.w.copy_(torch.tensor([0.3, -0.2]))
    losses = torch.tensor([2.0, 0.4], requires_grad=True)
    w.objective(losses).backward()
    z = np.exp([0.3, -0.2]) / np.exp([0.3, -0.2]).sum()
    d = np.array([2.0 - 0.5, 0.4]) + 1e-8
    expect = (z / d) / (z / d).sum()
    np.testing.assert_allclose(losses.grad.numpy(), expect, rtol=1e-6)


def test_solution1_default_offsets_keep_lambda_in_the_weighting():
    """With m = 0 the gradient on the unweighted distortion D' (D = λ·D') is λ-free; the
    default m = -1 (log(1 + ℓ)) keeps λ: a larger λ weighs distortion more."""

    def weight_on_mse(lmbda: float, m: list[float]) -> float:
        """d objective / d MSE relative to d objective / d bpp: the effective trade-off."""
        w = LogLossWeights(2, w_lr=0.1, gamma=0.0, min_losses=m)
        mse, bpp = torch.tensor(0.002, requires_grad=True), torch.tensor(0.5, requires_grad=True)
        w.objective(torch.stack([lmbda * 255**2 * mse, bpp])).backward()
        return float(mse.grad / bpp.grad)

    assert weight_on_mse(0.0035, [0, 0]) == pytest.approx(weight_on_mse(0.025, [0, 0]))
    assert build_method("balanced-rd", {}).weights.m.tolist() == [-1.0, -1.0]
    assert weight_on_mse(0.025, [-1, -1]) > 1.5 * weight_on_mse(0.0035, [-1, -1])


def test_solution1_weight_update_matches_a_hand_computation():
    """Two scalar losses, w = 0: δ = log ℓ - log ℓ', grad_w = (diag z - z zᵀ) δ + γ w."""
    before, after = torch.tensor([2.0, 0.5]), torch.tensor([1.5, 0.45])
    delta = np.log([2.0, 0.5]) - np.log([1.5, 0.45])
    lr, gamma = 0.1, 0.01

    def grad(w: np.ndarray) -> np.ndarray:
        z = np.exp(w) / np.exp(w).sum()
        return (np.diag(z) - np.outer(z, z)) @ delta + gamma * w

    sgd = LogLossWeights(2, w_lr=lr, gamma=gamma, optimizer="sgd")
    w = np.zeros(2)
    for _ in range(2):  # the second update sees the decay of a non-zero w
        sgd.update(before, after)
        w = w - lr * grad(w)
        np.testing.assert_allclose(sgd.w.detach().numpy(), w, rtol=1e-5, atol=1e-8)
    assert w[0] < 0 < w[1], "the objective that improved more (distortion) loses weight"

    adam = LogLossWeights(2, w_lr=lr, gamma=gamma, optimizer="adam")
    adam.update(before, after)
    g = grad(np.zeros(2))  # Adam's first step: lr·m̂/(√v̂ + eps) = lr·g/(|g| + eps)
    np.testing.assert_allclose(adam.w.detach().numpy(), -lr * g / (np.abs(g) + 1e-8), rtol=1e-5)


def test_solution2_closed_form_solves_the_qp_and_balances_both_objectives():
    rng = np.random.default_rng(0)
    g_d, g_r = rng.normal(size=50), rng.normal(size=50) + 0.3
    q = np.array([[g_d @ g_d, g_d @ g_r], [g_d @ g_r, g_r @ g_r]])
    z_d, z_r = qp_weights(q[0, 0], q[0, 1], q[1, 1])
    ones = np.ones(2)
    sol = np.linalg.solve(q, ones) / (ones @ np.linalg.solve(q, ones))
    np.testing.assert_allclose([z_d, z_r], sol, rtol=1e-9)
    d = z_d * g_d + z_r * g_r
    assert d @ g_d == pytest.approx(d @ g_r) == pytest.approx(d @ d)  # equal first-order decrease
    assert qp_weights(1.0, 1.0, 1.0) == (0.5, 0.5)  # parallel gradients: defined
    assert qp_weights(1.0, -0.5, 100.0, clamp=True)[0] <= 1.0


def test_balanced_methods_train_log_their_weights_and_resume_bit_identically(pngs, tmp_path):
    torch.manual_seed(0)
    whole = train(config(pngs, tmp_path / "a", EFF, "balanced-rd", steps=4), progress=False)
    assert 0 < whole["z_distortion"] < 1 and whole["z_distortion"] + whole[
        "z_rate"
    ] == pytest.approx(1)
    train(config(pngs, tmp_path / "b", EFF, "balanced-rd", steps=2, ckpt_every=2), progress=False)
    resumed = train(
        config(pngs, tmp_path / "b", EFF, "balanced-rd", steps=4), resume=True, progress=False
    )
    assert (
        resumed["z_distortion"] == whole["z_distortion"]
        and resumed["train_loss"] == whole["train_loss"]
    )
    a = torch.load(tmp_path / "a" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pth", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["method"]["weights"]["w"], b["method"]["weights"]["w"])
    # the records keep the options the method ran with, YAML defaults included
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert log["config"]["method_opts"]["min_losses"] == [-1, -1]
    assert a["clbench"]["config"]["method_opts"]["gamma"] == 0.001
    qp = train(
        config(pngs, tmp_path / "qp", EFF, "balanced-rd-qp", {"cautious": True}), progress=False
    )
    assert math.isfinite(qp["train_loss"]) and qp["z_distortion"] + qp["z_rate"] == pytest.approx(1)


def test_nonsense_method_options_are_one_line_errors_before_training(pngs, tmp_path, capsys):
    out = tmp_path / "never"
    base = [
        "train",
        EFF,
        "--train",
        str(pngs),
        "--out",
        str(out),
        "--lambda",
        "0.01",
        "--steps",
        "2",
        "--patch",
        "64",
    ]
    cases = [
        (["--method", "balanced-rd", "--method-opt", "gamma=-1"], "gamma=-1 must be a number >= 0"),
        (["--method", "stdet-sma", "--method-opt", "modes=0"], "modes=0 must be an integer >= 1"),
        (
            ["--method", "stdet-sma", "--method-opt", "warmup=5"],
            "warmup=5 must be an integer >= 3 x record_every",
        ),
        (
            ["--method", "balanced-rd-qp", "--method-opt", "min_losses=[1]"],
            "min_losses=[1] must be two finite numbers",
        ),
        (
            ["--method", "balanced-rd", "--method-opt", "w_optimizer=adamm"],
            "unknown optimizer 'adamm'",
        ),
        (["--method", "bgvae"], "--method bgvae trains bgvae models"),
    ]
    for extra, msg in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and msg in err, (extra, err)
    assert not out.exists(), "nothing is written before the checks pass"


# -- STDET + SMA ------------------------------------------------------------------------------


def test_sampling_and_clustering_follow_cmd():
    idx = sample_indices([1000, 10, 50], 40, seed=0)
    # half evenly (6 per tensor), half by size (18 more for the large one), topped up to 40
    assert len(set(idx.tolist())) == 40
    assert [
        int(((idx >= lo) & (idx < hi)).sum()) for lo, hi in ((0, 1000), (1000, 1010), (1010, 1060))
    ] == [28, 6, 6]
    t = np.linspace(0, 1, 20)
    a, b = np.exp(-3 * t), np.sin(6 * t)
    traj = np.stack([2 * a + 1, -a, 0.5 * a, 3 * b, -b + 2, b], 1)  # two clear modes
    labels, refs = cluster_modes(traj, 2)
    assert len(set(labels[:3])) == 1 and len(set(labels[3:])) == 1 and labels[0] != labels[3]
    assert sorted(labels[refs].tolist()) == [0, 1]  # one reference per mode, inside it
    labels, refs = cluster_modes(traj, 4)  # more modes only split them, never mix them
    assert len(refs) <= 4 and not set(labels[:3]) & set(labels[3:])


@pytest.fixture(scope="module")
def stdet_run(pngs, tmp_path_factory):
    """20 steps of stdet-sma on a tiny model: modes after 6, fits after 12, embedding every 2."""
    opts = dict(warmup=6, record_every=2, fit_steps=6, embed_every=2, embed_rate=0.5, max_embed=0.9,
                min_corr=0.0, samples=60, modes=3, sma_start=12, sma_every=2)  # fmt: skip
    cfg = config(pngs, tmp_path_factory.mktemp("stdet") / "run", EFF, "stdet-sma", opts, steps=20)
    torch.manual_seed(0)
    p = prepare(cfg)
    method = p.method
    sampled = []
    original = method._sample_sma

    def spy() -> None:
        sampled.append(method.flat().double())
        original()

    method._sample_sma = spy
    rec = _run(p, progress=False)
    return p, method, sampled, rec


def test_embedded_parameters_follow_their_affine_map_exactly(stdet_run):
    p, method, _, rec = stdet_run
    s = method.s
    emb = s["embedded"]
    assert 0 < int(emb.sum()) <= 0.9 * method.P and not emb[s["refs"]].any()
    assert rec["trainable_params"] == method.P - int(emb.sum())
    refs = method._gather(s["refs"])
    w = method.flat()
    mode = s["mode"].long()
    expect = s["a"][emb] * refs[mode[emb]] + s["b"][emb]
    assert torch.equal(w[emb], expect)  # the map, bit for bit, after the last step
    for i, prm in enumerate(method.params):
        lo, hi = method.offsets[i], method.offsets[i + 1]
        assert prm.requires_grad == (not bool(emb[lo:hi].all()))


def test_trainable_parameter_count_is_logged_and_falls(stdet_run):
    import json

    p, method, _, _ = stdet_run
    log = json.loads((Path(p.cfg.out) / "train_log.json").read_text())["history"]
    assert log[-1]["trainable_params"] < method.P


def test_sma_weights_are_the_running_mean_of_the_sampled_weights(stdet_run):
    p, method, sampled, rec = stdet_run
    assert len(sampled) == rec["sma_samples"] == 5  # steps 12, 14, ..., 20
    mean = torch.stack(sampled).mean(0)
    torch.testing.assert_close(method.s["sma"], mean, rtol=1e-12, atol=1e-12)
    state = method.eval_state(method.run)
    for i, name in enumerate(method.names):
        lo, hi = method.offsets[i], method.offsets[i + 1]
        torch.testing.assert_close(
            state[name].reshape(-1).double(), mean[lo:hi], rtol=1e-6, atol=1e-7
        )
    exported = torch.load(Path(p.cfg.out) / "last.pth", weights_only=True)["state_dict"]
    name = method.names[0]
    assert torch.equal(exported[name], state[name])  # what is exported is the SMA weights


# -- BG-VAE --------------------------------------------------------------------------------


def test_bgvae_bitstream_round_trip_is_exact_at_several_rates_and_progressive():
    torch.manual_seed(0)
    codec = get_codec(BG + ",lmbda=0.004")
    m = codec.model
    with torch.no_grad():  # layer scales off their 1e-6 init, so that λ changes the output,
        for name, prm in m.named_parameters():  # and posteriors off their priors (symbols != 0)
            if name.endswith("gamma"):
                prm.fill_(0.5)
            if name.endswith("post_out.bias"):
                prm.fill_(3.0)
    img = smooth_image(64, 64, 3)
    ref, enc, dec = forward_and_coded(m, img)
    assert torch.equal(ref, dec) and len(enc["strings"]) == m.num_latents == 4
    data = codec.encode([img, smooth_image(40, 72, 1)])  # padded to 64x128
    back = codec.decode(data)
    np.testing.assert_array_equal(back[0], (ref[0] * 255).round().byte().permute(1, 2, 0).numpy())
    assert back[1].shape == (40, 72, 3)
    # items coded at another λ by another codec instance decode with this one: λ is in the bytes
    other = get_codec(BG + ",lmbda=0.05")
    other.model.load_state_dict(m.state_dict())
    other.model.update(force=True)
    mixed = codec.decode([other.encode([img])[0], data[0]])
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        ref_05 = m(x, lmbda=0.05)["x_hat"].clamp(0, 1)
    np.testing.assert_array_equal(
        mixed[0], (ref_05[0] * 255).round().byte().permute(1, 2, 0).numpy()
    )
    np.testing.assert_array_equal(mixed[1], back[0])
    assert not np.array_equal(mixed[0], mixed[1])
    # progressive: all segments = plain decoding; fewer segments still decode
    assert np.array_equal(decode_progressive(codec, data[:1], m.num_latents)[0], back[0])
    partial = decode_progressive(codec, data[:1], 1)[0]
    assert partial.shape == back[0].shape and not np.array_equal(partial, back[0])
    assert len(segment_bytes(codec, data[0])) == 4


def test_variable_rate_lambda_outside_the_trained_range_is_refused(pngs, tmp_path, capsys):
    with pytest.raises(
        ClbenchError, match=r"lmbda=0.5 is outside the trained range \[0.0018, 0.0932\]"
    ):
        get_codec(BG + ",lmbda=0.5")
    assert get_codec(BG + ",lmbda=0.0932").lmbda == pytest.approx(0.0932)
    out = tmp_path / "never"
    args = [
        "train",
        BG,
        "--train",
        str(pngs),
        "--out",
        str(out),
        "--steps",
        "2",
        "--patch",
        "64",
        "--method",
        "bgvae",
    ]
    assert main([*args, "--lambda", "0.3"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "\n" not in err
        and "--lambda 0.3 (the validation lambda) is outside the model's range" in err
    )
    assert (
        main([*args, "--lambda", "0.01", "--method-opt", f"teacher={tmp_path / 'nope.pth'}"]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ClbenchError, match="lmin=0.1, lmax=0.01 must satisfy 0 < lmin <= lmax"):
        get_codec(BG + ",lmin=0.1,lmax=0.01")
    with pytest.raises(ClbenchError, match="latents='1/1' is invalid"):
        get_codec(BG.replace("latents=1/1/1", "latents=1/1"))


def test_bgvae_teacher_guides_a_student_through_codec_train(pngs, tmp_path, capsys):
    base = ["--train", str(pngs), "--val", str(pngs), "--lambda", "0.01", "--steps", "3", "--patch", "64",
            "--batch-size", "2", "--val-images", "2", "--method", "bgvae", "--no-progress"]  # fmt: skip
    teacher = BG.replace("width=16", "width=24") + ",bound=true"
    assert main(["train", teacher, "--out", str(tmp_path / "t"), *base]) == 0
    t_ckpt = tmp_path / "t" / "best.pth"
    t_codec = get_codec(f"bgvae:checkpoint={t_ckpt}")
    with pytest.raises(ClbenchError, match="bound=true model estimates the information R-D bound"):
        t_codec.encode([smooth_image(64, 64)])
    from clbench.codecs.bgvae import bound_point

    pt = bound_point(t_codec.model, [smooth_image(64, 64)], 0.01)
    assert pt["bpp"] > 0 and math.isfinite(pt["psnr"])
    guided = ["--method-opt", f"teacher={t_ckpt}", "--method-opt", "w_feat=2.0"]
    assert main(["train", BG, "--out", str(tmp_path / "s"), *base, *guided]) == 0
    capsys.readouterr()
    import json

    last = json.loads((tmp_path / "s" / "train_log.json").read_text())["history"][-1]
    assert last["train_feat_loss"] >= 0 and last["train_rec_loss"] > 0
    student = get_codec(f"bgvae:checkpoint={tmp_path / 's' / 'best.pth'},lmbda=0.02")
    img = smooth_image(64, 64, 5)
    assert student.decode(student.encode([img]))[0].shape == img.shape
    # a student is no teacher
    assert (
        main(
            [
                "train",
                BG,
                "--out",
                str(tmp_path / "x"),
                *base,
                "--method-opt",
                f"teacher={tmp_path / 's' / 'best.pth'}",
            ]
        )
        == 2
    )
    assert "is not a bound=true model" in capsys.readouterr().err


def test_bgvae_free_bits_floor_each_latent_and_rate_warmup_ramps_the_rate(pngs, tmp_path):
    m = build_method("bgvae", {"free_bits": 0.5, "rate_warmup": 4})
    assert [m.rate_weight(t) for t in (0, 2, 4, 10)] == [0.0, 0.5, 1.0, 1.0]
    assert build_method("bgvae").rate_weight(0) == 1.0  # off by default
    # two latents, two images, 100 pixels: the floor is 50 bits per latent per image
    bits = [
        torch.tensor([10.0, 200.0], requires_grad=True),
        torch.tensor([60.0, 0.0], requires_grad=True),
    ]
    rate = m.rate_term(bits, 100)
    assert rate.tolist() == pytest.approx([(50 + 60) / 100, (200 + 50) / 100])
    rate.sum().backward()
    # a latent under its floor is not pushed further down
    assert bits[0].grad.tolist() == pytest.approx([0.0, 0.01])
    assert bits[1].grad.tolist() == pytest.approx([0.01, 0.0])
    for bad, why in (({"free_bits": -1}, "free_bits=-1 must be a number >= 0"),
                     ({"rate_warmup": 1.5}, "rate_warmup=1.5 must be a whole number"),
                     ({"rate_warmup": True}, "rate_warmup=True must be a whole number"),
                     ({"free_bits": True}, "free_bits=True must be a number")):  # fmt: skip
        with pytest.raises(ClbenchError, match=why):
            build_method("bgvae", bad)
    cfg = config(pngs, tmp_path / "fb", BG, "bgvae", {"free_bits": 0.01, "rate_warmup": 2}, steps=3)
    rec = train(cfg, progress=False)
    assert math.isfinite(rec["train_loss"])


def test_method_defaults_live_in_yaml():
    m = build_method("balanced-rd")
    assert m.weights.opt.param_groups[0]["weight_decay"] == 0.001
    assert build_method("stdet-sma").modes == 8
    assert build_method("bgvae").teacher_path is None


def test_stdet_sma_resumes_bit_identically(pngs, tmp_path):
    """Killed in the middle of its fit phase, resumed: the same weights, maps and SMA."""
    opts = dict(warmup=6, record_every=2, fit_steps=6, embed_every=2, embed_rate=0.5,
                min_corr=0.0, samples=60, modes=3, sma_every=2)  # fmt: skip
    torch.manual_seed(0)
    train(config(pngs, tmp_path / "a", EFF, "stdet-sma", opts, steps=16), progress=False)
    train(
        config(pngs, tmp_path / "b", EFF, "stdet-sma", opts, steps=8, ckpt_every=8), progress=False
    )
    train(
        config(pngs, tmp_path / "b", EFF, "stdet-sma", opts, steps=16), resume=True, progress=False
    )
    a, b = (torch.load(tmp_path / d / "last.pth", weights_only=True) for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["method"].keys() == b["method"].keys()
    for k, v in a["method"].items():
        assert (
            torch.equal(v, b["method"][k]) if isinstance(v, torch.Tensor) else v == b["method"][k]
        )
