"""objective=continuous and sampler=ddim: perfect predictors, the noise level, the exact bound, DDIM."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffuse.errors import DiffuseError
from diffuse.objectives.base import SpecialTokens
from diffuse.objectives.continuous import ContinuousEmbedding
from diffuse.registry import MODELS
from diffuse.sampling.ddim import DDIMSampler
from diffuse.schedules import build_schedule

SPECIAL = SpecialTokens(pad=0, bos=1, eos=2, mask=3)
V, D = 40, 64


class Oracle(nn.Module):
    """A time-conditioned backbone whose hidden state is x0 / scale of `answer` ids (a perfect predictor),
    plus an optional fixed error `offset` (before scaling)."""

    time_conditioned = True

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.vocab_size, self.scale = V, scale
        self.tok_emb = nn.Embedding(V, D)
        self.answer = None
        self.offset = 0.0
        self.calls = 0

    def embed(self, ids):
        return self.tok_emb(ids)

    def forward(self, ids=None, embeds=None, t=None, segment_ids=None, causal=False):
        self.calls += 1
        e = self.tok_emb(self.answer)
        unit = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + 1e-8)
        return unit + self.offset / self.scale

    def logits(self, hidden):
        return hidden @ self.tok_emb.weight.T


def make_batch(B=4, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (B, L), generator=g)
    ids[:, 0] = SPECIAL.bos
    seg = torch.ones_like(ids)
    seg[0, -3:] = 0  # some padding
    ids[0, -3:] = SPECIAL.pad
    return {"input_ids": ids, "segment_ids": seg}


def objective(schedule="linear", **kw):
    return ContinuousEmbedding(build_schedule(schedule), SPECIAL, **kw)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_perfect_predictor_gives_zero_mse_and_near_zero_ce(schedule, scale):
    obj, bb, batch = objective(schedule, embedding_scale=scale), Oracle(scale), make_batch()
    bb.answer = batch["input_ids"]
    out = obj.loss(bb, batch, torch.Generator().manual_seed(1), train=True)
    assert out.metrics["mse"].item() < 1e-10
    assert out.metrics["ce"].item() < 1e-6
    assert out.token_correct.all()
    # only real tokens other than BOS are noised and counted
    assert out.n_tokens.item() == ((batch["segment_ids"] > 0) & (batch["input_ids"] != SPECIAL.bos)).sum().item()
    # and the bound of a perfect predictor is ≈ 0 nats/token (no KL, a sure decoder, a standard-normal prior)
    val = obj.loss(bb, batch, torch.Generator().manual_seed(2), train=False)
    assert val.nll_sum.item() / val.n_tokens.item() < 1e-5


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_empirical_noise_level_matches_alpha_bar(schedule, t):
    obj = objective(schedule)
    g = torch.Generator().manual_seed(0)
    B, L = 8, 128
    ids = torch.randint(4, V, (B, L), generator=g)
    batch = {"input_ids": ids, "segment_ids": torch.ones_like(ids)}
    x0 = obj.normalise(torch.randn(B, L, D, generator=g))
    z = obj.corrupt(x0, torch.full((B, 1), t), obj.draw_noise(x0, g), batch)
    alpha = float(build_schedule(schedule).alpha(torch.tensor(t, dtype=torch.float64)))
    signal = (z.x * x0).sum() / (x0 * x0).sum()  # regression of x_t on x0: √ᾱ
    residual = (z.x - signal * x0).pow(2).mean()  # the rest: 1 − ᾱ
    assert signal.item() == pytest.approx(math.sqrt(alpha), abs=0.01)
    assert residual.item() == pytest.approx(1 - alpha, abs=0.02)
    assert obj.noise_level(torch.tensor([[t]])).item() == pytest.approx(1 - alpha, rel=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_bound_telescopes_for_a_constant_error(schedule):
    """Each of the T−1 rows draws a different k ∈ {2..T}: the estimate is then the exact sum
    ½‖c‖²·(SNR(1/T) − SNR(1)) + decoder CE + prior KL for a predictor off by a constant c."""
    T = 20
    obj, bb = objective(schedule, num_timesteps=T), Oracle()
    ids = torch.randint(4, V, (T - 1, 6), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "segment_ids": torch.ones_like(ids)}
    bb.answer = ids
    c = 0.05 * torch.randn(D, generator=torch.Generator().manual_seed(4))
    bb.offset = c
    out = obj.loss(bb, batch, torch.Generator().manual_seed(5), train=False)

    sched = build_schedule(schedule)
    snr = lambda t: float(sched.alpha(torch.tensor(t, dtype=torch.float64)) / (1 - sched.alpha(torch.tensor(t, dtype=torch.float64))))
    x0 = obj.embed_tokens(bb, ids)
    decoder = F.cross_entropy(obj.round_logits(bb, x0 + c).transpose(1, 2), ids).item()
    a1 = float(sched.alpha(torch.tensor(1.0, dtype=torch.float64)))
    prior = (0.5 * (a1 * x0.double().pow(2).sum(-1) - D * a1 - D * math.log1p(-a1))).mean().item()
    expected = 0.5 * c.pow(2).sum().item() * (snr(1 / T) - snr(1.0)) + decoder + prior
    assert out.nll_sum.item() / out.n_tokens.item() == pytest.approx(expected, rel=1e-4)
    assert bb.calls == 2  # one forward at the drawn k, one at k = 1 for the decoder term


def test_untrained_model_trains_and_bound_is_finite():
    bb = MODELS.build({"name": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2, "time_conditioning": True}, vocab_size=V)
    obj, batch = objective(), make_batch()
    out = obj.loss(bb, batch, torch.Generator().manual_seed(0), train=True)
    out.loss.backward()
    assert torch.isfinite(out.loss) and bb.tok_emb.weight.grad.abs().sum() > 0
    val = obj.loss(bb, batch, torch.Generator().manual_seed(0), train=False)
    assert math.isfinite(val.nll_sum.item()) and val.nll_sum.item() > 0


def test_backbone_without_time_conditioning_is_a_one_line_error():
    bb = MODELS.build({"name": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2}, vocab_size=V)
    with pytest.raises(DiffuseError, match="model.time_conditioning=true") as err:
        objective().loss(bb, make_batch())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [{"num_timesteps": 1}, {"embedding_scale": 0.0}, {"mse_weight": -1.0}])
def test_bad_settings_are_one_line_errors(bad):
    with pytest.raises(DiffuseError):
        objective(**bad)


# -- DDIM ------------------------------------------------------------------------------------------
def canvas_answer(prompts, targets):
    """The ids of the canvas [BOS, prompt, generation, PAD…] the sampler builds, with the targets filled in."""
    width = max(len(p) for p in prompts) + 1 + len(targets[0])
    rows = []
    for p, tgt in zip(prompts, targets):
        row = [SPECIAL.bos, *p, *tgt]
        rows.append(row + [SPECIAL.pad] * (width - len(row)))
    return torch.tensor(rows)


@pytest.mark.parametrize("clamp", [False, True])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_with_a_perfect_predictor_recovers_the_tokens(clamp, schedule):
    obj, bb = objective(schedule, num_timesteps=1000), Oracle()
    prompts = [[5, 6, 7], [8]]
    targets = [[9, 10, 11, 12, 13], [14, 15, 16, 17, 18]]
    bb.answer = canvas_answer(prompts, targets)
    seen = []
    predict = obj.predict
    obj.predict = lambda backbone, z, t, batch: (seen.append((z.x.clone(), t.clone())), predict(backbone, z, t, batch))[1]
    out = DDIMSampler(steps=7, clamp=clamp).generate(bb, obj, prompts, length=5, seed=0)
    assert out.tokens.tolist() == targets
    assert out.nfe == 7 and out.lengths.tolist() == [5, 5]
    # with x̂0 exact, ε̂ is the starting noise on every step: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·x_T (DDIM's identity)
    x0 = obj.embed_tokens(bb, bb.answer)
    x_T = seen[0][0]
    gen = torch.zeros_like(bb.answer, dtype=torch.bool)
    for r, p in enumerate(prompts):
        gen[r, 1 + len(p) : 1 + len(p) + 5] = True
    assert [round(float(t[0]) * 1000) for _, t in seen] == [1000, 857, 714, 571, 429, 286, 143]
    for x_t, t in seen[1:]:
        a = obj.alpha_bar(t)[..., None]
        expected = (a.sqrt() * x0 + (1 - a).sqrt() * x_T).float()
        torch.testing.assert_close(x_t[gen], expected[gen], atol=1e-4, rtol=1e-4)


def test_ddim_trims_at_eos_and_holds_the_prompt():
    obj, bb = objective(), Oracle()
    prompts, targets = [[5, 6]], [[9, SPECIAL.eos, 11, 12]]
    bb.answer = canvas_answer(prompts, targets)
    seen = []
    predict = obj.predict
    obj.predict = lambda backbone, z, t, batch: (seen.append(z.x[:, :3].clone()), predict(backbone, z, t, batch))[1]
    out = DDIMSampler(steps=3).generate(bb, obj, prompts, length=4, seed=0)
    assert out.tokens.tolist() == [[9, SPECIAL.pad, SPECIAL.pad, SPECIAL.pad]] and out.lengths.tolist() == [1]
    clean = obj.embed_tokens(bb, torch.tensor([[SPECIAL.bos, 5, 6]]))
    assert all(torch.equal(x, clean) for x in seen)  # BOS and prompt held at their clean embeddings


def test_ddim_batch_equals_singles():
    torch.manual_seed(0)
    bb = MODELS.build({"name": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2, "time_conditioning": True}, vocab_size=V).eval()
    obj, sampler = objective(), DDIMSampler(steps=4)
    prompts = [[5, 6, 7], [8]]
    both = sampler.generate(bb, obj, prompts, length=6, seed=3)
    for i, p in enumerate(prompts):
        # row i draws from the generator of index i: give a single sample the same stream by position
        alone = sampler.generate(bb, obj, [[]] * i + [p], length=6, seed=3)
        assert alone.tokens[i].tolist() == both.tokens[i].tolist()


def test_sampler_choice_follows_the_process_of_the_objective():
    # a mismatch is refused in one line, never replaced silently by another sampler
    from diffuse.run.build import build_sampler
    from diffuse.objectives.masked_discrete import MaskedDiscrete

    with pytest.raises(DiffuseError, match="sampler=remask .* objective=continuous .* use sampler=ddim"):
        build_sampler({"name": "remask"}, objective())
    masked = MaskedDiscrete(build_schedule("linear"), SPECIAL)
    with pytest.raises(DiffuseError, match="sampler=ddim .* objective=masked_discrete .* use sampler=ancestral"):
        build_sampler({"name": "ddim"}, masked)
    assert build_sampler({}, objective()).registry_name == "ddim"


def test_objective_config_switches_time_conditioning_on():
    from hydra import compose, initialize_config_dir

    from diffuse.core.paths import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for model in ("transformer", "mamba2"):
            cfg = compose("train", overrides=[f"model={model}", "objective=continuous"])
            assert cfg.model.time_conditioning is True and cfg.objective.name == "continuous"
        cfg = compose("train", overrides=["recipe=dimba"])
        assert (cfg.model.name, cfg.objective.name, cfg.regularizer.name, cfg.sampler.name) == (
            "mamba2", "continuous", "cdlm_consistency", "ddim")
        assert cfg.model.time_conditioning is True and cfg.optim.lr == 2e-5
