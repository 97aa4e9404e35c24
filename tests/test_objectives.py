"""Objectives: the uniform-predictor identities, masking statistics, SUBS, coupled noise, clamps."""

import math

import pytest
import torch

from conftest import SPECIAL, VOCAB, FixedLogits, ZeroBackbone
from diffuse.core.metrics import NELBO
from diffuse.objectives.autoregressive import Autoregressive
from diffuse.objectives.masked_discrete import MaskedDiscrete
from diffuse.schedules import build_schedule

V = VOCAB - 1  # SUBS (and the AR loss) never predict [MASK]
ORDINARY = 36  # ids 0..35 are ordinary tokens in the test vocabulary


def random_batch(B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, ORDINARY, (B, L), generator=g)
    return {"input_ids": x0, "segment_ids": torch.ones_like(x0)}


def packed_batch():
    """Two rows: [BOS a b c EOS BOS d e EOS PAD PAD PAD] (two documents) and one full document."""
    b, e, p = SPECIAL.bos, SPECIAL.eos, SPECIAL.pad
    ids = torch.tensor([[b, 1, 2, 3, e, b, 4, 5, e, p, p, p], [b, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, e]])
    seg = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0], [1] * 12])
    return {"input_ids": ids, "segment_ids": seg}


def masked(schedule="linear", **kw):
    return MaskedDiscrete(schedule=build_schedule(schedule), special=SPECIAL, **kw)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# -- the uniform predictor ------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_uniform_predictor_nelbo_is_alpha_eps_minus_alpha_one_times_ln_v(schedule):
    obj = masked(schedule)
    s = obj.schedule
    batch = random_batch(256, 128)
    metric = NELBO()
    for i in range(16):  # antithetic t over 256 rows: ~1% spread per draw, ~0.3% over 16 draws
        out = obj.loss(ZeroBackbone(), batch, gen(i), train=False)
        assert out.loss.item() == pytest.approx((out.nll_sum / out.n_tokens).item())
        metric.update(out.nll_sum, out.n_tokens)
    got = metric.compute()
    a = lambda t: float(s.alpha(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    expected = (a(obj.eps) - a(1.0)) * math.log(V)
    assert got["nelbo"].item() == pytest.approx(expected, rel=0.015)
    assert got["bpt"].item() == pytest.approx(got["nelbo"].item() / math.log(2))
    assert got["ppl"].item() == pytest.approx(math.exp(got["nelbo"].item()))


def test_uniform_predictor_ar_nll_is_exactly_ln_v():
    obj = Autoregressive(special=SPECIAL)
    for batch in (random_batch(8, 32), packed_batch()):
        out = obj.loss(ZeroBackbone(), batch)
        assert (out.nll_sum / out.n_tokens).item() == pytest.approx(math.log(V), rel=1e-6)
        assert out.loss.item() == pytest.approx(math.log(V), rel=1e-6)


def test_ar_and_masked_predict_the_same_tokens():
    """Every real token but BOS, within its own document: both count the same n_tokens."""
    batch = packed_batch()
    ar = Autoregressive(special=SPECIAL).loss(ZeroBackbone(), batch)
    md = masked().loss(ZeroBackbone(), batch, gen(0))
    assert int(ar.n_tokens) == int(md.n_tokens) == 7 + 11
    assert Autoregressive.causal and not MaskedDiscrete.causal


# -- the forward process --------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_masking_rate_matches_one_minus_alpha(schedule, t):
    obj = masked(schedule)
    batch = random_batch(64, 1024)
    x0 = batch["input_ids"]
    tt = torch.full((64, 1), t)
    z = obj.corrupt(x0, tt, obj.draw_noise(x0, gen(1)), batch)
    rate = (z == SPECIAL.mask).float().mean().item()
    p = 1 - float(obj.schedule.alpha(torch.tensor(t)))
    assert rate == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / x0.numel()))
    assert torch.equal(z[z != SPECIAL.mask], x0[z != SPECIAL.mask])  # the rest is untouched


def test_coupled_noise_gives_nested_masks():
    obj = masked("cosine")
    batch = random_batch(16, 256)
    x0 = batch["input_ids"]
    noise = obj.draw_noise(x0, gen(2))
    masks = [obj.corrupt(x0, torch.full((16, 1), t), noise, batch) == SPECIAL.mask for t in (0.2, 0.5, 0.8)]
    for early, late in zip(masks, masks[1:]):
        assert torch.all(early <= late)  # masked at the lower noise level ⇒ masked at the higher
        assert late.sum() > early.sum()
    assert torch.equal(obj.still_noisy(obj.corrupt(x0, torch.full((16, 1), 0.5), noise, batch)), masks[1])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_min_max_mask_ratio_clamp_observed_ratio(schedule):
    lo, hi = 0.3, 0.6
    obj = masked(schedule, min_mask_ratio=lo, max_mask_ratio=hi)
    batch = random_batch(64, 2048)
    x0 = batch["input_ids"]
    for train, inside in ((True, True), (False, False)):
        t = obj.sample_t(x0, gen(3), train=train)
        ratio = (obj.corrupt(x0, t, obj.draw_noise(x0, gen(4)), batch) == SPECIAL.mask).float().mean(1)
        if inside:
            assert ratio.min() > lo - 0.04 and ratio.max() < hi + 0.04
            assert ratio.min() < lo + 0.04 and ratio.max() > hi - 0.04  # the whole range is used
        else:  # evaluation measures the true bound: no clamp
            assert ratio.min() < 0.1 and ratio.max() > 0.9


def test_mask_ratio_bounds_are_validated():
    from diffuse.errors import DiffuseError

    with pytest.raises(DiffuseError, match="min_mask_ratio"):
        masked(min_mask_ratio=0.7, max_mask_ratio=0.6)


def test_single_ratio_per_sequence_switch():
    x0 = random_batch(8, 64)["input_ids"]
    assert masked().sample_t(x0, gen(0)).shape == (8, 1)
    per_token = masked(single_ratio_per_sequence=False).sample_t(x0, gen(0))
    assert per_token.shape == (8, 64) and per_token[0].std() > 0.1
    assert masked(single_ratio_per_sequence=False).sample_t(x0, gen(0), train=False).shape == (8, 1)


def test_antithetic_t_is_stratified():
    t = masked().sample_t(random_batch(100, 4)["input_ids"], gen(5), train=False).squeeze(1)
    strata = torch.floor((t - 1e-3) / (1 - 1e-3) * 100).long().sort().values
    assert torch.equal(strata, torch.arange(100))  # exactly one draw per 1/B stratum


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_bos_and_padding_are_never_masked(schedule):
    obj = masked(schedule)
    batch = packed_batch()
    x0 = batch["input_ids"]
    z = obj.corrupt(x0, torch.ones(2, 1), obj.draw_noise(x0, gen(0)), batch)  # α(1) ≈ 0: mask everything allowed
    keep = (x0 == SPECIAL.bos) | (batch["segment_ids"] == 0)
    assert torch.equal(z[keep], x0[keep])
    assert torch.all(z[~keep] == SPECIAL.mask)


# -- SUBS -----------------------------------------------------------------------------------------
def test_subs_unmasked_positions_contribute_nothing():
    obj = masked()
    batch = random_batch(4, 64)
    logits = torch.randn(4, 64, VOCAB, generator=gen(6))
    first = FixedLogits(logits)
    loss = obj.loss(first, batch, gen(7)).loss
    unmasked = first.seen[0] != SPECIAL.mask
    assert 0 < unmasked.sum() < unmasked.numel()

    changed = logits.clone()
    changed[unmasked] = 50 * torch.randn(int(unmasked.sum()), VOCAB, generator=gen(8))
    assert torch.equal(obj.loss(FixedLogits(changed), batch, gen(7)).loss, loss)

    at_masked = logits.clone()  # the same edit where tokens are masked does change it (the test can fail)
    at_masked[~unmasked] = 50 * torch.randn(int((~unmasked).sum()), VOCAB, generator=gen(8))
    assert not torch.equal(obj.loss(FixedLogits(at_masked), batch, gen(7)).loss, loss)


def test_subs_never_predicts_mask_and_copies_unmasked_tokens():
    obj = masked()
    batch = random_batch(2, 16)
    z = batch["input_ids"].clone()
    z[:, ::2] = SPECIAL.mask
    logits = torch.randn(2, 16, VOCAB, generator=gen(9))
    logits[..., SPECIAL.mask] = 100.0  # the network would love to predict [MASK]
    logp = obj.predict(FixedLogits(logits), z, torch.full((2, 1), 0.5), batch)
    is_mask = z == SPECIAL.mask
    assert torch.all(logp[..., SPECIAL.mask] == float("-inf"))
    torch.testing.assert_close(logp[is_mask].exp().sum(-1), torch.ones(int(is_mask.sum())))
    copied = logp[~is_mask].argmax(-1)
    assert torch.equal(copied, z[~is_mask])
    assert torch.all(logp[~is_mask].exp().max(-1).values == 1.0)


def test_discrete_distance_is_a_kl():
    obj = masked()
    a = torch.randn(3, 5, VOCAB, generator=gen(10)).log_softmax(-1)
    b = torch.randn(3, 5, VOCAB, generator=gen(11)).log_softmax(-1)
    where = torch.ones(3, 5)
    assert torch.allclose(obj.distance(a, a, where), torch.zeros(3, 5), atol=1e-6)
    d = obj.distance(a, b, where)
    assert torch.all(d > 0)
    torch.testing.assert_close(d, (b.exp() * (b - a)).sum(-1))
    assert torch.all(obj.distance(a, b, torch.zeros(3, 5)) == 0)
