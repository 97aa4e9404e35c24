"""objective=uniform: the continuous-time NELBO against Duo's own function, its zero for a perfect predictor and its
limit of exact categorical KLs, the posterior, the loss (nelbo / ce, block_size) and self-conditioning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffuse.contracts import BLOCK_UNIFORM, UNIFORM
from diffuse.errors import DiffuseError
from diffuse.objectives.uniform import (
    Uniform,
    uniform_nelbo_integrand,
    uniform_posterior,
    uniform_prior_kl,
)
from diffuse.schedules import build_schedule
from tests.conftest import (
    SPECIAL,
    VOCAB,
    UniformBlockBackbone,
    ZeroBackbone,
    packed_batch,
    tiny_transformer,
)


def duo_nll_per_token(log_x_theta, xt, x0, alpha_t, dalpha_t, vocab_size):
    """A transcription of Duo's DUO_BASE.nll_per_token (s-sahoo/duo, algo.py), kept as written there."""
    x_reconst = log_x_theta.exp()
    x_bar_theta = vocab_size * alpha_t[:, :, None] * x_reconst + 1 - alpha_t[:, :, None]
    coeff = dalpha_t / (vocab_size * alpha_t)
    x_eq_xt = (x0 == xt).to(log_x_theta.dtype)
    x_neq_xt = 1 - x_eq_xt
    xbar_xt = (1 - alpha_t) + vocab_size * alpha_t * x_eq_xt
    xbar_theta_xt = torch.gather(x_bar_theta, -1, xt.unsqueeze(-1)).squeeze(-1)
    xbar_theta_x = torch.gather(x_bar_theta, -1, x0.unsqueeze(-1)).squeeze(-1)
    term1 = vocab_size * (1 / xbar_xt - 1 / xbar_theta_xt)
    const = (1 - alpha_t) / (vocab_size * alpha_t + 1 - alpha_t)
    term2_coefs = x_eq_xt * const + x_neq_xt
    term2_offset = ((vocab_size - 1) * const * x_eq_xt - (1 / const) * x_neq_xt) * const.log()
    term2_theta = -term2_coefs * (x_bar_theta.log().sum(-1) - vocab_size * xbar_theta_xt.log())
    term2_theta = term2_theta - vocab_size * alpha_t / (1 - alpha_t) * (
        xbar_theta_x.log() - xbar_theta_xt.log()) * x_neq_xt
    term2 = term2_theta + term2_offset
    return coeff * (term1 - term2)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_nelbo_integrand_equals_duos(schedule):
    g = torch.Generator().manual_seed(0)
    B, L, V = 4, 6, 7
    sched = build_schedule(schedule)
    log_x = torch.randn(B, L, V, generator=g, dtype=torch.float64).mul(2).log_softmax(-1)
    x0 = torch.randint(0, V, (B, L), generator=g)
    xt = torch.where(torch.rand(B, L, generator=g) < 0.5, x0, torch.randint(0, V, (B, L), generator=g))
    t = torch.tensor([[0.05], [0.3], [0.7], [0.99]], dtype=torch.float64)
    alpha, dalpha = sched.alpha(t), sched.alpha_prime(t)
    ours = uniform_nelbo_integrand(log_x, xt, x0, alpha.expand(B, L), dalpha.expand(B, L))
    theirs = duo_nll_per_token(log_x, xt, x0, alpha, dalpha, V)
    assert (x0 == xt).any() and (x0 != xt).any()
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    assert (ours > 0).all()


def test_nelbo_integrand_is_zero_for_a_perfect_predictor():
    V = 9
    x0 = torch.arange(V).repeat(3)[None]
    xt = torch.randint(0, V, x0.shape, generator=torch.Generator().manual_seed(1))
    log_x = F.one_hot(x0, V).double().log()
    for a in (1e-3, 0.2, 0.9):
        alpha = torch.full(x0.shape, a, dtype=torch.float64)
        out = uniform_nelbo_integrand(log_x, xt, x0, alpha, -torch.ones_like(alpha))
        assert out.abs().max() < 1e-12


def bayes_posterior(x_onehot, z, a_s, a_t, V):
    """q(z_s | z_t, x) by Bayes' rule from the transition matrices."""
    Q_ts = (a_t / a_s) * torch.eye(V, dtype=torch.float64) + (1 - a_t / a_s) / V  # Q[j, i] = q(z_t = i | z_s = j)
    prior_s = a_s * x_onehot + (1 - a_s) / V
    joint = prior_s * Q_ts[:, z]
    return joint / joint.sum()


def test_posterior_is_bayes():
    V = 6
    for x, z in ((2, 2), (2, 4)):
        onehot = F.one_hot(torch.tensor(x), V).double()
        ours = uniform_posterior(onehot, torch.tensor(z), torch.tensor(0.6, dtype=torch.float64),
                                 torch.tensor(0.25, dtype=torch.float64))
        torch.testing.assert_close(ours, bayes_posterior(onehot, z, 0.6, 0.25, V))
    clean = uniform_posterior(F.one_hot(torch.tensor(3), V).double(), torch.tensor(1), torch.tensor(1.0).double(),
                              torch.tensor(0.3).double())
    torch.testing.assert_close(clean, F.one_hot(torch.tensor(3), V).double())  # α_s = 1: x itself


def test_nelbo_is_the_limit_of_the_discrete_nelbo():
    """One token, V = 5, a fixed time-dependent predictor x_θ(z, t) = softmax(A[z] + t·C[z]): the T-step NELBO
    Σ_k E_{z_t} KL(q(z_s | z_t, x) ‖ q(z_s | z_t, x_θ)) (exact, by enumeration) tends to ∫ E_{z_t}[integrand] dt."""
    V, x = 5, 2
    g = torch.Generator().manual_seed(3)
    A, C = torch.randn(V, V, generator=g, dtype=torch.float64), torch.randn(V, V, generator=g, dtype=torch.float64)
    sched = build_schedule("cosine")
    lo, hi = 1e-3, 1 - 1e-3
    onehot = F.one_hot(torch.tensor(x), V).double()

    def x_theta(t):  # [n, V(z), V]
        return (A + t[:, None, None] * C).softmax(-1)

    def marginal(a):  # q(z_t | x) over z: [n, V]
        return a[:, None] * onehot + (1 - a[:, None]) / V

    z = torch.arange(V).expand(1, V)

    def continuous(n=20001):
        ts = torch.linspace(lo, hi, n, dtype=torch.float64)
        a, da = sched.alpha(ts)[:, None].expand(n, V), sched.alpha_prime(ts)[:, None].expand(n, V)
        f = uniform_nelbo_integrand(x_theta(ts).log(), z.expand(n, V), torch.full((n, V), x), a, da)
        return torch.trapezoid((marginal(sched.alpha(ts)) * f).sum(-1), ts)

    def discrete(T):
        grid = torch.linspace(hi, lo, T + 1, dtype=torch.float64)
        t, s = grid[:-1], grid[1:]
        a_t, a_s = sched.alpha(t)[:, None].expand(T, V), sched.alpha(s)[:, None].expand(T, V)
        q = uniform_posterior(onehot.expand(T, V, V), z.expand(T, V), a_s, a_t)
        p = uniform_posterior(x_theta(t), z.expand(T, V), a_s, a_t)
        kl = (q * (q.log() - p.log())).sum(-1)
        return float((marginal(sched.alpha(t)) * kl).sum())

    exact = float(continuous())
    err = {T: abs(discrete(T) - exact) / exact for T in (10, 100, 1000)}
    print('relative error of the T-step NELBO:', err)
    assert err[1000] < 0.01 and err[1000] < err[100] < err[10], err


def test_prior_kl():
    V = 7
    assert float(uniform_prior_kl(torch.tensor(0.0), V)) == pytest.approx(0.0, abs=1e-12)
    assert float(uniform_prior_kl(torch.tensor(1.0), V)) == pytest.approx(math.log(V))


def objective(**kw):
    return Uniform(build_schedule(kw.pop("schedule", "linear")), SPECIAL, **kw)


def test_loss_ce_of_the_uniform_predictor_is_log_v_and_val_is_the_nelbo():
    batch = packed_batch(4, 16, docs=True)

    def gen():
        return torch.Generator().manual_seed(0)

    ce = objective(loss="ce").loss(ZeroBackbone(), batch, gen(), train=True)
    nelbo = objective(loss="nelbo").loss(ZeroBackbone(), batch, gen(), train=True)
    real = (batch["segment_ids"] > 0) & (batch["input_ids"] != SPECIAL.bos)
    assert int(ce.n_tokens) == int(real.sum())
    assert float(ce.loss) == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert float(ce.nll_sum) == pytest.approx(float(nelbo.nll_sum), rel=1e-6)  # the same bound either way
    assert float(nelbo.loss) == pytest.approx(float(nelbo.nll_sum / nelbo.n_tokens), rel=1e-6)
    assert 0 < float(nelbo.loss) < math.log(VOCAB) + 1


@pytest.mark.parametrize("loss", ["nelbo", "ce"])
def test_a_batch_without_targets_logs_zeros_not_nan(loss):
    """Rows of BOS and prompt only (SFT): no noisable token; every logged number is 0 (a mean of nothing was NaN)."""
    batch = packed_batch(2, 8, docs=True)
    batch["prompt_mask"] = (batch["segment_ids"] > 0).long()
    out = objective(loss=loss).loss(ZeroBackbone(), batch, torch.Generator().manual_seed(0))
    assert int(out.n_tokens) == 0 and float(out.loss) == 0
    assert all(float(v) == 0 for v in out.metrics.values()), out.metrics

def test_corruption_keeps_bos_padding_and_couples_across_times():
    obj = objective()
    obj.bind(ZeroBackbone())
    batch = packed_batch(3, 20, docs=True)
    x0 = batch["input_ids"]
    noise = obj.draw_noise(x0, torch.Generator().manual_seed(0))
    early, late = (obj.corrupt(x0, torch.full((3, 1), t), noise, batch) for t in (0.3, 0.8))
    given = ~obj.noisable(batch)
    assert torch.equal(early[given], x0[given]) and torch.equal(late[given], x0[given])
    changed_early = early != x0
    assert torch.equal(late[changed_early], early[changed_early])  # nested: what t = 0.3 replaced, 0.8 replaced alike
    assert (late != x0).sum() > changed_early.sum()


def test_block_size_process_and_loss():
    obj = objective(block_size=4)
    assert obj.process == BLOCK_UNIFORM and objective().process == UNIFORM
    out = obj.loss(UniformBlockBackbone(), packed_batch(2, 12), torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    t = obj.sample_t(torch.zeros(2, 12, dtype=torch.long), torch.Generator().manual_seed(0))
    assert t.shape == (2, 12) and torch.equal(t[:, :4], t[:, :1].expand(2, 4))
    with pytest.raises(DiffuseError, match="block_size"):
        obj.check_backbone(ZeroBackbone(), "stub")


def test_bad_keys_are_one_line():
    with pytest.raises(DiffuseError, match="objective.loss"):
        objective(loss="mse")
    with pytest.raises(DiffuseError, match="objective.eps"):
        objective(eps=0.7)


# -- self-conditioning ------------------------------------------------------------------------------------
def test_self_condition_keys_and_zero_start():
    plain = tiny_transformer(n_layers=1)
    assert not plain.self_conditioned
    assert sorted(plain.state_dict()) == [
        "blocks.0.attn.out.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.down.weight",
        "blocks.0.mlp.gate_up.weight", "blocks.0.norm1.weight", "blocks.0.norm2.weight", "head.weight", "norm.weight",
        "tok_emb.weight"]  # a model without self_condition keeps the keys older checkpoints have
    model = tiny_transformer(n_layers=1, self_condition=True)
    assert model.self_conditioned and any(k.startswith("self_cond.") for k in model.state_dict())
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    probs = torch.rand(2, 8, VOCAB).softmax(-1)
    base = model(ids=ids)
    torch.testing.assert_close(model(ids=ids, prev_probs=probs), base)  # zero-initialised: a fresh model ignores it
    torch.nn.init.normal_(model.self_cond.mlp.down.weight, std=0.1)
    torch.testing.assert_close(model(ids=ids, prev_probs=torch.zeros_like(probs)), base)  # zero rows add nothing
    assert not torch.allclose(model(ids=ids, prev_probs=probs), base)
    with pytest.raises(DiffuseError, match="self_condition"):
        plain(ids=ids, prev_probs=probs)


def test_self_conditioned_training_runs_both_paths():
    model = tiny_transformer(self_condition=True).train()
    torch.nn.init.normal_(model.self_cond.mlp.down.weight, std=0.1)
    obj = objective()
    batch = packed_batch(2, 12)
    calls = []
    model.register_forward_hook(lambda m, args, kw, out: calls.append("prev_probs" in kw), with_kwargs=True)
    passes = set()
    for seed in range(8):
        calls.clear()
        out = obj.loss(model, batch, torch.Generator().manual_seed(seed), train=True)
        out.loss.backward()
        passes.add(tuple(calls))
    assert passes == {(False,), (False, True)}  # one pass, or a first pass then one that reads its softmax
    assert model.self_cond.mlp.down.weight.grad is not None
    calls.clear()
    obj.loss(model, batch, torch.Generator().manual_seed(0), train=False)
    assert calls == [False, True]  # validation: always both passes (a deterministic function of z_t)


def test_absorbing_decode_loop_passes_the_previous_step():
    from diffuse.objectives.masked_discrete import MaskedDiscrete
    from diffuse.sampling.masked import AncestralSampler

    model = tiny_transformer(self_condition=True)
    torch.nn.init.normal_(model.self_cond.mlp.down.weight, std=0.2)
    seen = []
    model.register_forward_hook(lambda m, args, kw, out: seen.append(kw.get("prev_probs")), with_kwargs=True)
    obj, sampler = MaskedDiscrete(build_schedule("linear"), SPECIAL), AncestralSampler(steps=4)
    prompts = [[1, 2], [3]]
    out = sampler.generate(model, obj, prompts, 6, seed=0)
    assert seen[0] is None and all(p is not None for p in seen[1:]) and len(seen) == out.nfe
    torch.testing.assert_close(seen[1].sum(-1), torch.ones(seen[1].shape[:2]))  # SUBS probabilities of the canvas
    for i, p in enumerate(prompts):
        assert torch.equal(sampler.generate(model, obj, [p], 6, seed=i).tokens[0], out.tokens[i])


@pytest.mark.parametrize("name", ["autoregressive", "continuous"])  # and hybrid: none of them is TrainsSelfConditioning
def test_objectives_without_self_conditioning_refuse_it_in_one_line(name, corpus, tmp_path):
    """Their loss never runs the first pass: the self-conditioning input would stay untrained."""
    from tests.conftest import call_main, error_lines, tiny_args

    res = call_main("diffuse.train", *tiny_args(corpus, tmp_path, f"objective={name}", "model.self_condition=true"))
    assert res.returncode != 0 and len(error_lines(res.stderr)) == 1, res
    assert "model.self_condition=false" in error_lines(res.stderr)[0]


def test_nelbo_from_logits_has_autograds_gradient():
    from diffuse.objectives.uniform import nelbo_from_logits

    g = torch.Generator().manual_seed(5)
    N, V = 12, 9
    logits = torch.randn(N, V, generator=g, dtype=torch.float64).mul(2).requires_grad_()
    x0 = torch.randint(0, V, (N,), generator=g)
    z = torch.where(torch.rand(N, generator=g) < 0.5, x0, torch.randint(0, V, (N,), generator=g))
    sched = build_schedule("cosine")
    t = torch.rand(N, generator=g, dtype=torch.float64) * 0.98 + 0.01
    alpha, dalpha = sched.alpha(t), sched.alpha_prime(t)
    w = torch.rand(N, generator=g, dtype=torch.float64)
    ours = nelbo_from_logits(logits, z, x0, alpha, dalpha)
    (grad_ours,) = torch.autograd.grad((w * ours).sum(), logits)
    ref = uniform_nelbo_integrand(logits.log_softmax(-1), z, x0, alpha, dalpha)
    (grad_ref,) = torch.autograd.grad((w * ref).sum(), logits)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-9, atol=1e-12)
    assert grad_ref.abs().max() > 1e-3  # the gradient is not trivially zero


def test_block_sampler_passes_the_previous_step_and_its_cache_stays_exact():
    from diffuse.objectives.masked_discrete import MaskedDiscrete
    from diffuse.sampling.block import BlockSampler

    model = tiny_transformer(self_condition=True)
    torch.nn.init.normal_(model.self_cond.mlp.down.weight, std=0.2)
    seen = []
    model.register_forward_hook(lambda m, args, kw, out: seen.append("prev_probs" in kw), with_kwargs=True)
    obj = MaskedDiscrete(build_schedule("linear"), SPECIAL, block_size=4)
    prompts = [[1, 2, 3], [4]]
    cached = BlockSampler(steps=4, use_cache=True).generate(model, obj, prompts, 8, seed=0)
    assert True in seen and seen[0] is False
    uncached = BlockSampler(steps=4, use_cache=False).generate(model, obj, prompts, 8, seed=0)
    assert torch.equal(cached.tokens, uncached.tokens)
