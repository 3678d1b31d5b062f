"""PTM baselines: mechanisms and a tiny two-experience end-to-end run each (CPU, tiny ViT)."""

from __future__ import annotations

import io

import pytest
import torch
from test_cl_lora import accuracy, make_ctx, make_experiences

from clbench.strategies.base import STRATEGIES
from clbench.strategies.ptm import AdaptedBlock, ridge_select

TINY = {
    "simplecil": {},
    "seq-lora": {"rank": 4, "alpha": 4, "epochs": 2, "lr": 0.05},
    "aper": {"epochs": 2, "lr": 0.05, "batch_size": 4, "ffn_num": 8},
    "ranpac": {"epochs": 2, "lr": 0.05, "batch_size": 4, "ffn_num": 8, "M": 256},
    # prompt tuning needs more steps on a random-init ViT (its prompt-token outputs hardly
    # depend on the image); the published defaults are in ptm.yaml
    "l2p": {"epochs": 15, "lr": 0.05, "batch_size": 4, "pool_size": 4, "top_k": 2, "length": 2},
    "inflora": {"epochs": 2, "lr": 0.01, "batch_size": 4, "rank": 4},
    # the tiny ViT has 4 blocks: prefixes in blocks 0-1 (G) / 2-3 (E), 0-3 (CODA)
    "dualprompt": {"epochs": 8, "lr": 0.05, "batch_size": 4, "e_layers": [2, 3], "pool_size": 4},
    "coda-prompt": {
        "epochs": 8,
        "lr": 0.05,
        "batch_size": 4,
        "layers": [0, 1, 2, 3],
        "pool_size": 8,
    },
}
NAMES = [n for n in TINY if n in STRATEGIES]


def build(name: str, **over):
    torch.manual_seed(0)  # the loaders' shuffling draws from the global RNG
    return STRATEGIES.get(name)(make_ctx(), **{**TINY[name], **over})


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", NAMES)
def test_two_experiences_end_to_end(name):
    s = build(name)
    exps, tests = make_experiences(per_class=6)
    s.train_experience(exps[0])
    assert s.predict(tests[0].x).shape == (len(tests[0].x), 2)
    s.train_experience(exps[1])
    logits = s.predict(tests[0].x)
    assert logits.shape == (len(tests[0].x), 4) and torch.isfinite(logits).all()
    acc = accuracy(s, tests)
    assert acc > 0.25 + 0.1, f"{name}: accuracy {acc} not above chance (0.25)"
    # checkpoint round trip: a fresh strategy loaded from the state predicts the same
    s2 = build(name)
    s2.load_state_dict(_roundtrip(s.state_dict()))
    x = torch.cat([t.x for t in tests])
    assert torch.allclose(s2.predict(x), s.predict(x), atol=1e-5)
    assert s.memory()["buffer_bytes"] == 0


def test_simplecil_prototypes_are_frozen_feature_means():
    s = build("simplecil")
    exps, _ = make_experiences()
    s.train_experience(exps[0])
    ds = exps[0].data("eval")
    with torch.no_grad():
        f = s.backbone(ds.x)
    for c in (0, 1):
        assert torch.allclose(s.protos.means[c], f[ds.y == c].mean(0), atol=1e-5)
    assert s.trainable_params() == 0


def test_seq_lora_trains_only_lora_and_head():
    s = build("seq-lora")
    base = {n: p.clone() for n, p in s.backbone.named_parameters() if "lora_" not in n}
    exps, _ = make_experiences()
    s.train_experience(exps[0])
    for n, p in s.backbone.named_parameters():
        if "lora_" in n:
            assert p.requires_grad
        else:
            assert not p.requires_grad and torch.equal(p, base[n])
    assert any(torch.count_nonzero(p) for n, p in s.backbone.named_parameters() if "lora_B" in n)
    # 4 blocks x (A: 4x64 + B: 192x4) + head over all classes (64*4 + 4)
    assert s.trainable_params() == 4 * (4 * 64 + 192 * 4) + 64 * 4 + 4


def test_first_session_adapters_are_tuned_once():
    s = build("aper")
    exps, tests = make_experiences()
    assert all(isinstance(b, AdaptedBlock) for b in s.backbone.blocks)
    s.train_experience(exps[0])
    after_0 = {k: v.clone() for k, v in s.adapters.state_dict().items()}
    assert any(torch.count_nonzero(v) for k, v in after_0.items() if "up.weight" in k)
    s.train_experience(exps[1])
    for k, v in s.adapters.state_dict().items():
        assert torch.equal(v, after_0[k])
    # [pre-trained, adapted] features
    assert s.protos.means.shape == (4, 2 * 64)


def test_ridge_selection_matches_per_lambda_solves():
    g = torch.Generator().manual_seed(0)
    h = torch.relu(torch.randn(60, 30, generator=g))
    y = torch.nn.functional.one_hot(torch.randint(0, 5, (60,), generator=g), 5).float()
    lambdas = torch.logspace(-3, 3, 7)
    chosen = ridge_select(h, y, lambdas, 0.8, torch.Generator().manual_seed(1))
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(1))
    fit, val = perm[:48], perm[48:]
    hd, yd = h.double(), y.double()
    losses = []
    for lam in lambdas.tolist():  # PILOT: one solve per lambda
        w = torch.linalg.solve(
            hd[fit].T @ hd[fit] + lam * torch.eye(30, dtype=torch.float64), hd[fit].T @ yd[fit]
        )
        losses.append(float(((hd[val] @ w - yd[val]) ** 2).mean()))
    assert chosen == pytest.approx(float(lambdas[int(torch.tensor(losses).argmin())]))


def test_ranpac_head_is_the_ridge_solution_of_accumulated_statistics():
    s = build("ranpac", ridge_min_exp=0, ridge_max_exp=0)  # lambda = 1: well conditioned
    exps, _ = make_experiences()
    feats = []
    for e in exps:
        s.train_experience(e)
        with torch.no_grad():
            s.backbone.eval()
            feats.append(s.project(s.backbone(e.data("eval").x)))
    h = torch.cat(feats)
    y = torch.nn.functional.one_hot(torch.cat([e.data("eval").y for e in exps]), 4).float()
    assert s.ridge == 1.0
    w = torch.linalg.solve(h.T @ h + torch.eye(h.shape[1]), h.T @ y)
    assert torch.allclose(s.W, w, atol=1e-4, rtol=1e-3)


def test_inflora_designs_down_projections_outside_earlier_subspace():
    s = build("inflora")
    exps, _ = make_experiences()
    s.train_experience(exps[0])
    m = s.qkvs[0]
    a0 = m.downs[0][0]  # [r, C]
    assert torch.allclose(a0 @ a0.T, torch.eye(4) / 3, atol=1e-5)  # singular vectors / sqrt(3)
    b0 = m.ups[0].detach().clone()
    assert torch.count_nonzero(b0) > 0 and not m.ups[0].requires_grad
    bases0, kinds0 = [b.clone() for b in s.bases], list(s.kinds)
    s.train_experience(exps[1])
    assert torch.equal(m.ups[0], b0)  # earlier tasks' B frozen
    for q, base, kind in zip(s.qkvs, bases0, kinds0, strict=True):
        a1 = q.downs[1][0].double()  # designed from the covariance projected by base
        inside = a1 @ base @ base.T
        residual = inside if kind == "remove" else a1 - inside
        assert residual.abs().max() < 1e-5, kind
    # B of k and v in 4 blocks (2 x 64 x 4 each) + the task's head (64 x 2 + 2)
    assert s.trainable_params() == 4 * 2 * 64 * 4 + 64 * 2 + 2
    # the record reports, per task and block, how many input dimensions DualGPM protects
    dims = s.report()["dual_gpm_protected_dims"]
    assert len(dims) == 2 and len(dims[0]) == len(s.qkvs)
    assert all(0 < d <= 64 for d in dims[0]) and all(b >= a for a, b in zip(*dims, strict=True))


def test_prefix_attention_is_attention_over_prefixed_keys_and_values():
    from test_cl_lora import tiny_vit

    from clbench.strategies.prompts import prefix_attention

    attn = tiny_vit().blocks[0].attn.eval()
    g = torch.Generator().manual_seed(0)
    x, pk, pv = (torch.randn(2, n, 64, generator=g) for n in (5, 3, 3))
    out = prefix_attention(attn, x, pk, pv)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 32).permute(2, 0, 3, 1, 4)
    k = torch.cat((pk.reshape(2, 3, 2, 32).transpose(1, 2), k), 2)
    v = torch.cat((pv.reshape(2, 3, 2, 32).transpose(1, 2), v), 2)
    w = torch.softmax(q @ k.transpose(-2, -1) / 32**0.5, -1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 5, 64))
    assert torch.allclose(out, ref, atol=1e-5)
    # an empty prefix is timm's own attention
    empty = torch.zeros(2, 0, 64)
    assert torch.allclose(prefix_attention(attn, x, empty, empty), attn(x), atol=1e-5)


def test_dualprompt_trains_its_tasks_e_prompt_and_selects_by_key_at_test():
    s = build("dualprompt", batchwise_prompt="off")
    exps, tests = make_experiences()
    start = {k: v.detach().clone() for k, v in s.prompts.items()}
    s.train_experience(exps[0])
    e0 = s.prompts["e_prompt"].detach().clone()
    moved = (e0 - start["e_prompt"]).flatten(3).abs().sum(-1)  # [layers, 2, pool]
    assert (moved[:, :, 0] > 0).all() and (moved[:, :, 1:] == 0).all()  # the prompt mask
    assert not torch.equal(s.prompts["g_prompt"], start["g_prompt"])
    s.before_experience(exps[1])  # task 1's E-prompt starts as task 0's (shared_prompt_pool)
    assert torch.equal(s.prompts["e_prompt"][:, :, 1], e0[:, :, 0])
    s.task -= 1
    # at test time the E-prompt is the one whose key is nearest the query
    with torch.no_grad():
        s.prompts["e_keys"].zero_()
        s.prompts["e_keys"][3] = s.backbone(tests[0].x).mean(0)
    from clbench.strategies.prompts import select_prompts

    idx = select_prompts(s.backbone(tests[0].x), s.prompts["e_keys"], 1, False)
    assert (idx == 3).all()


def test_coda_prompt_components_are_orthonormal_and_earlier_ones_frozen():
    s = build("coda-prompt")  # pool 8 over 2 tasks: 4 new components per task
    exps, _ = make_experiences()
    s.train_experience(exps[0])
    before = {k: v.detach().clone() for k, v in s.prompts.items()}
    s.train_experience(exps[1])
    for name, par in s.prompts.items():
        flat, old = par.detach().flatten(1), before[name].flatten(1)
        assert torch.equal(flat[:4], old[:4]), name  # task 0's components frozen
        assert not torch.equal(flat[4:], old[4:]), name  # task 1's trained
    # a fresh draw of task 1's components: unit rows, orthogonal to each other and to the
    # span of task 0's (trained, no longer orthogonal) components
    s.task = 0
    s.before_experience(exps[1])  # task 1 again
    for name, par in s.prompts.items():
        flat = par.detach().double().flatten(1)
        new = flat[4:]
        assert torch.allclose(new @ new.T, torch.eye(4, dtype=torch.float64), atol=1e-5), name
        basis = torch.linalg.qr(flat[:4].T).Q
        assert (new @ basis).abs().max() < 1e-5, name


def test_coda_prompt_weights_are_cosines_of_attended_query_and_keys():
    s = build("coda-prompt", layers=[0])
    exps, tests = make_experiences()
    s.train_experience(exps[0])
    captured = {}
    import clbench.strategies.prompts as prompts

    real = prompts.prefixed_features

    def spy(vit, x, prefixes):
        captured.update(prefixes)
        return real(vit, x, prefixes)

    prompts.prefixed_features = spy
    try:
        s.prompted(tests[0].x, training=False)
    finally:
        prompts.prefixed_features = real
    q = s.backbone(tests[0].x).detach()
    k, a, p = (s.prompts[f"{n}0"][:4].detach() for n in "kap")
    w = torch.nn.functional.cosine_similarity(q[:, None] * a[None], k[None], dim=2)
    prompt = torch.einsum("bn,nlc->blc", w, p)
    assert torch.allclose(captured[0][0], prompt[:, :4], atol=1e-5)
    assert torch.allclose(captured[0][1], prompt[:, 4:], atol=1e-5)


def test_prompt_methods_reject_bad_layers_and_pools():
    from clbench.errors import ConfigError

    with pytest.raises(ConfigError, match=r"dualprompt e_layers: block indices \[4\]"):
        build("dualprompt", e_layers=[2, 4])
    with pytest.raises(ConfigError, match="coda-prompt pool_size 1 is smaller than the number"):
        build("coda-prompt", pool_size=1)
    with pytest.raises(ConfigError, match="batchwise_prompt 'sometimes'"):
        build("l2p", batchwise_prompt="sometimes")


def test_coda_prompt_resume_draws_the_same_new_components():
    """A task's components are drawn at its start: a resumed run must draw the same ones."""
    exps, _ = make_experiences()
    a = build("coda-prompt", epochs=1)
    a.train_experience(exps[0])
    b = build("coda-prompt", epochs=1)
    b.load_state_dict(_roundtrip(a.state_dict()))
    for s in (a, b):
        s.before_experience(exps[1])
    for name, par in a.prompts.items():
        assert torch.equal(par, b.prompts[name]), name
