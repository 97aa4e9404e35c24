"""The EB-sampler's acceptance rule (sampling/base.eb_accept) and the two loops that use it: `sampler=eb` on the
absorbing decode loop and `sampler=entropy_bound`, DiffusionGemma's loop for uniform-state models, checked
decision for decision against transformers' own DiffusionGemmaGenerationMixin on the same logits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
    DiffusionGemmaGenerationMixin,
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
)

from conftest import SPECIAL, VOCAB, ZeroBackbone, tiny_transformer
from diffuse.contracts import BLOCK_UNIFORM, UNIFORM
from diffuse.errors import DiffuseError
from diffuse.objectives.llada import LLaDA
from diffuse.objectives.masked_discrete import MaskedDiscrete
from diffuse.registry import SAMPLERS
from diffuse.sampling.base import eb_accept, token_entropy
from diffuse.sampling.entropy_bound import EntropyBoundLoop, temperature_at
from diffuse.sampling.trace import recording
from diffuse.schedules import build_schedule


def gen(seed):
    return torch.Generator().manual_seed(seed)


# -- the rule -------------------------------------------------------------------------------------
def test_eb_accepts_the_largest_low_entropy_prefix_with_sum_minus_max_within_gamma():
    h = torch.tensor([[0.3, 5.0, 0.1, 0.2]])  # sorted 0.1, 0.2, 0.3, 5: Σ − max = 0, 0.1, 0.3, 0.6
    assert eb_accept(h, 0.35).tolist() == [[True, False, True, True]]
    assert eb_accept(h, 0.15).tolist() == [[False, False, True, True]]
    assert eb_accept(h, 0.0).tolist() == [[False, False, True, False]]  # at least one, the lowest
    assert eb_accept(h, 1e9).all()
    eligible = torch.tensor([[True, True, False, True]])
    assert eb_accept(h, 0.35, eligible).tolist() == [[True, False, False, True]]  # 0.2, 0.3, 5: Σ − max 0, 0.2, 0.5
    assert not eb_accept(h, 0.35, torch.zeros_like(eligible)).any()  # nothing eligible: nothing


def test_eb_accept_is_transformers_entropy_bound_sampler_on_random_logits():
    for seed, gamma in [(0, 0.1), (1, 0.5), (2, 2.0), (3, 1e-4)]:
        z = torch.randn(3, 24, 50, generator=gen(seed)) * (1 + seed)
        theirs = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=float(gamma)), 24, 50, 8)
        theirs.accept_canvas(torch.zeros(3, 24, dtype=torch.long), torch.ones(3, 24, dtype=torch.long), z, 1)
        assert torch.equal(eb_accept(token_entropy(z), gamma), theirs.accepted_token_mask), seed
        assert (eb_accept(token_entropy(z), gamma).sum(-1) >= 1).all()


def test_token_entropy_is_the_entropy_and_ignores_impossible_tokens():
    z = torch.tensor([[0.0, 0.0, float("-inf"), 0.0]])
    assert token_entropy(z).item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), abs=1e-6)
    assert token_entropy(torch.tensor([[50.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-12)


# -- sampler=eb on the absorbing loop --------------------------------------------------------------
class Peaked(nn.Module):
    """Logits whose entropy rises with the position: position j is token j with confidence falling in j."""

    time_conditioned = False

    def __init__(self):
        super().__init__()
        self.vocab_size, self.anchor, self.seen = VOCAB, nn.Parameter(torch.zeros(())), []

    def forward(self, ids=None, **_):
        self.seen.append(ids.clone())
        L = ids.shape[1]
        out = torch.zeros(*ids.shape, VOCAB)
        out[:, torch.arange(L), torch.arange(L) % 30] = torch.linspace(12.0, 1.0, L)
        return out + 0 * self.anchor

    def logits(self, hidden):
        return hidden


OBJECTIVE = LLaDA(SPECIAL, build_schedule("linear"))


@pytest.mark.parametrize("gamma,most", [(0.0, 1), (1e9, 8)])
def test_eb_commits_one_a_step_at_gamma_zero_and_everything_at_once_with_a_huge_bound(gamma, most):
    model = Peaked()
    out = SAMPLERS.build({"name": "eb", "gamma": gamma, "steps": 8, "temperature": 0.0}).generate(
        model, OBJECTIVE, [[]], 8, seed=0)
    left = [int((z[0, 1:9] == SPECIAL.mask).sum()) for z in model.seen] + [0]
    per_step = [a - b for a, b in zip(left, left[1:])]
    assert max(per_step) <= most and sum(per_step) == 8 and (out.tokens != SPECIAL.mask).all()
    assert out.nfe == 8 // most
    if gamma == 0.0:  # the lowest entropy first: the canvas fills left to right here
        order = [int((z[0, 1:9] != SPECIAL.mask).sum()) for z in model.seen]
        assert order == list(range(8))


def test_eb_batch_equals_singles():
    model = tiny_transformer(seed=3)
    sampler = SAMPLERS.build({"name": "eb", "gamma": 0.5, "steps": 6})
    prompts = [[1, 2, 3], [4], []]
    batch = sampler.generate(model, OBJECTIVE, prompts, 6, seed=5)
    for r, p in enumerate(prompts):
        alone = sampler.generate(model, OBJECTIVE, [p], 6, seed=5 + r)
        assert torch.equal(batch.tokens[r], alone.tokens[0]) and int(batch.nfe_per_row()[r]) == alone.nfe


def test_block_diffusion_takes_the_eb_rule():
    obj = MaskedDiscrete(build_schedule("linear"), SPECIAL, block_size=4)
    model = tiny_transformer(seed=2)
    eager = SAMPLERS.build({"name": "block", "steps": 4, "gamma": 1e9}).generate(model, obj, [[1, 2]], 8, seed=0)
    slow = SAMPLERS.build({"name": "block", "steps": 4, "gamma": 0.0}).generate(model, obj, [[1, 2]], 8, seed=0)
    # a huge bound fills a block in one pass (+ one to cache it), γ = 0 one token a pass (4 per block)
    assert (eager.nfe, slow.nfe) == (1 + 1 + 1 + 1, 1 + 4 + 1 + 4)  # prefill, block, its commit, last block
    assert (eager.tokens != SPECIAL.mask).all() and (slow.tokens != SPECIAL.mask).all()
    with pytest.raises(DiffuseError, match="sampler.threshold"):
        SAMPLERS.build({"name": "block", "threshold": 0.9, "gamma": 0.1})


# -- DiffusionGemma's loop against transformers' own ----------------------------------------------
V, C = 13, 6  # vocabulary, canvas length
TABLE = torch.randn(3, V, V, generator=gen(0))
BASE = torch.randn(4, C, V, generator=gen(1))  # per block and position
EOS, PAD = 5, 0
BASE[:2, :, EOS] -= 10.0  # EOS likely in the third canvas only
BASE[2, 3, EOS] += 10.0


def scripted(canvas, probs, block, scale, mix):
    """A stand-in network: logits from the block and position (`scale`), plus (`mix`) each token, its left
    neighbour and the previous step's probabilities: the argmax settles as `mix` falls."""
    out = scale * BASE[block][None] + mix * (TABLE[0][canvas] + TABLE[1][canvas.roll(1, -1)])
    return out if probs is None else out + mix * probs @ TABLE[2]


class ScriptedGemma(DiffusionGemmaGenerationMixin):
    """transformers' generate loop with the model replaced by `scripted` (no encoder, no cache)."""

    def __init__(self, scale, mix, self_condition):
        self.config = SimpleNamespace(canvas_length=C, image_token_id=-1, text_config=SimpleNamespace(vocab_size=V))
        self.generation_config = DiffusionGemmaGenerationConfig()
        self.dtype, self.scale, self.mix, self.sc, self.seen = torch.float32, scale, mix, self_condition, []
        decoder = SimpleNamespace(create_diffusion_decoder_attention_mask=lambda **_: None,
                                  embed_tokens=SimpleNamespace(weight=torch.zeros(1)))
        self.model = SimpleNamespace(encoder=NoEncoder(), decoder=decoder)

    def forward(self, decoder_input_ids, self_conditioning_logits=None, decoder_position_ids=None, **_):
        self.seen.append(decoder_input_ids.clone())
        probs = self_conditioning_logits.softmax(-1) if self.sc and self_conditioning_logits is not None else None
        block = int(decoder_position_ids[0, 0]) // C
        return SimpleNamespace(logits=scripted(decoder_input_ids, probs, block, self.scale, self.mix))


class NoEncoder:
    def __call__(self, cache, **_):
        return SimpleNamespace(cache=cache)

    def create_masks_for_generate(self, **_):
        return None


class NoCache:
    is_compileable = False

    def get_seq_length(self):
        return 0


@pytest.mark.parametrize("scale,mix,gamma,stop,sc,seed,stops", [
    (2.0, 1.0, 0.3, (1, 0.5), False, 0, False),    # early stopping on, never met: every step runs
    (3.0, 0.2, 0.3, (1, 0.8), True, 1, True),      # a settled argmax: canvases stop early; self-conditioning
    (3.0, 0.2, 1.5, (2, 0.8), False, 2, True),     # stable over two steps
    (3.0, 0.3, 0.3, (0, 0.8), True, 0, True),      # s = 0: confidence alone
    (2.0, 1.0, 0.05, None, True, 3, False),        # no early stop
])
def test_the_loop_reproduces_transformers_generate_decision_for_decision(scale, mix, gamma, stop, sc, seed, stops):
    steps, blocks, eos, pad = 7, 3, EOS, PAD
    dg = ScriptedGemma(scale, mix, sc)
    kw = {"stability_threshold": stop[0], "confidence_threshold": stop[1]} if stop else {}
    torch.manual_seed(seed)
    out = dg.generate(torch.tensor([[1, 2, 3]]), cache=NoCache(), max_new_tokens=blocks * C, max_denoising_steps=steps,
                      sampler_config=EntropyBoundSamplerConfig(entropy_bound=float(gamma)), t_min=0.4, t_max=0.9,
                      eos_token_id=eos, pad_token_id=pad, **kw)
    loop = EntropyBoundLoop(gamma, steps, 0.4, 0.9, *(stop or (None, None)))
    g, seen, tokens, passes, early = [gen(seed)], [], [], 0, 0
    for block in range(blocks):
        def logits_of(canvas, probs, left, block=block):
            seen.append(canvas.clone())
            return scripted(canvas, probs if sc else None, (3 + block * C) // C, scale, mix)  # after a 3-token prompt

        done = loop.denoise(logits_of, torch.ones(1, dtype=torch.bool), C, V, g, "cpu")
        tokens.append(done.tokens)
        passes += int(done.steps)
        early += int(done.steps) < steps
        if (done.tokens == eos).any():
            break
    ours = torch.cat(tokens, 1)[0]
    theirs = out.sequences[0, 3:]
    assert [s.tolist() for s in seen] == [s.tolist() for s in dg.seen]  # every canvas: accept, renoise, RNG order
    assert passes == len(dg.seen) and (early > 0) == stops  # early stopping on the same steps
    after_eos = (ours == eos).cumsum(0) - (ours == eos).long() > 0  # transformers keeps the EOS, pads what follows
    assert theirs[:len(ours)].tolist() == ours.masked_fill(after_eos, pad).tolist()
    assert (theirs[len(ours):] == pad).all()
    assert out.tokens_per_forward.item() == pytest.approx(int((theirs != pad).sum()) / passes)


def test_the_temperature_falls_linearly_from_t_max_and_never_reaches_t_min():
    temps = [float(temperature_at(n, 4, 0.4, 0.8)) for n in range(4, 0, -1)]
    assert temps == pytest.approx([0.8, 0.7, 0.6, 0.5])


# -- sampler=entropy_bound on diffuse's backbones ------------------------------------------------
class Uniform:
    """The parts of a uniform-state objective the sampler reads."""

    registry_name = "uniform"

    def __init__(self, block_size=None):
        self.special, self.block_size = SPECIAL, block_size
        self.process = UNIFORM if block_size is None else BLOCK_UNIFORM


PROMPTS = [[1, 2, 3, 4, 5], [7], []]


# the cached path is the uncached one's tokens (next test) up to float rounding: left padding shifts a row's cached
# attention by ~1e-8, enough to flip an entropy tie of this untrained model (repeated canvas tokens) in a batch
@pytest.mark.parametrize("block_size,use_cache", [(None, None), (4, False)])
def test_entropy_bound_batch_equals_singles(block_size, use_cache):
    model, obj = tiny_transformer(seed=2), Uniform(block_size)
    sampler = SAMPLERS.build({"name": "entropy_bound", "steps": 5, "gamma": 0.5, "use_cache": use_cache})
    batch = sampler.generate(model, obj, PROMPTS, 10, seed=3)
    assert batch.tokens.shape == (3, 10) and (batch.row_nfe >= 1).all()
    for r, p in enumerate(PROMPTS):
        alone = sampler.generate(model, obj, [p], 10, seed=3 + r)
        assert torch.equal(batch.tokens[r], alone.tokens[0]), r
        assert int(batch.nfe_per_row()[r]) == alone.nfe, r


def test_entropy_bound_cached_blocks_equal_uncached():
    model, obj = tiny_transformer(seed=4), Uniform(3)
    a = SAMPLERS.build({"name": "entropy_bound", "steps": 4, "use_cache": True}).generate(model, obj, PROMPTS, 9, seed=1)
    b = SAMPLERS.build({"name": "entropy_bound", "steps": 4, "use_cache": False}).generate(model, obj, PROMPTS, 9, seed=1)
    assert torch.equal(a.tokens, b.tokens) and a.positions < b.positions


class Spy(nn.Module):
    """A backbone that keeps the `prev_probs` of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.prev = inner, []
        self.vocab_size, self.time_conditioned, self.self_conditioned = inner.vocab_size, True, True
        self.supports_block_layout = True

    def forward(self, ids=None, **kw):
        self.prev.append(kw.get("prev_probs"))
        return self.inner(ids=ids, **kw)

    def logits(self, hidden):
        return self.inner.logits(hidden)


@pytest.mark.parametrize("block_size", [None, 4])
def test_a_self_conditioned_backbone_reads_the_previous_steps_probabilities(block_size):
    spy = Spy(tiny_transformer(seed=1, self_condition=True, time_conditioning=True))
    sampler = SAMPLERS.build({"name": "entropy_bound", "steps": 3, "confidence_threshold": None, "use_cache": False})
    sampler.generate(spy, Uniform(block_size), [[1, 2], [3]], 8, seed=0)
    assert len(spy.prev) == 3 * (1 if block_size is None else 2)
    for i, prev in enumerate(spy.prev):
        if i % 3 == 0:  # a canvas's first step has nothing to read
            assert prev is None
            continue
        width = 3 + 8 if block_size is None else 3 + 4 * (1 + i // 3)  # [BOS, prompt…, generated so far]
        assert prev.shape == (2, width, VOCAB)
        on = prev.sum(-1) > 0.5  # a distribution on the canvas, zeros elsewhere
        canvas = torch.zeros_like(on)
        if block_size is None:  # right-padded: each row's span after its own prompt
            canvas[0, 3:11], canvas[1, 2:10] = True, True
        else:  # left-padded: the block is the call's last columns
            canvas[:, -4:] = True
        assert torch.equal(on, canvas) and torch.allclose(prev.sum(-1)[on], torch.ones(1))


class Certain(ZeroBackbone):
    """Predicts token 1 everywhere with certainty, EOS at generated slot 5 (column 6 after [BOS])."""

    def forward(self, ids=None, **_):
        out = torch.zeros(*ids.shape, VOCAB)
        out[..., 1] = 30.0
        if ids.shape[1] > 6:
            out[:, 6, SPECIAL.eos] = 60.0
        return out + 0 * self.anchor

    def logits(self, hidden):
        return hidden


def test_a_certain_model_stops_after_the_stability_window_and_eos_ends_the_sample():
    out = SAMPLERS.build({"name": "entropy_bound", "steps": 20, "stability_threshold": 2}).generate(
        Certain(), Uniform(), [[]], 8, seed=0)
    assert out.nfe == 3  # stable for 2 steps: the third step may stop
    assert out.tokens[0].tolist() == [1] * 5 + [SPECIAL.pad] * 3 and out.lengths.tolist() == [5]
    never = SAMPLERS.build({"name": "entropy_bound", "steps": 20, "confidence_threshold": None})
    assert never.generate(Certain(), Uniform(), [[]], 8, seed=0).nfe == 20


@pytest.mark.parametrize("block_size", [None, 4])
def test_a_recording_sees_every_step_kept_or_renoised_and_changes_nothing(block_size):
    model, obj = tiny_transformer(seed=6), Uniform(block_size)
    sampler = SAMPLERS.build({"name": "entropy_bound", "steps": 3, "confidence_threshold": None, "use_cache": False})
    plain = sampler.generate(model, obj, [[1], [2, 3]], 8, seed=4)
    with recording(sampler) as traj:
        traced = sampler.generate(model, obj, [[1], [2, 3]], 8, seed=4)
    assert torch.equal(plain.tokens, traced.tokens)
    assert len(traj.steps) == 3 * (1 if block_size is None else 2)
    for i, step in enumerate(traj.steps):
        cols = slice(0, 8) if block_size is None else slice(4 * (i // 3), 4 * (i // 3) + 4)
        assert step.canvas.shape == (2, 8) and (step.committed ^ step.renoised)[:, cols].all()
        assert not (step.committed | step.renoised)[:, :cols.start].any()


@pytest.mark.parametrize("key,value", [("gamma", -1.0), ("steps", 0), ("t_min", 0.9), ("stability_threshold", -1),
                                       ("confidence_threshold", 0.0)])
def test_bad_settings_are_one_line(key, value):
    with pytest.raises(DiffuseError, match=f"sampler.{key}") as err:
        SAMPLERS.build({"name": "entropy_bound", key: value})
    assert "\n" not in str(err.value)
