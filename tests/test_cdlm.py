"""regularizer=cdlm_consistency: coupled corruptions, a stop-gradient target, zero for agreeing predictions,
one-line errors, and every objective with the hooks (masked_discrete, continuous, llada)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffuse.errors import DiffuseError
from diffuse.objectives.base import SpecialTokens
from diffuse.registry import MODELS, OBJECTIVES, REGULARIZERS
from diffuse.regularizers.cdlm_consistency import CDLMConsistency
from diffuse.schedules import build_schedule

SPECIAL = SpecialTokens(pad=0, bos=1, eos=2, mask=3)
V, D = 30, 16


def build_objective(name, **kw):
    return OBJECTIVES.build({"name": name, **kw}, schedule=build_schedule("linear"), special=SPECIAL)


def make_batch(B=6, L=16, seed=0):
    ids = torch.randint(4, V, (B, L), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = SPECIAL.bos
    seg = torch.ones_like(ids)
    seg[1, -4:] = 0
    ids[1, -4:] = SPECIAL.pad
    return {"input_ids": ids, "segment_ids": seg}


class TwoClocks(nn.Module):
    """A backbone whose output is scaled by `early` for t > 0.75 and by `late` otherwise: only the t_late
    (target) path touches `late`. With `constant=True` it ignores its input and t: every prediction agrees."""

    time_conditioned = True

    def __init__(self, constant: bool = False):
        super().__init__()
        self.vocab_size, self.constant = V, constant
        self.tok_emb = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V)
        self.early = nn.Parameter(torch.tensor(1.0))
        self.late = nn.Parameter(torch.tensor(0.5))  # the two clocks disagree

    def embed(self, ids):
        return self.tok_emb(ids)

    def forward(self, ids=None, embeds=None, t=None, segment_ids=None, causal=False):
        x = self.embed(ids) if embeds is None else embeds
        if self.constant:
            return self.mix.bias.expand(x.shape)
        t = t.reshape(t.shape[0], -1)[:, :1, None]
        return torch.tanh(self.mix(x)) * torch.where(t > 0.75, self.early, self.late)

    def logits(self, hidden):
        return self.head(hidden)


def fixed_times(objective, t=0.8):
    """Make the objective's t draw deterministic (t_early = t for every row)."""
    objective.sample_t = lambda x0, generator=None, train=True: torch.full((x0.shape[0], 1), t)
    return objective


OBJECTIVES_WITH_HOOKS = ["masked_discrete", "continuous", "llada"]


@pytest.mark.parametrize("name", OBJECTIVES_WITH_HOOKS)
def test_target_gets_no_gradient(name):
    obj, bb = fixed_times(build_objective(name)), TwoClocks()
    reg = CDLMConsistency(weight=1.0, delta_min=100, delta_max=100)  # t_early 0.8 → t_late 0.7
    loss, logs = reg(obj, bb, make_batch(), torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() > 0 and logs["consistency_loss"].item() == pytest.approx(loss.item())
    assert bb.early.grad is not None and bb.early.grad.abs() > 0
    assert bb.late.grad is None or bb.late.grad.abs().item() == 0.0


@pytest.mark.parametrize("name", OBJECTIVES_WITH_HOOKS)
def test_zero_when_both_predictions_agree(name):
    obj, bb = build_objective(name), TwoClocks(constant=True)
    with torch.no_grad():
        bb.mix.bias.normal_()
    loss, logs = CDLMConsistency()(obj, bb, make_batch(), torch.Generator().manual_seed(0))
    assert loss.item() == 0.0 and logs["consistency_loss"].item() == 0.0


@pytest.mark.parametrize("name", ["masked_discrete", "llada"])
def test_coupled_masks_are_nested(name):
    obj = build_objective(name)
    reg = CDLMConsistency(delta_min=50, delta_max=200)
    batch = make_batch(B=64, L=32)
    _, pair = reg.coupled_pair(obj, None, batch, torch.Generator().manual_seed(0))
    early, late = obj.still_noisy(pair.z_early), obj.still_noisy(pair.z_late)
    assert (late & ~early).sum() == 0  # masked at t_late ⇒ masked at t_early
    assert early.sum() > late.sum() > 0
    gap = (pair.t_early - pair.t_late) * 1000
    unclamped = pair.t_late > obj.eps
    assert ((gap[unclamped] >= 50 - 1e-3) & (gap[unclamped] <= 200 + 1e-3)).all()
    assert (pair.t_late >= obj.eps).all()


def test_continuous_pair_shares_its_noise():
    obj, bb = build_objective("continuous"), TwoClocks()
    batch = make_batch()
    x0, pair = CDLMConsistency().coupled_pair(obj, bb, batch, torch.Generator().manual_seed(0))

    def eps_of(z, t):
        a = obj.alpha_bar(t)[..., None]
        return ((z.x - a.sqrt() * x0) / (1 - a).sqrt())[z.noisy]

    torch.testing.assert_close(eps_of(pair.z_early, pair.t_early), eps_of(pair.z_late, pair.t_late), atol=1e-4, rtol=1e-4)
    # δ is counted in steps of the objective's own grid
    k_gap = ((pair.t_early - pair.t_late) * obj.num_timesteps).round()
    assert ((k_gap >= 50) & (k_gap <= 200)).all()


@pytest.mark.parametrize(
    "kw, key",
    [({"weight": -0.1}, "regularizer.weight"), ({"delta_min": 300, "delta_max": 200}, "regularizer.delta_min"),
     ({"delta_max": 1000}, "regularizer.delta_max"), ({"delta_min": -1}, "regularizer.delta_min")],
)
def test_bad_settings_are_one_line_errors(kw, key):
    with pytest.raises(DiffuseError, match=key) as err:
        REGULARIZERS.build({"name": "cdlm_consistency", **kw})
    assert "\n" not in str(err.value)


def test_delta_max_is_checked_against_the_objective_grid():
    obj = build_objective("continuous", num_timesteps=100)
    with pytest.raises(DiffuseError, match="objective.num_timesteps"):
        CDLMConsistency(delta_max=200)(obj, TwoClocks(), make_batch())


def test_objective_without_hooks_is_a_one_line_error():
    obj = build_objective("autoregressive")
    with pytest.raises(DiffuseError, match="needs objective hooks"):
        CDLMConsistency()(obj, TwoClocks(), make_batch())


def test_training_step_logs_the_consistency_loss():
    from diffuse.run.module import DiffusionLM

    bb = MODELS.build({"name": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2, "time_conditioning": True}, vocab_size=V)
    module = DiffusionLM(bb, build_objective("continuous"), [CDLMConsistency(weight=0.5)])
    logged = {}
    module.log_dict = lambda d, **kw: logged.update(d)
    total = module.training_step(make_batch(), 0)
    total.backward()
    assert {"train/consistency_loss", "train/mse", "train/ce", "train/objective_loss"} <= set(logged)
    expected = logged["train/objective_loss"] + 0.5 * logged["train/consistency_loss"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
